"""Grams: gradient descent with adaptive momentum scaling (direction from the gradient, size from Adam).

Reference: Yang Cao, Xiaoyu Li, Zhao Song, "Grams: Gradient Descent with Adaptive Momentum Scaling",
arXiv:2412.17107 (2024; ICLR 2025 SCOPE workshop).

Update rule (per element; t counts this parameter's steps), the paper's Algorithm 1::

    m_t   = beta1 m_{t-1} + (1 - beta1) g_t
    v_t   = beta2 v_{t-1} + (1 - beta2) g_t^2
    m^_t  = m_t / (1 - beta1^t),   v^_t = v_t / (1 - beta2^t)
    u_t   = m^_t / (sqrt(v^_t) + eps)
    theta_t = theta_{t-1} - lr * (sign(g_t) * |u_t| + weight_decay * theta_{t-1})

The momentum sets only the magnitude of each coordinate's step; its sign comes from the current gradient
(a coordinate whose gradient is exactly 0 does not move, apart from weight decay).

Defaults: lr=1e-3 and betas=(0.9, 0.999) as in the authors' README and code; eps=1e-6 is the authors'
implementation default (also used by ``pytorch_optimizer.Grams``). Weight decay is decoupled (AdamW-style,
scaled by lr, applied to theta_{t-1}) as in the paper's algorithm; default 0.

Matches ``pytorch_optimizer.Grams`` (weight_decouple=True) step for step.

The method is elementwise and treats every parameter (matrices, biases, norms, embeddings) the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._base import AdamFamily, adam_denominator, defaults_from
from ._compiled import Kernel

__all__ = ["Grams"]


def _grams_kernel(p, g, m, v, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float):
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    magnitude = m.abs() / (v.sqrt() + eps_bc2)  # |m / (sqrt(v) / bc2 + eps)| / bc2
    p.copy_(p * decay - (step_size * bc2) * magnitude * g.sign())


class Grams(AdamFamily):
    """Grams (Cao, Li & Song, 2024, arXiv:2412.17107); see the module docstring for the update rule.

    Hyperparameters as for every Adam-family optimizer (:class:`~sgdlab.optim._base.AdamFamily`), with the
    authors' defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-6; weight_decay=0.
    """

    kernel = Kernel(_grams_kernel, "Grams")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, foreach: bool | None = None,
                 compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    def _update(self, group, t, p, g, m, v, ops) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            ops.mul_(p, 1 - lr * wd)
        magnitude = ops.div(m, adam_denominator(m, v, g, t, beta1, beta2, eps, ops))
        ops.abs_(magnitude)
        ops.addcmul_(p, magnitude, ops.sign(g), value=-lr / (1 - beta1 ** t))
