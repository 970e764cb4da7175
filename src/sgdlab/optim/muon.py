r"""Muon: MomentUm Orthogonalized by Newton-Schulz, for the matrix parameters of hidden layers.

Sources: Keller Jordan, Yuchen Jin, Vlado Boza, Jiacheng You, Franz Cesista, Laker Newhouse, Jeremy Bernstein,
"Muon: An optimizer for hidden layers in neural networks" (blog post, 2024,
kellerjordan.github.io/posts/muon, code github.com/KellerJordan/Muon); and Jingyuan Liu et al. (Moonshot AI),
"Muon is Scalable for LLM Training", arXiv:2502.16982 (2025), for decoupled weight decay and the
AdamW-RMS-matching learning-rate scale.

Update for a matrix parameter ``W`` (``m x n``; a conv weight ``(out, in, kh, kw)`` is viewed as
``(out, in*kh*kw)``) with gradient ``g_t``::

    M_t = beta M_{t-1} + (1 - beta) g_t                         (momentum buffer, EMA form)
    V_t = (1 - beta) g_t + beta M_t   if nesterov else M_t
    O_t = NS_k(V_t):  X_0 = V_t / (||V_t||_F + eps),
                      X_{j+1} = a X_j + (b A_j + c A_j^2) X_j,  A_j = X_j X_j^T   (on the short side)
                      with (a, b, c) = (3.4445, -4.7750, 2.0315), k = ns_steps
    W_t = (1 - lr wd) W_{t-1} - lr s(m, n) O_t

Shape factor ``s``: ``adjust_lr="original"`` uses Keller Jordan's ``sqrt(max(1, m/n))`` (also the default of
``torch.optim.Muon``); ``adjust_lr="match_rms_adamw"`` uses Moonlight's ``0.2 sqrt(max(m, n))`` (arXiv:2502.16982,
"consistent update RMS"), which gives the update an entrywise RMS of about 0.2, like AdamW's, so AdamW's lr and
weight decay carry over. ``m, n`` are the matrix-view sizes; Keller's code computes the ratio from the last two
dims of the raw gradient, which for a conv weight is ``kh/kw`` -- we use the matrix view, as pytorch_optimizer does.

The blog's algorithm box writes the momentum as a sum, ``B_t = mu B_{t-1} + g_t`` (Nesterov: ``g_t + mu B_t``).
That is ``(1 - beta)^{-1}`` times the EMA form above, and NS_k is scale invariant up to ``eps``, so both give the
same step; we keep the EMA form of Keller's current code and of ``torch.optim.Muon`` so ``momentum_buffer`` is
interchangeable with theirs.

Newton-Schulz runs in the parameter dtype by default (so float64 is exact to rounding); ``ns_dtype="bfloat16"``
casts to bfloat16 first, as the reference code and ``torch.optim.Muon`` always do.

Other parameters: Muon is meant only for hidden-layer matrices. Parameters with ``ndim < 2`` (biases, norm
gains) and every parameter of a group with ``use_adamw=True`` (put embeddings and the output head there, as
the blog advises) are trained by AdamW with learning rate ``lr * adamw_lr_ratio``, betas ``adamw_betas``,
``adamw_eps`` and the group's ``weight_decay``.

Orientation: ``m x n`` is ``out x in``. A group with ``orientation="in_out"`` holds weights stored ``(in, out)``
(transformers' ``Conv1D``, GPT-2); Muon works on their transpose, so such a weight gets exactly the transposed
update of the equivalent ``nn.Linear`` (same shape factor). :func:`sgdlab.optim.param_groups` builds the
groups for a model.

Defaults and where they come from: ``lr=0.02, momentum=0.95, nesterov=True, ns_steps=5`` and the NS
coefficients are the blog's and reference code's; ``weight_decay=0`` is the reference code's default
(Moonlight uses 0.1 together with ``adjust_lr="match_rms_adamw"`` and AdamW-scale lr); ``eps=1e-7`` as in the
reference code (``X / (||X|| + eps)``; ``torch.optim.Muon`` clamps the norm at ``eps`` instead).
The AdamW settings ``adamw_betas=(0.9, 0.95), adamw_eps=1e-10`` and ``adamw_lr_ratio=0.015`` (3e-4 / 0.02)
come from the reference code's ``MuonWithAuxAdam`` example.

``torch.optim.Muon`` (torch 2.13) takes 2-D parameters only and has no AdamW part. Differences from
``pytorch_optimizer.Muon``: it always runs NS in bfloat16 (as ``torch.optim.Muon`` does), its
groups must carry ``use_muon`` and AdamW groups take their own absolute ``lr``; with 2-D/conv weights, equal
hyperparameters and ``ns_dtype="bfloat16"`` the steps agree to bfloat16 rounding.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import ConfigError
from ._base import defaults_from
from ._matrix import MatrixOptimizer, direction_step, matrix_shape, momentum, newton_schulz5_step

__all__ = ["Muon", "orthogonalize"]

ADJUST_LR = ("original", "match_rms_adamw")
NS_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def orthogonalize(x: torch.Tensor, ns_steps: int = 5, eps: float = 1e-7, ns_dtype: str | None = None) -> torch.Tensor:
    """``NS_k(x)``: approximate polar factor of a (batch of) matrix ``(..., m, n)`` by quintic Newton-Schulz.

    Computed in ``ns_dtype`` (``None``: ``x.dtype``) and returned in that dtype.
    """
    dtype = NS_DTYPES[ns_dtype]
    if dtype is not None:
        x = x.to(dtype)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(ns_steps):
        x = newton_schulz5_step(x)
    return x


def shape_factor(p: torch.Tensor, adjust_lr: str, orientation: str = "out_in") -> float:
    """Multiplier of ``lr`` for the orthogonalised update of ``p`` (sizes of its matrix view)."""
    m, n = matrix_shape(p, orientation)
    if adjust_lr == "original":
        return math.sqrt(max(1.0, m / n))
    return 0.2 * math.sqrt(max(m, n))


class Muon(MatrixOptimizer):
    """Muon (Jordan et al., 2024; Liu et al., 2025, arXiv:2502.16982): Newton-Schulz-orthogonalised Nesterov
    momentum for matrices (conv weights flattened), AdamW for the rest. See the module docstring."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7, adjust_lr: str = "original",
                 ns_dtype: str | None = None, adamw_lr_ratio: float = 0.015,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-10, use_adamw: bool = False,
                 orientation: str = "out_in", *, foreach: bool | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict) -> None:
        super()._validate(group)
        if group["adjust_lr"] not in ADJUST_LR:
            raise ConfigError(f"adjust_lr must be one of {ADJUST_LR}, got {group['adjust_lr']!r}")
        if group["ns_dtype"] not in NS_DTYPES:
            raise ConfigError(f"ns_dtype must be one of {tuple(NS_DTYPES)}, got {group['ns_dtype']!r}")

    def _matrix_step(self, group, params, grads, foreach) -> None:
        vs = momentum(self, params, grads, group["momentum"], group["nesterov"], foreach)
        direction = functools.partial(orthogonalize, ns_steps=group["ns_steps"], eps=group["eps"],
                                      ns_dtype=group["ns_dtype"])
        direction_step(params, vs, direction, lr=group["lr"], weight_decay=group["weight_decay"], foreach=foreach,
                       scales=[shape_factor(p, group["adjust_lr"], group["orientation"]) for p in params],
                       orientation=group["orientation"])
