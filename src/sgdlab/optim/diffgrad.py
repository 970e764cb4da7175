"""diffGrad: Adam whose first moment is damped where consecutive gradients agree.

Reference: Shiv Ram Dubey, Soumendu Chakraborty, Swalpa Kumar Roy, Snehasis Mukherjee, Satish Kumar Singh,
Bidyut Baran Chaudhuri, "diffGrad: An Optimization Method for Convolutional Neural Networks", IEEE TNNLS
2020, arXiv:1909.11015.

Update rule (per element; t counts this parameter's steps, g_0 = 0)::

    m_t   = beta1 m_{t-1} + (1 - beta1) g_t
    v_t   = beta2 v_{t-1} + (1 - beta2) g_t^2
    m^_t  = m_t / (1 - beta1^t),   v^_t = v_t / (1 - beta2^t)
    xi_t  = sigmoid(|g_{t-1} - g_t|)                    (the "diffGrad friction coefficient", in [0.5, 1))
    theta_t = theta_{t-1} - lr * xi_t * m^_t / (sqrt(v^_t) + eps)

Defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-8 are the paper's (Adam's) settings and the authors' code.

Weight decay: the paper has none; the authors' code adds an L2 term to the gradient. We offer decoupled
(AdamW-style) decay instead, applied before the update: theta <- theta * (1 - lr * weight_decay).

Difference from ``pytorch_optimizer.DiffGrad`` (and the authors' code): they use Adam's "efficient" form
lr * sqrt(1 - beta2^t) / (1 - beta1^t) * xi m / (sqrt(v) + eps), which puts eps on the uncorrected
sqrt(v) (and they add 1e-15 inside the square root). We follow the paper and add eps to sqrt(v^_t). The two
coincide when eps = 0.

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

__all__ = ["DiffGrad"]


class DiffGrad(AdamFamilyOptimizer):
    """diffGrad (Dubey et al., 2020, arXiv:1909.11015); see the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (paper: 1e-3).
        betas: decay rates (beta1, beta2) of the first and second moments (paper: (0.9, 0.999)).
        eps: added to sqrt of the bias-corrected second moment (paper: 1e-8).
        weight_decay: decoupled weight decay coefficient; theta <- theta (1 - lr * weight_decay) each step.
        foreach: use the multi-tensor path; None picks it when all parameters share one device type.
        compiled: use the ``torch.compile``d kernel (one fused loop per tensor); None picks it for groups of
            at least 4M elements (:mod:`sgdlab.optim._compiled`), else ``foreach`` decides.
        maximize: ascend the objective instead of descending it.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, foreach: bool | None = None,
                 compiled: bool | None = None, maximize: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                        compiled=compiled, maximize=maximize)
        self._validate(defaults)
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any]):
        params, grads, exp_avgs, exp_avg_sqs, prev_grads, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("DiffGrad does not support sparse gradients; use dense gradients "
                                 "(e.g. torch.nn.Embedding(..., sparse=False))")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            prev_grads.append(state["prev_grad"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, prev_grads, steps

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
            mode = compiled_mode(group.get("compiled"), [t for ts in tensors[:5] for t in ts])
            if mode:
                params, grads, *states, steps = tensors
                compiled_adam_step(_DIFFGRAD_KERNEL, mode, params, grads, steps, group, *states)
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in tensors[0]}) == 1
            (_foreach_diffgrad if foreach else _single_tensor_diffgrad)(*tensors, group)
        return loss


def _single_tensor_diffgrad(params, grads, exp_avgs, exp_avg_sqs, prev_grads, steps, group) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    for p, g, m, v, prev, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, prev_grads, steps, strict=True):
        if group["maximize"]:
            g = -g
        step_t += 1
        t = step_t.item()
        if wd != 0:
            p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        xi = (prev - g).abs_().sigmoid_()
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        p.addcdiv_(xi.mul_(m), denom, value=-lr / (1 - beta1 ** t))
        prev.copy_(g)


def _foreach_diffgrad(params, grads, exp_avgs, exp_avg_sqs, prev_grads, steps, group) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    torch._foreach_add_(steps, 1)
    grouped = _group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, prev_grads, steps])
    for (p_, g_, m_, v_, prev_, s_), _ in grouped.values():
        if group["maximize"]:
            g_ = torch._foreach_neg(g_)
        ts = [s.item() for s in s_]
        if wd != 0:
            torch._foreach_mul_(p_, 1 - lr * wd)
        torch._foreach_lerp_(m_, g_, 1 - beta1)
        torch._foreach_mul_(v_, beta2)
        torch._foreach_addcmul_(v_, g_, g_, value=1 - beta2)
        xi = torch._foreach_sub(prev_, g_)
        torch._foreach_abs_(xi)
        torch._foreach_sigmoid_(xi)
        torch._foreach_mul_(xi, m_)
        denom = torch._foreach_sqrt(v_)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p_, xi, denom, [-lr / (1 - beta1 ** t) for t in ts])
        torch._foreach_copy_(prev_, g_)


def _diffgrad_kernel(p, g, m, v, prev, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float):
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # xi m / (sqrt(v) / bc2 + eps) with xi = 1 / (1 + exp(-|prev - g|)), as one division
    p.copy_(p * decay - (step_size * bc2) * m / ((1 + (-(prev - g).abs()).exp()) * (v.sqrt() + eps_bc2)))
    prev.copy_(g)


_DIFFGRAD_KERNEL = Kernel(_diffgrad_kernel, "DiffGrad")

