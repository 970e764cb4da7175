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
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ._adam_base import AdamFamilyOptimizer, compiled_adam_step
from ._compiled import Kernel, compiled_mode

__all__ = ["LaProp"]


class LaProp(AdamFamilyOptimizer):
    """LaProp (Ziyin, Wang & Ueda, 2020, arXiv:2002.04839); see the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (authors' default: 4e-4).
        betas: decay rates (beta1, beta2) of the first and second moments (authors' default: (0.9, 0.999)).
        eps: added to sqrt of the bias-corrected second moment (authors' default: 1e-15).
        weight_decay: decoupled weight decay coefficient; theta <- theta (1 - lr * weight_decay) each step.
        foreach: use the multi-tensor path; None picks it when all parameters share one device type.
        compiled: use the ``torch.compile``d kernel (one fused loop per tensor); None picks it for groups of
            at least 4M elements (:mod:`sgdlab.optim._compiled`), else ``foreach`` decides.
        maximize: ascend the objective instead of descending it.
    """

    def __init__(self, params: Iterable[Any], lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-15, weight_decay: float = 0.0, *, foreach: bool | None = None,
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
                raise ValueError("LaProp does not support sparse gradients; use dense gradients "
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
                compiled_adam_step(_LAPROP_KERNEL, mode, params, grads, steps, group, *states)
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in tensors[0]}) == 1
            (_foreach_laprop if foreach else _single_tensor_laprop)(*tensors, group)
        return loss


def _single_tensor_laprop(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        if group["maximize"]:
            g = -g
        step_t += 1
        t = step_t.item()
        if wd != 0:
            p.mul_(1 - lr * wd)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        m.mul_(beta1).addcdiv_(g, denom, value=1 - beta1)
        p.add_(m, alpha=-lr / (1 - beta1 ** t))


def _foreach_laprop(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    torch._foreach_add_(steps, 1)
    grouped = _group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (p_, g_, m_, v_, s_), _ in grouped.values():
        if group["maximize"]:
            g_ = torch._foreach_neg(g_)
        ts = [s.item() for s in s_]
        if wd != 0:
            torch._foreach_mul_(p_, 1 - lr * wd)
        torch._foreach_mul_(v_, beta2)
        torch._foreach_addcmul_(v_, g_, g_, value=1 - beta2)
        denom = torch._foreach_sqrt(v_)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(m_, beta1)
        torch._foreach_addcdiv_(m_, g_, denom, value=1 - beta1)
        torch._foreach_add_(p_, torch._foreach_mul(m_, [-lr / (1 - beta1 ** t) for t in ts]))


def _laprop_kernel(p, g, m, v, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float):
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m.mul_(beta1).add_(((1 - beta1) * bc2) * g / (v.sqrt() + eps_bc2))  # g / (sqrt(v) / bc2 + eps)
    p.copy_(p * decay - step_size * m)


_LAPROP_KERNEL = Kernel(_laprop_kernel, "LaProp")

