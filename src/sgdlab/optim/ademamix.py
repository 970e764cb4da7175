"""AdEMAMix: Adam with a mixture of a fast and a slow EMA of the gradients.

Reference: Matteo Pagliardini, Pierre Ablin, David Grangier, "The AdEMAMix Optimizer: Better, Faster,
Older", 2024 (ICLR 2025), arXiv:2409.03137. Algorithm 1 of the paper.

Update rule for one parameter ``theta`` with gradient ``g_t`` at step ``t = 1, 2, ...``::

    alpha_t = f_alpha(t) ;  beta3_t = f_beta3(t)           (warm-up schedulers, see below)
    m1_t    = beta1 * m1_{t-1}   + (1 - beta1)   * g_t      (fast EMA, bias-corrected)
    m2_t    = beta3_t * m2_{t-1} + (1 - beta3_t) * g_t      (slow EMA, NOT bias-corrected)
    v_t     = beta2 * v_{t-1}    + (1 - beta2)   * g_t^2
    m1_hat  = m1_t / (1 - beta1^t) ;  v_hat = v_t / (1 - beta2^t)
    theta_t = theta_{t-1} - lr * ( (m1_hat + alpha_t * m2_t) / (sqrt(v_hat) + eps) + weight_decay * theta_{t-1} )

Weight decay is decoupled (AdamW style) and scaled by ``lr``, as in Algorithm 1. The method is
elementwise, so every parameter (matrices, biases, norm gains, embeddings) gets the same update; the
paper applies it to all parameters of its models.

Warm-up (paper, Section 3, "schedulers"), with ``T = t_alpha_beta3``; when ``T`` is None both are
constant (``alpha_t = alpha``, ``beta3_t = beta3``)::

    f_alpha(t) = min(t * alpha / T, alpha)
    f_beta3(t) = min(exp(ln(beta1) * ln(beta3) / ((1 - t/T) * ln(beta3) + (t/T) * ln(beta1))), beta3)

``f_beta3`` interpolates linearly in the half-life of the EMA, from ``beta1`` at ``t = 0`` to ``beta3``
at ``t = T``. The paper sets ``T`` to the total number of training steps for its large runs.

Defaults: ``betas = (0.9, 0.999, 0.9999)`` and ``eps = 1e-8`` as in the paper; the paper recommends
``alpha`` in [4, 10] and we take ``alpha = 5`` (pytorch_optimizer's default too; the authors' reference
code defaults to 2); ``lr = 1e-3`` as in the authors' code; ``weight_decay = 0`` and no warm-up
(``t_alpha_beta3=None``) as in the authors' code. The paper warns that without warm-up a large
``beta3`` can make early training unstable: set ``t_alpha_beta3`` for long runs.

Differences from ``pytorch_optimizer.AdEMAMix`` (4.1): its weight decay is coupled L2 by default
(``weight_decouple=False``); ours is the paper's decoupled decay (theirs with ``weight_decouple=True``).
The schedulers are the same formulas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError, check_range
from ._base import ElementwiseOptimizer, check_betas, defaults_from
from ._compiled import Kernel

__all__ = ["AdEMAMix"]


def _alpha_at(step: int, alpha: float, t_warm: int | None) -> float:
    return alpha if t_warm is None else min(step * alpha / t_warm, alpha)


def _beta3_at(step: int, beta1: float, beta3: float, t_warm: int | None) -> float:
    if t_warm is None or beta3 <= beta1:
        return beta3
    a = min(step / t_warm, 1.0)
    lb1, lb3 = math.log(beta1), math.log(beta3)
    return min(math.exp(lb1 * lb3 / ((1.0 - a) * lb3 + a * lb1)), beta3)


def _schedule(step: int, group: dict) -> tuple[float, float, float, float]:
    """``1 - beta1^t``, ``sqrt(1 - beta2^t)``, ``alpha_t`` and ``beta3_t`` at step ``t``."""
    beta1, beta2, beta3 = group["betas"]
    t_warm = group["t_alpha_beta3"]
    return (1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step),
            _alpha_at(step, group["alpha"], t_warm), _beta3_at(step, beta1, beta3, t_warm))


def _ademamix_kernel(p, g, m1, m2, v, inv_bc1, alpha_t, one_minus_beta3, lr_bc2, eps_bc2, decay, beta1: float,
                     beta2: float):
    m1.lerp_(g, 1.0 - beta1)
    m2.lerp_(g, one_minus_beta3)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    # lr (...) / (sqrt(v) / bc2 + eps) as lr bc2 (...) / (sqrt(v) + eps bc2): one division
    p.copy_(p * decay - lr_bc2 * (m1 * inv_bc1 + alpha_t * m2) / (v.sqrt() + eps_bc2))


class AdEMAMix(ElementwiseOptimizer):
    """AdEMAMix (Pagliardini, Ablin & Grangier, 2024, arXiv:2409.03137); see the module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate ``eta`` (>= 0).
        betas: ``(beta1, beta2, beta3)``: fast-EMA, second-moment and slow-EMA decay rates, each in [0, 1).
        alpha: weight of the slow EMA in the numerator (>= 0).
        t_alpha_beta3: warm-up length ``T_{alpha,beta3}`` in steps for ``alpha`` and ``beta3``
            (integer >= 1), or None for no warm-up. With warm-up, ``beta1`` must be > 0.
        eps: added to ``sqrt(v_hat)`` (>= 0).
        weight_decay: decoupled weight decay ``lambda`` (>= 0), multiplied by ``lr``.
        foreach, compiled, maximize: code path and sign, as for every elementwise optimizer
            (:class:`~sgdlab.optim._base.ElementwiseOptimizer`).
    """

    state_names = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
    kernel = Kernel(_ademamix_kernel, "AdEMAMix")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_alpha_beta3: int | None = None, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict) -> None:
        super()._validate(group)
        group["betas"] = betas = check_betas(group["betas"], n=3)
        check_range("alpha", group["alpha"], low=0.0)
        if group["t_alpha_beta3"] is not None:
            check_range("t_alpha_beta3", group["t_alpha_beta3"], low=1, integer=True)
            if betas[0] <= 0.0:
                raise ConfigError(f"betas[0]={betas[0]!r} is out of range with t_alpha_beta3 set; "
                                  "allowed: 0 < betas[0] < 1 (the beta3 warm-up uses ln(beta1))")
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)

    def _update(self, group, t, p, g, m1, m2, v, ops) -> None:
        beta1, beta2, _ = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        bc1, bc2_sqrt, alpha_t, beta3_t = _schedule(int(t), group)
        ops.lerp_(m1, g, 1.0 - beta1)
        ops.lerp_(m2, g, 1.0 - beta3_t)
        ops.mul_(v, beta2)
        ops.addcmul_(v, g, g, value=1.0 - beta2)
        denom = ops.sqrt(v)
        ops.div_(denom, bc2_sqrt)
        ops.add_(denom, eps)
        num = ops.div(m1, bc1)
        ops.add_(num, m2, alpha=alpha_t)
        if wd != 0.0:
            ops.mul_(p, 1.0 - lr * wd)
        ops.addcdiv_(p, num, denom, value=-lr)

    def _coefficients(self, group: dict, t: float) -> list[float]:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        bc1, bc2_sqrt, alpha_t, beta3_t = _schedule(int(t), group)
        return [1.0 / bc1, alpha_t, 1.0 - beta3_t, lr * bc2_sqrt, eps * bc2_sqrt, 1.0 - lr * wd]

    def _constants(self, group: dict) -> tuple:
        return group["betas"][:2]
