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
from collections.abc import Callable

import torch

from ..errors import ConfigError, check_range
from ._compiled import Kernel, check_compiled, compiled_mode

__all__ = ["AdEMAMix"]


def _alpha_at(step: int, alpha: float, t_warm: int | None) -> float:
    return alpha if t_warm is None else min(step * alpha / t_warm, alpha)


def _beta3_at(step: int, beta1: float, beta3: float, t_warm: int | None) -> float:
    if t_warm is None or beta3 <= beta1:
        return beta3
    a = min(step / t_warm, 1.0)
    lb1, lb3 = math.log(beta1), math.log(beta3)
    return min(math.exp(lb1 * lb3 / ((1.0 - a) * lb3 + a * lb1)), beta3)


class AdEMAMix(torch.optim.Optimizer):
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
        foreach: True: multi-tensor ``torch._foreach_*`` path; False: per-parameter loop; None: foreach
            when all of a group's parameters are on one device type.
        compiled: use the ``torch.compile``d kernel (one fused loop per tensor); None picks it for groups of
            at least 4M elements (:mod:`sgdlab.optim._compiled`), else ``foreach`` decides.
        maximize: maximize the objective instead of minimizing it.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, foreach: bool | None = None, compiled: bool | None = None,
                 maximize: bool = False):
        defaults = dict(lr=lr, betas=betas, alpha=alpha, t_alpha_beta3=t_alpha_beta3, eps=eps,
                        weight_decay=weight_decay, foreach=foreach, compiled=compiled, maximize=maximize)
        self._validate(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict) -> None:
        check_range("lr", group["lr"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ConfigError(f"betas must be a tuple (beta1, beta2, beta3), got {betas!r}")
        for i, b in enumerate(betas):
            check_range(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        check_range("alpha", group["alpha"], low=0.0)
        if group["t_alpha_beta3"] is not None:
            check_range("t_alpha_beta3", group["t_alpha_beta3"], low=1, integer=True)
            if betas[0] <= 0.0:
                raise ConfigError(f"betas[0]={betas[0]!r} is out of range with t_alpha_beta3 set; "
                                  "allowed: 0 < betas[0] < 1 (the beta3 warm-up uses ln(beta1))")
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        if group["foreach"] not in (None, True, False):
            raise ConfigError(f"foreach must be True, False or None, got {group['foreach']!r}")
        check_compiled(group.get("compiled"))
        if group["maximize"] not in (True, False):
            raise ConfigError(f"maximize must be True or False, got {group['maximize']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    def _init_group(self, group: dict) -> tuple[list, list, list, list, list, list]:
        params, grads, m1s, m2s, vs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdEMAMix does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("AdEMAMix does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg_fast"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_slow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            m1s.append(state["exp_avg_fast"])
            m2s.append(state["exp_avg_slow"])
            vs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, m1s, m2s, vs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, m1s, m2s, vs, steps = self._init_group(group)
            if not params:
                continue
            mode = compiled_mode(group.get("compiled"), [*params, *grads, *m1s, *m2s, *vs])
            if mode:
                _compiled(mode, params, grads, m1s, m2s, vs, steps, group)
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in params}) == 1
            (_multi_tensor if foreach else _single_tensor)(params, grads, m1s, m2s, vs, steps, group)
        return loss


def _coefficients(step: int, group: dict) -> tuple[float, float, float, float]:
    beta1, beta2, beta3 = group["betas"]
    t_warm = group["t_alpha_beta3"]
    return (1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step),
            _alpha_at(step, group["alpha"], t_warm), _beta3_at(step, beta1, beta3, t_warm))


def _single_tensor(params, grads, m1s, m2s, vs, steps, group) -> None:
    beta1, beta2, _ = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    for p, g, m1, m2, v, st in zip(params, grads, m1s, m2s, vs, steps, strict=True):
        if group["maximize"]:
            g = -g
        st += 1
        bc1, bc2_sqrt, alpha_t, beta3_t = _coefficients(int(st.item()), group)
        m1.lerp_(g, 1.0 - beta1)
        m2.lerp_(g, 1.0 - beta3_t)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        num = (m1 / bc1).add_(m2, alpha=alpha_t)
        if wd != 0.0:
            p.mul_(1.0 - lr * wd)
        p.addcdiv_(num, denom, value=-lr)


def _multi_tensor(params, grads, m1s, m2s, vs, steps, group) -> None:
    beta1, beta2, _ = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    torch._foreach_add_(steps, 1.0)
    # Tensors that share device, dtype and step count share one set of scalar coefficients.
    buckets: dict[tuple, list[int]] = {}
    for i, (p, st) in enumerate(zip(params, steps, strict=True)):
        buckets.setdefault((p.device, p.dtype, int(st.item())), []).append(i)
    for (_, _, step), idx in buckets.items():
        ps, m1, m2, v = ([lst[i] for i in idx] for lst in (params, m1s, m2s, vs))
        g = [grads[i] for i in idx]
        if group["maximize"]:
            g = torch._foreach_neg(g)
        bc1, bc2_sqrt, alpha_t, beta3_t = _coefficients(step, group)
        torch._foreach_lerp_(m1, g, 1.0 - beta1)
        torch._foreach_lerp_(m2, g, 1.0 - beta3_t)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        num = torch._foreach_div(m1, bc1)
        torch._foreach_add_(num, m2, alpha=alpha_t)
        if wd != 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_addcdiv_(ps, num, denom, value=-lr)


def _ademamix_kernel(p, g, m1, m2, v, inv_bc1, alpha_t, one_minus_beta3, lr_bc2, eps_bc2, decay, beta1: float,
                     beta2: float):
    m1.lerp_(g, 1.0 - beta1)
    m2.lerp_(g, one_minus_beta3)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    # lr (...) / (sqrt(v) / bc2 + eps) as lr bc2 (...) / (sqrt(v) + eps bc2): one division
    p.copy_(p * decay - lr_bc2 * (m1 * inv_bc1 + alpha_t * m2) / (v.sqrt() + eps_bc2))


_KERNEL = Kernel(_ademamix_kernel, "AdEMAMix")


def _compiled(mode, params, grads, m1s, m2s, vs, steps, group) -> None:
    beta1, beta2, _ = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)

    def coefficients(step: float) -> list[float]:
        bc1, bc2_sqrt, alpha_t, beta3_t = _coefficients(int(step), group)
        return [1.0 / bc1, alpha_t, 1.0 - beta3_t, lr * bc2_sqrt, eps * bc2_sqrt, 1.0 - lr * wd]

    _KERNEL.run_stepped(mode, list(zip(params, grads, m1s, m2s, vs, strict=True)), steps, coefficients,
                        (beta1, beta2))
