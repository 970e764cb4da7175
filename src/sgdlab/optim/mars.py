"""MARS-AdamW: AdamW preconditioning of a scaled stochastic recursive momentum (variance reduction).

Reference: Huizhuo Yuan, Yifeng Liu, Shuang Wu, Xun Zhou, Quanquan Gu, "MARS: Unleashing the Power of
Variance Reduction for Training Large Models", 2024 (ICML 2025), arXiv:2411.10438.

The paper's MARS-AdamW (its Algorithm 2) needs two gradients per step, ``grad f(x_t, xi_t)`` and
``grad f(x_{t-1}, xi_t)`` (the previous iterate on the *current* batch). Its practical variant
MARS-approx, which the paper uses for its large experiments and the authors' code runs by default,
replaces the second with the previous step's gradient ``g_{t-1} = grad f(x_{t-1}, xi_{t-1})``, so a
step costs one gradient like AdamW. This class implements MARS-approx. For one parameter with gradient
``g_t`` at step ``t = 1, 2, ...``::

    c_t     = g_t + gamma * beta1 / (1 - beta1) * (g_t - g_{t-1})       (g_0 = 0)
    c~_t    = c_t / ||c_t||_2   if ||c_t||_2 > 1   else c_t                (clip to norm 1)
    m_t     = beta1 * m_{t-1} + (1 - beta1) * c~_t
    v_t     = beta2 * v_{t-1} + (1 - beta2) * c~_t^2
    m_hat   = m_t / (1 - beta1^t) ;  v_hat = v_t / (1 - beta2^t)
    theta_t = theta_{t-1} - lr * ( m_hat / (sqrt(v_hat) + eps) + weight_decay * theta_{t-1} )

Notes on choices the paper leaves to the implementation:

* The norm in the clip is taken per parameter tensor (as in the authors' code); the pseudocode writes
  it for the whole parameter vector.
* ``g_0 = 0`` (the authors' code initialises the stored previous gradient to zero), so the first step
  uses ``c_1 = (1 + gamma * beta1 / (1 - beta1)) * g_1`` before clipping.
* MARS-AdamW is elementwise, so it is applied to every parameter: matrices, conv kernels, biases,
  norm gains and embeddings alike. The authors' code (and ``pytorch_optimizer.MARS``) by default
  instead updates 1-D parameters with plain AdamW (``optimize_1d=False``, with their own ``lr_1d``,
  ``betas_1d``, ``weight_decay_1d``); to get that split here, put the 1-D parameters in a
  ``torch.optim.AdamW``. Our behaviour equals theirs with ``optimize_1d=True``.
* ``gamma`` is constant (the paper allows a schedule ``gamma_t``; use a param-group update for that).

Defaults: ``betas = (0.95, 0.99)``, ``gamma = 0.025``, ``eps = 1e-8`` are the paper's settings for
GPT-2 (also the authors' code defaults); ``lr = 3e-3`` and ``weight_decay = 0`` are the authors' code
defaults (the paper's GPT-2 small run uses ``lr = 6e-3``, ``weight_decay = 1e-2``).

Differences from ``pytorch_optimizer.MARS`` (4.1) with ``mars_type="adamw"``, ``optimize_1d=True``:
it divides by ``(sqrt(v_t + 1e-15) + eps) / sqrt(1 - beta2^t)``, i.e. adds ``eps`` before the bias
correction, whereas the paper's update (and ours) uses ``sqrt(v_hat) + eps``. The two coincide at
``eps = 0`` up to the 1e-15 inside its square root; otherwise the trajectories are the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import ElementwiseOptimizer, adam_denominator, check_betas, defaults_from
from ._compiled import Kernel

__all__ = ["MARS"]


def _mars_kernel(p, g, m, v, last, step_size_bc2, eps_bc2, decay, scale: float, beta1: float, beta2: float):
    c = (g - last) * scale + g
    c = c * (1.0 / torch.linalg.vector_norm(c).clamp_min(1.0))  # one division per tensor, not per element
    m.lerp_(c, 1.0 - beta1)
    v.mul_(beta2).addcmul_(c, c, value=1.0 - beta2)
    # step_size m / (sqrt(v) / bc2 + eps) as step_size bc2 m / (sqrt(v) + eps bc2)
    p.copy_(p * decay - step_size_bc2 * m / (v.sqrt() + eps_bc2))
    last.copy_(g)


class MARS(ElementwiseOptimizer):
    """MARS-AdamW, approximate (one-gradient) variant (Yuan et al., 2024, arXiv:2411.10438).

    See the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate ``eta`` (>= 0).
        betas: ``(beta1, beta2)``: momentum and second-moment decay rates; beta1 in [0, 1), beta2 in [0, 1).
        gamma: scale of the variance-reduction correction (>= 0); 0 gives AdamW on the clipped gradient.
        eps: added to ``sqrt(v_hat)`` (>= 0).
        weight_decay: decoupled weight decay ``lambda`` (>= 0), multiplied by ``lr``.
        foreach, compiled, maximize: code path and sign, as for every elementwise optimizer
            (:class:`~sgdlab.optim._base.ElementwiseOptimizer`).
    """

    state_names = ("exp_avg", "exp_avg_sq", "last_grad")
    kernel = Kernel(_mars_kernel, "MARS")

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 gamma: float = 0.025, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict) -> None:
        super()._validate(group)
        group["betas"] = check_betas(group["betas"])
        check_range("gamma", group["gamma"], low=0.0)
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)

    def _update(self, group, t, p, g, m, v, last, ops) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        c = ops.sub(g, last)
        ops.mul_(c, group["gamma"] * beta1 / (1.0 - beta1))
        ops.add_(c, g)
        norms = ops.norm(c)
        ops.clamp_min_(norms, 1.0)
        ops.div_(c, norms)
        denom = adam_denominator(m, v, c, t, beta1, beta2, eps, ops)
        if wd != 0.0:
            ops.mul_(p, 1.0 - lr * wd)
        ops.addcdiv_(p, m, denom, value=-lr / (1.0 - beta1 ** t))
        ops.copy_(last, g)

    def _coefficients(self, group: dict, t: float) -> list[float]:
        (beta1, beta2), lr = group["betas"], group["lr"]
        bc2 = math.sqrt(1.0 - beta2 ** t)
        return [lr * bc2 / (1.0 - beta1 ** t), group["eps"] * bc2, 1.0 - lr * group["weight_decay"]]

    def _constants(self, group: dict) -> tuple:
        beta1, beta2 = group["betas"]
        return group["gamma"] * beta1 / (1.0 - beta1), beta1, beta2
