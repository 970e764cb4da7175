"""AdaMomentum: Adam whose second moment tracks the momentum instead of the raw gradient.

Reference: Yizhou Wang, Yue Kang, Can Qin, Huan Wang, Yi Xu, Yulun Zhang, Yun Fu, "Rethinking Adam: A
Twofold Exponential Moving Average Approach", arXiv:2106.11514 (v1: "Adapting Stepsizes by Momentumized
Gradients Improves Optimization and Generalization").

Update rule (per element; t counts this parameter's steps)::

    m_t   = beta1 m_{t-1} + (1 - beta1) g_t
    v_t   = beta2 v_{t-1} + (1 - beta2) m_t^2 + eps          (eps enters the state every step)
    m^_t  = m_t / (1 - beta1^t),   v^_t = v_t / (1 - beta2^t)
    theta_t = theta_{t-1} - lr * m^_t / sqrt(v^_t)            (no outer eps)

The second exponential moving average is taken of ``m_t``, the "momentumized" gradient, so a coordinate
whose gradient keeps its sign gets a smaller second moment than under Adam (the first step with a
constant gradient is ``lr / (1 - beta1)`` per coordinate, ten times Adam's at beta1 = 0.9).

Defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-8 (the paper's Adam-like settings). Because eps accumulates in
v, its floor is ``eps (1 - beta2^t) / (1 - beta2)``, i.e. about 1e-5 inside the square root at beta2 = 0.999.
Weight decay is decoupled (AdamW-style): theta <- theta (1 - lr * weight_decay) before the update; default 0.
The public port (AdaBelief-derived, third party) additionally offers AMSGrad and rectification; not here.
No pytorch_optimizer class implements this method.

The method is elementwise and treats every parameter the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..errors import check_range
from ._base import AdamFamily, defaults_from
from ._compiled import Kernel

__all__ = ["AdaMomentum"]


def _adamomentum_kernel(p, g, m, v, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float, eps: float):
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(m, m, value=1 - beta2).add_(eps)
    p.copy_(p * decay - (step_size * bc2) * m / v.sqrt())  # m^ / sqrt(v^) = bc2 m / ((1 - beta1^t) sqrt(v))


class AdaMomentum(AdamFamily):
    """AdaMomentum (Wang et al., arXiv:2106.11514); see the module docstring for the update rule.

    Hyperparameters as for every Adam-family optimizer (:class:`~sgdlab.optim._base.AdamFamily`), except that
    ``eps`` is added to the second moment at every step (not to its square root); defaults lr=1e-3,
    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.
    """

    state_names = ("exp_avg", "exp_avg_var")
    kernel = Kernel(_adamomentum_kernel, "AdaMomentum")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, foreach: bool | None = None,
                 compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("eps", group["eps"], low=0.0, low_open=True)  # v has no other floor: 0 / 0 at g = 0

    def _constants(self, group: dict[str, Any]) -> tuple:
        return (*group["betas"], group["eps"])

    def _update(self, group, t, p, g, m, v, ops) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            ops.mul_(p, 1 - lr * wd)
        ops.lerp_(m, g, 1 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, m, m, value=1 - beta2)
        ops.add_(v, eps)
        denom = ops.sqrt(v)
        ops.div_(denom, math.sqrt(1 - beta2 ** t))
        ops.addcdiv_(p, m, denom, value=-lr / (1 - beta1 ** t))
