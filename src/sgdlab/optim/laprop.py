"""LaProp: momentum over adaptively normalised gradients (Adam with momentum and adaptivity separated).

Reference: Liu Ziyin, Zhikang T. Wang, Masahito Ueda, "LaProp: Separating Momentum and Adaptivity in Adam",
arXiv:2002.04839 (2020).

Update rule (per element; t counts this parameter's steps), the paper's Algorithm 1 with mu = beta1 and
nu = beta2::

    v_t   = beta2 v_{t-1} + (1 - beta2) g_t^2
    m_t   = beta1 m_{t-1} + (1 - beta1) g_t / (sqrt(v_t / (1 - beta2^t)) + eps)
    theta_t = theta_{t-1} - lr_t * m_t / (1 - beta1^t)

Unlike Adam, the gradient is divided by the second-moment estimate *before* it enters the momentum, so
beta1 and beta2 can be chosen independently (e.g. beta2 < beta1 is stable).

Defaults lr=4e-4, betas=(0.9, 0.999), eps=1e-15 are those of the authors' reference implementation.
Weight decay: the paper's algorithm has none; we offer decoupled (AdamW-style) decay applied to
theta_{t-1}: theta <- theta (1 - lr * weight_decay), before the update. Default 0.

Differences from ``pytorch_optimizer.LaProp`` (which follows the authors' code):

- Learning-rate schedules: they keep lr inside the momentum (m accumulates lr_s (1 - beta1) g_s / ...) and
  divide by an lr-weighted bias correction, so a past step keeps the learning rate it was taken with. We
  follow the paper's Algorithm 1 (lr_t multiplies the whole momentum). With a constant lr the two agree and
  their ``exp_avg`` equals lr times ours.
- Weight decay: they decay after the update, theta <- (theta - step)(1 - lr wd); we decay theta_{t-1}
  first. The results differ by lr * wd * step.
- They add 1e-15 inside the square root of v; we do not.

The method is elementwise and treats every parameter (matrices, biases, norms, embeddings) the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ._base import AdamFamily, defaults_from
from ._compiled import Kernel

__all__ = ["LaProp"]


def _laprop_kernel(p, g, m, v, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float):
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m.mul_(beta1).add_(((1 - beta1) * bc2) * g / (v.sqrt() + eps_bc2))  # g / (sqrt(v) / bc2 + eps)
    p.copy_(p * decay - step_size * m)


class LaProp(AdamFamily):
    """LaProp (Ziyin, Wang & Ueda, 2020, arXiv:2002.04839); see the module docstring for the update rule.

    Hyperparameters as for every Adam-family optimizer (:class:`~sgdlab.optim._base.AdamFamily`), with the
    authors' defaults lr=4e-4, betas=(0.9, 0.999), eps=1e-15; weight_decay=0.
    """

    kernel = Kernel(_laprop_kernel, "LaProp")

    def __init__(self, params: Iterable[Any], lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-15, weight_decay: float = 0.0, *, foreach: bool | None = None,
                 compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    def _update(self, group, t, p, g, m, v, ops) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            ops.mul_(p, 1 - lr * wd)
        ops.mul_(v, beta2)
        ops.addcmul_(v, g, g, value=1 - beta2)
        denom = ops.sqrt(v)
        ops.div_(denom, math.sqrt(1 - beta2 ** t))
        ops.add_(denom, eps)
        ops.mul_(m, beta1)
        ops.addcdiv_(m, g, denom, value=1 - beta1)
        if ops.batched:  # the multi-tensor path scales a copy of m (as in earlier versions: same numbers as before)
            ops.add_(p, ops.mul(m, -lr / (1 - beta1 ** t)))
        else:
            ops.add_(p, m, alpha=-lr / (1 - beta1 ** t))
