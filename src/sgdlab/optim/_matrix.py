"""What the matrix optimizers share (Muon, SWAN, AuON, Hybrid-AuON, FRUGAL).

* the matrix/vector split: parameters with ``ndim >= 2`` (viewed as ``(out, in*kh*kw)`` matrices) get the
  method's own rule, every other parameter -- and every parameter of a group with ``use_adamw=True`` -- the
  internal AdamW (:func:`adamw_update`, state ``step``, ``exp_avg``, ``exp_avg_sq``);
* the orientation of a group's matrices (group key ``orientation``, :data:`ORIENTATIONS`): ``"out_in"``
  (default) for weights stored ``(out, in)`` as ``nn.Linear``'s and conv weights, ``"in_out"`` for weights
  stored ``(in, out)`` as transformers' ``Conv1D``'s: :func:`matrix_view` then views the transpose, so the
  method sees the same ``(out, in)`` matrix as for the equivalent ``nn.Linear`` and the parameter gets
  exactly the transposed update (Muon's and AuON's shape factor, SWAN's row axis and FRUGAL's projection side
  all follow). Muon, SWAN, AuON, Hybrid-AuON and FRUGAL honour it;
* :func:`param_groups`: the groups for a model -- embeddings, a tied output head, the input and output layers,
  norms and biases on the AdamW side, each matrix with its orientation (the CLI's ``io_adamw`` uses
  :func:`io_parameters`, the same rule for the input and output layers);
* :class:`MatrixOptimizer`: the ``step`` of Muon, SWAN and AuON (split, AdamW part, then the method's
  :meth:`MatrixOptimizer._matrix_step`) and their shared hyperparameter checks;
* the pieces of a matrix step: heavy-ball :func:`momentum`, :func:`direction_step` (``W <- (1 - lr wd) W
  - lr s D(V)``, same-shaped matrices batched on the multi-tensor path), the quintic Newton-Schulz step and
  the shape helpers.

Each method's file keeps only its direction rule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, check_range
from ._base import Optimizer, adam_denominator, buckets, check_betas, check_flag, use_foreach

__all__ = ["MatrixOptimizer", "NS_COEFFICIENTS", "ORIENTATIONS", "adamw_update", "by_shape", "check_orientation",
           "direction_step", "io_parameters", "matrix_shape", "matrix_view", "momentum", "newton_schulz5_step",
           "param_groups", "split_matrix_params", "unview"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

#: values of the group key ``orientation``: how a group's ``ndim >= 2`` parameters store their matrix
ORIENTATIONS = ("out_in", "in_out")


def check_orientation(value: Any) -> str:
    """``value`` if it is one of :data:`ORIENTATIONS`, else a ConfigError naming ``orientation``."""
    if not isinstance(value, str) or value not in ORIENTATIONS:
        raise ConfigError(f"orientation must be one of {ORIENTATIONS} ('out_in': stored (out, in) as nn.Linear's "
                          f"weight; 'in_out': stored (in, out) as transformers' Conv1D's), got {value!r}")
    return value


def matrix_view(t: torch.Tensor, orientation: str = "out_in") -> torch.Tensor:
    """``t`` as an ``(out, in)`` matrix: ``(out, in*kh*kw)`` for conv weights, unchanged for 2-D tensors; with
    ``orientation="in_out"`` (``t`` stored ``(in, out)``, transformers' ``Conv1D``) the contiguous transpose of
    that, so the method computes on exactly the matrix it would see for the equivalent ``nn.Linear``."""
    m = t.reshape(t.shape[0], -1)
    return m.mT.contiguous() if orientation == "in_out" else m


def matrix_shape(t: torch.Tensor, orientation: str = "out_in") -> tuple[int, int]:
    """``(m, n)``: the shape of :func:`matrix_view` of ``t`` (without building the view)."""
    m, n = t.shape[0], t.numel() // max(t.shape[0], 1)
    return (n, m) if orientation == "in_out" else (m, n)


def unview(u: torch.Tensor, like: torch.Tensor, orientation: str = "out_in") -> torch.Tensor:
    """The inverse of :func:`matrix_view`: matrix ``u`` back in the shape of ``like`` (transposed for ``in_out``)."""
    return (u.mT if orientation == "in_out" else u).reshape(like.shape)


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


def by_shape(tensors: list[torch.Tensor], orientation: str = "out_in") -> dict:
    """Indices of ``tensors`` grouped by (matrix shape, device, dtype), for batching."""
    out: dict = defaultdict(list)
    for i, t in enumerate(tensors):
        out[(matrix_shape(t, orientation), t.device, t.dtype)].append(i)
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
                   weight_decay: float, foreach: bool, scales: list[float] | None = None,
                   orientation: str = "out_in") -> None:
    """``W <- (1 - lr wd) W - lr * scale * direction(matrix_view(V))`` for each matrix ``W`` and its ``V``.

    ``direction`` maps a batch ``(..., m, n)`` to same-shaped updates; with ``foreach`` same-shaped matrices
    are batched (one call per shape). ``scales=None``: scale 1 (the update is added with ``alpha=-lr``).
    ``orientation``: that of the group (:func:`matrix_view`); the update is mapped back with :func:`unview`."""
    if not foreach:
        for i, (p, v) in enumerate(zip(params, vs, strict=True)):
            u = direction(matrix_view(v, orientation))
            p.mul_(1 - lr * weight_decay)
            p.add_(unview(u, p, orientation).to(p.dtype), alpha=-lr * (1.0 if scales is None else scales[i]))
        return
    updates: list = [None] * len(params)
    for idx in by_shape(vs, orientation).values():  # batch same-shaped matrices
        u = direction(torch.stack([matrix_view(vs[i], orientation) for i in idx]))
        for j, i in enumerate(idx):
            updates[i] = unview(u[j], params[i], orientation).to(params[i].dtype)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if scales is None:
        torch._foreach_add_(params, updates, alpha=-lr)
    else:
        torch._foreach_mul_(updates, [-lr * s for s in scales])
        torch._foreach_add_(params, updates)


class MatrixOptimizer(Optimizer):
    """A method for the matrix parameters, AdamW (``lr * adamw_lr_ratio``, ``adamw_betas``, ``adamw_eps``, the
    group's ``weight_decay``) for the others (module docstring). Subclasses write :meth:`_matrix_step`, which
    honours the group's ``orientation`` (views matrices with :func:`matrix_view`)."""

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_range("adamw_lr_ratio", group["adamw_lr_ratio"], low=0.0)
        group["adamw_betas"] = check_betas(group["adamw_betas"], "adamw_betas")
        check_range("adamw_eps", group["adamw_eps"], low=0.0, low_open=True)
        check_flag("use_adamw", group["use_adamw"])
        check_orientation(group["orientation"])
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


# parameter groups for a model
# --------------------------------------------------------------------------------------------------------

def _owned(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters(recurse=False)]


def io_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the input and output layers: every embedding, the first and the last module that owns
    parameters (an output head tied to an embedding is that embedding's weight), each once, in that order.
    Matrix optimizers (Muon, AuON, SWAN) leave these to AdamW in their papers; :func:`param_groups` does that
    for a model, ``--set io_adamw=true`` for the CLI's tasks."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    chosen = [m for m in owners if isinstance(m, nn.Embedding)] + owners[:1] + owners[-1:]
    return list({id(p): p for p in _owned(chosen)}.values())


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (a linear layer storing its weight ``(in, out)``), found without importing it."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.ndim == 2 and m.weight.shape[-1] == m.nf


def _is_adamw_module(m: nn.Module) -> bool:
    """Embeddings (``nn.Embedding``, ``nn.EmbeddingBag`` and subclasses) and normalisation layers."""
    name = type(m).__name__
    return isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or "Norm" in name or "Embedding" in name


def param_groups(model: nn.Module, *, io_layers: bool = True,
                 adamw_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` for a matrix optimizer (Muon, SWAN, AuON, Hybrid-AuON, FRUGAL).

    What the papers do, in the groups' keys those optimizers honour:

    * the AdamW group (``adamw_options``, default ``{"use_adamw": True}``; for FRUGAL pass
      ``{"split": False}``): every parameter of an embedding (``nn.Embedding``/``nn.EmbeddingBag``, or a module
      whose class name has ``Embedding``) -- so an output head tied to it too, it is the same Parameter --, of a
      normalisation layer (class name with ``Norm``), every parameter with ``ndim < 2`` (biases, gains) and,
      with ``io_layers``, the input and output layers of :func:`io_parameters` (the first and the last module
      owning parameters: an untied output head, a CNN's first conv);
    * ``{"params": [...]}`` (``orientation="out_in"``, the default): the other matrices stored ``(out, in)``
      -- ``nn.Linear``, conv weights (viewed ``(out, in*kh*kw)``), anything else with ``ndim >= 2``;
    * ``{"params": [...], "orientation": "in_out"}``: the weights of transformers' ``Conv1D`` (GPT-2 style,
      stored ``(in, out)``; recognised by class name and its ``nf`` attribute, transformers is not imported),
      which then get exactly the transposed update of the equivalent ``nn.Linear``.

    Empty groups are left out; each parameter appears once (shared ones at their first owner), in
    ``model.modules()`` order. Extra keys of a group (its ``lr``, ``weight_decay``, ...) are yours to add::

        opt = sgdlab.optim.Muon(sgdlab.optim.param_groups(gpt2), lr=0.02)
    """
    adamw_options = {"use_adamw": True} if adamw_options is None else dict(adamw_options)
    if "params" in adamw_options:
        raise ConfigError("adamw_options are the AdamW group's hyperparameters; its params are chosen by "
                          "param_groups")
    to_adamw = {id(p) for p in io_parameters(model)} if io_layers else set()
    kinds: dict[int, tuple[nn.Parameter, str]] = {}  # id -> (parameter, "adamw" | orientation), first owner wins
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in kinds:
                if _is_adamw_module(m):  # e.g. an embedding tied to an earlier head
                    kinds[id(p)] = (p, "adamw")
                continue
            if id(p) in to_adamw or p.ndim < 2 or _is_adamw_module(m):
                kinds[id(p)] = (p, "adamw")
            else:
                kinds[id(p)] = (p, "in_out" if _is_conv1d(m) and p is m.weight else "out_in")
    groups = [{"params": [p for p, k in kinds.values() if k == "out_in"]},
              {"params": [p for p, k in kinds.values() if k == "in_out"], "orientation": "in_out"},
              {"params": [p for p, k in kinds.values() if k == "adamw"], **adamw_options}]
    return [g for g in groups if g["params"]]
