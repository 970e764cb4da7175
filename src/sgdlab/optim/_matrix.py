"""What the matrix optimizers share (Muon, SWAN, AuON, Hybrid-AuON, FRUGAL).

* the matrix/vector split: parameters with ``ndim >= 2`` (viewed as ``(out, in*kh*kw)`` matrices) get the
  method's own rule, every other parameter -- and every parameter of a group with ``use_adamw=True`` -- the
  internal AdamW (:func:`adamw_update`, state ``step``, ``exp_avg``, ``exp_avg_sq``);
* :class:`MatrixOptimizer`: the ``step`` of Muon, SWAN and AuON (split, AdamW part, then the method's
  :meth:`MatrixOptimizer._matrix_step`) and their shared hyperparameter checks;
* the pieces of a matrix step: heavy-ball :func:`momentum`, :func:`direction_step` (``W <- (1 - lr wd) W
  - lr s D(V)``, same-shaped matrices batched on the multi-tensor path), the quintic Newton-Schulz step and
  the shape helpers.

Each method's file keeps only its direction rule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..errors import check_range
from ._base import Optimizer, adam_denominator, buckets, check_betas, check_flag, use_foreach

__all__ = ["MatrixOptimizer", "NS_COEFFICIENTS", "adamw_update", "by_shape", "direction_step",
           "matrix_view", "momentum", "newton_schulz5_step", "split_matrix_params"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix: ``(out, in*kh*kw)`` for conv weights, unchanged for 2-D tensors."""
    return t.reshape(t.shape[0], -1)


def newton_schulz5_step(x: torch.Tensor) -> torch.Tensor:
    """One quintic Newton-Schulz step ``a X + (b A + c A^2) X`` with ``A = X X^T`` on the short side.

    ``x`` has shape ``(..., m, n)``; a batch of same-shaped matrices is handled in one call.
    """
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # fused baddbmm: one rounding per product in low precision, as torch.optim.Muon
    gram = x @ x.mT
    x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a).reshape(shape)
    return x.mT if tall else x


def by_shape(tensors: list[torch.Tensor]) -> dict:
    """Indices of ``tensors`` grouped by (matrix shape, device, dtype), for batching."""
    out: dict = defaultdict(list)
    for i, t in enumerate(tensors):
        out[(tuple(matrix_view(t).shape), t.device, t.dtype)].append(i)
    return out


def split_matrix_params(group: dict, params: list, grads: list):
    """(matrix params, their grads), (AdamW params, their grads) for ``group``."""
    mat, mat_g, vec, vec_g = [], [], [], []
    for p, g in zip(params, grads, strict=True):
        if p.ndim >= 2 and not group["use_adamw"]:
            mat.append(p)
            mat_g.append(g)
        else:
            vec.append(p)
            vec_g.append(g)
    return (mat, mat_g), (vec, vec_g)


def adamw_update(optimizer: torch.optim.Optimizer, params: list, grads: list, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, foreach: bool) -> None:
    """AdamW (decoupled weight decay, bias-corrected) on ``params``; state: step, exp_avg, exp_avg_sq."""
    if not params:
        return
    beta1, beta2 = betas
    states = [optimizer.state[p] for p in params]
    for p, st in zip(params, states, strict=True):
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    ts = [s.item() for s in steps]
    for idx in buckets(params, foreach, ts):
        t, ps, ms = ts[idx[0]], [params[i] for i in idx], [states[i]["exp_avg"] for i in idx]
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        denom = adam_denominator(ms, [states[i]["exp_avg_sq"] for i in idx], [grads[i] for i in idx], t, beta1,
                                 beta2, eps)
        torch._foreach_addcdiv_(ps, ms, denom, -lr / (1 - beta1 ** t))


def momentum(optimizer: torch.optim.Optimizer, params: list, grads: list, beta: float, nesterov: bool,
             foreach: bool) -> list[torch.Tensor]:
    """``M <- lerp(M, g, 1 - beta)`` (state ``momentum_buffer``); returns ``V = lerp(g, M, beta)`` with
    ``nesterov``, else ``M``."""
    bufs = []
    for p in params:
        st = optimizer.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs.append(st["momentum_buffer"])
    vs = list(bufs)
    for idx in buckets(params, foreach):
        b, g = [bufs[i] for i in idx], [grads[i] for i in idx]
        torch._foreach_lerp_(b, g, 1 - beta)
        if nesterov:
            for i, v in zip(idx, torch._foreach_lerp(g, b, beta), strict=True):
                vs[i] = v
    return vs


def direction_step(params: list, vs: list, direction: Callable[[torch.Tensor], torch.Tensor], *, lr: float,
                   weight_decay: float, foreach: bool, scales: list[float] | None = None) -> None:
    """``W <- (1 - lr wd) W - lr * scale * direction(matrix_view(V))`` for each matrix ``W`` and its ``V``.

    ``direction`` maps a batch ``(..., m, n)`` to same-shaped updates; with ``foreach`` same-shaped matrices
    are batched (one call per shape). ``scales=None``: scale 1 (the update is added with ``alpha=-lr``)."""
    if not foreach:
        for i, (p, v) in enumerate(zip(params, vs, strict=True)):
            u = direction(matrix_view(v))
            p.mul_(1 - lr * weight_decay)
            p.add_(u.view_as(p).to(p.dtype), alpha=-lr * (1.0 if scales is None else scales[i]))
        return
    updates: list = [None] * len(params)
    for idx in by_shape(vs).values():  # batch same-shaped matrices
        u = direction(torch.stack([matrix_view(vs[i]) for i in idx]))
        for j, i in enumerate(idx):
            updates[i] = u[j].view_as(params[i]).to(params[i].dtype)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if scales is None:
        torch._foreach_add_(params, updates, alpha=-lr)
    else:
        torch._foreach_mul_(updates, [-lr * s for s in scales])
        torch._foreach_add_(params, updates)


class MatrixOptimizer(Optimizer):
    """A method for the matrix parameters, AdamW (``lr * adamw_lr_ratio``, ``adamw_betas``, ``adamw_eps``, the
    group's ``weight_decay``) for the others (module docstring). Subclasses write :meth:`_matrix_step`."""

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_range("adamw_lr_ratio", group["adamw_lr_ratio"], low=0.0)
        group["adamw_betas"] = check_betas(group["adamw_betas"], "adamw_betas")
        check_range("adamw_eps", group["adamw_eps"], low=0.0, low_open=True)
        check_flag("use_adamw", group["use_adamw"])
        if "momentum" in group:
            check_range("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        if "nesterov" in group:
            check_flag("nesterov", group["nesterov"])
        if "ns_steps" in group:
            check_range("ns_steps", group["ns_steps"], low=1, high=100, integer=True)
        if "eps" in group:
            check_range("eps", group["eps"], low=0.0, low_open=True)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [-p.grad if group["maximize"] else p.grad for p in params]
        foreach = use_foreach(group["foreach"], params)
        (mat, mat_g), (vec, vec_g) = split_matrix_params(group, params, grads)
        adamw_update(self, vec, vec_g, lr=group["lr"] * group["adamw_lr_ratio"], betas=group["adamw_betas"],
                     eps=group["adamw_eps"], weight_decay=group["weight_decay"], foreach=foreach)
        if mat:
            self._matrix_step(group, mat, mat_g, foreach)

    def _matrix_step(self, group: dict[str, Any], params: list, grads: list, foreach: bool) -> None:
        raise NotImplementedError
