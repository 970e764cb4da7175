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

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ._adam_base import AdamFamilyOptimizer, compiled_adam_step
from ._compiled import Kernel, compiled_mode

__all__ = ["Grams"]


class Grams(AdamFamilyOptimizer):
    """Grams (Cao, Li & Song, 2024, arXiv:2412.17107); see the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (authors' default: 1e-3).
        betas: decay rates (beta1, beta2) of the first and second moments (authors' default: (0.9, 0.999)).
        eps: added to sqrt of the bias-corrected second moment (authors' default: 1e-6).
        weight_decay: decoupled weight decay coefficient; theta <- theta (1 - lr * weight_decay) each step.
        foreach: use the multi-tensor path; None picks it when all parameters share one device type.
        compiled: use the ``torch.compile``d kernel (one fused loop per tensor); None picks it for groups of
            at least 4M elements (:mod:`sgdlab.optim._compiled`), else ``foreach`` decides.
        maximize: ascend the objective instead of descending it.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, foreach: bool | None = None,
                 compiled: bool | None = None, maximize: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                        compiled=compiled, maximize=maximize)
        self._validate(defaults)
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any]):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("Grams does not support sparse gradients; use dense gradients "
                                 "(e.g. torch.nn.Embedding(..., sparse=False))")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (None without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors = self._init_group(group)
            if not tensors[0]:
                continue
            mode = compiled_mode(group.get("compiled"), [t for ts in tensors[:4] for t in ts])
            if mode:
                params, grads, *states, steps = tensors
                compiled_adam_step(_GRAMS_KERNEL, mode, params, grads, steps, group, *states)
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in tensors[0]}) == 1
            (_foreach_grams if foreach else _single_tensor_grams)(*tensors, group)
        return loss


def _single_tensor_grams(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        if group["maximize"]:
            g = -g
        step_t += 1
        t = step_t.item()
        if wd != 0:
            p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        magnitude = (m / denom).abs_()
        p.addcmul_(magnitude, g.sign(), value=-lr / (1 - beta1 ** t))


def _foreach_grams(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    torch._foreach_add_(steps, 1)
    grouped = _group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (p_, g_, m_, v_, s_), _ in grouped.values():
        if group["maximize"]:
            g_ = torch._foreach_neg(g_)
        ts = [s.item() for s in s_]
        if wd != 0:
            torch._foreach_mul_(p_, 1 - lr * wd)
        torch._foreach_lerp_(m_, g_, 1 - beta1)
        torch._foreach_mul_(v_, beta2)
        torch._foreach_addcmul_(v_, g_, g_, value=1 - beta2)
        denom = torch._foreach_sqrt(v_)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
        torch._foreach_add_(denom, eps)
        magnitude = torch._foreach_div(m_, denom)
        torch._foreach_abs_(magnitude)
        torch._foreach_addcmul_(p_, magnitude, torch._foreach_sign(g_), [-lr / (1 - beta1 ** t) for t in ts])


def _grams_kernel(p, g, m, v, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float):
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    magnitude = m.abs() / (v.sqrt() + eps_bc2)  # |m / (sqrt(v) / bc2 + eps)| / bc2
    p.copy_(p * decay - (step_size * bc2) * magnitude * g.sign())


_GRAMS_KERNEL = Kernel(_grams_kernel, "Grams")

