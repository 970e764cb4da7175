"""Random-scaling SGDM: SGD with momentum whose every step is multiplied by an exponential random scalar.

Reference: Qinzi Zhang, Ashok Cutkosky, "Random Scaling and Momentum for Non-smooth Non-convex
Optimization", ICML 2024, arXiv:2405.09742.

Update rule (t = 1, 2, ...; one scalar ``s_t`` per step, shared by every parameter of every group)::

    s_t     ~ Exp(1)                                   (E s = 1, E s^2 = 2)
    m_t     = beta m_{t-1} + (1 - beta) g_t            (m_0 = 0)
    Delta_t = -lr (m_t + weight_decay theta_{t-1})
    theta_t = theta_{t-1} + s_t Delta_t

The gradient of the next step is taken at the randomly scaled iterate, so no extra evaluation point is
needed. The paper derives the method from an "exponentiated" online-to-non-convex conversion: for
s ~ Exp(1), E_s[f(x + s D) - f(x)] = E_s[<grad f(x + s D), D>] exactly, which removes the smoothness
term from the analysis of non-smooth objectives. This is the authors' practical ``Sgdm(random_scaling=...)``
form (an EMA momentum, decay added to the step, not to the gradient); the theory's form
``Delta_{t+1} = beta (Delta_t - eta g_t)`` is the same recursion, ``Delta = -lr m`` with ``lr = eta beta / (1 - beta)``.
With ``random_scaling=False`` (``s_t = 1``) it is SGD with an EMA momentum, i.e. ``torch.optim.SGD(momentum=beta,
dampening=beta)`` from the second step on (torch starts its buffer at ``g_1``, this one at ``(1 - beta) g_1``).

``s_t`` comes from a ``torch.Generator`` owned by the optimizer (``seed``), drawn on the CPU once per
``step()`` and saved in ``state_dict()``; a group with ``random_scaling=False`` ignores it. Defaults: lr=0.01,
beta=0.9 (the paper's practical setting; the theory ties beta to the target stationarity), weight_decay=0.
Not in pytorch_optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import ElementwiseOptimizer, check_flag

__all__ = ["RandomScalingSGDM"]


class RandomScalingSGDM(ElementwiseOptimizer):
    """Random-scaling SGDM (Zhang & Cutkosky, ICML 2024, arXiv:2405.09742); see the module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        beta: momentum (EMA) decay rate, in [0, 1).
        weight_decay: decay added to the step, Delta = -lr (m + weight_decay theta); >= 0.
        random_scaling: multiply each step by s ~ Exp(1) (False: plain EMA-momentum SGD).
        seed: seed of the optimizer's generator of the scales (saved in ``state_dict``).
        foreach, maximize: as for every :class:`~sgdlab.optim._base.ElementwiseOptimizer` (no compiled kernel).
    """

    state_names = ("momentum_buffer",)
    counted = False
    uses_step = False

    def __init__(self, params: Iterable[Any], lr: float = 0.01, beta: float = 0.9, weight_decay: float = 0.0,
                 random_scaling: bool = True, *, seed: int = 0, foreach: bool | None = None, maximize: bool = False):
        check_range("seed", seed, low=0, integer=True)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.scale = 1.0  #: the scale s_t of the latest step
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, random_scaling=random_scaling,
                                      foreach=foreach, maximize=maximize))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("beta", group["beta"], low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_flag("random_scaling", group["random_scaling"])

    extra_state_key = "random_scaling"

    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self._generator.get_state(), "scale": self.scale}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.seed, self.scale = int(extra["seed"]), float(extra["scale"])
        self._generator.set_state(extra["generator"])

    def _prepare(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """Draw this step's s ~ Exp(1), one for all groups."""
        self.scale = torch.empty((), dtype=torch.float64).exponential_(generator=self._generator).item()

    def _update(self, group, t, p, g, m, ops) -> None:
        s = self.scale if group["random_scaling"] else 1.0
        lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
        ops.lerp_(m, g, 1 - beta)
        if wd != 0:
            ops.mul_(p, 1 - s * lr * wd)
        ops.add_(p, m, alpha=-s * lr)
