r"""SWAN: SGD with Whitening And Normalization, a stateless optimizer for matrix parameters.

Paper: Chao Ma, Wenbo Gong, Meyer Scetbon, Edward Meeds, "SWAN: SGD with Normalization and Whitening
Enables Stateless LLM Training", arXiv:2412.13148 (2024; ICML 2025).

For a matrix parameter ``W`` of shape ``m x n`` (``out x in``; a conv weight ``(out, in, kh, kw)`` is
viewed as ``(out, in*kh*kw)``) with gradient ``G``, each step (paper Algorithms 1-3)::

    GradNorm:       G~ = (G - gbar 1_n^T) / (s 1_n^T + eps)
                    gbar_i = mean_j G_ij,  s_i = sqrt(mean_j (G_ij - gbar_i)^2)   (each row standardised
                                                                                   across the input axis)
    GradWhitening:  D = (G~ G~^T)^{-1/2} G~   by coupled Newton-Schulz iterations:
                    A = G~ G~^T,  c = ||A||_F,  Y_0 = A / c,  Z_0 = I
                    T_k = (3 I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k   (k = 0..ns_steps-1)
                    D = Z_K G~ / sqrt(c)
    rescale:        D <- D ||G~||_F / ||D||_F          (optional; update RMS ~ 1 like Adam's)
    update:         W <- (1 - lr wd) W - lr D

No state is kept for matrices. When ``m > n`` the whitening is computed on the short side,
``G~ (G~^T G~)^{-1/2}``, which is the same matrix (the polar factor of ``G~``) and far cheaper.
Since GradNorm centres each row, ``G~`` is rank deficient when ``m >= n``; the iteration leaves the null
space untouched, so this is harmless. A consequence of the centring: with ``weight_decay=0`` SWAN never
changes the row sums of a matrix parameter (every update row sums to zero).

Non-matrix parameters (``ndim < 2``: biases, norm gains) and all parameters of a group with
``use_adamw=True`` are trained by AdamW at learning rate ``lr * adamw_lr_ratio``: the paper keeps Adam
for 1-D parameters and for the embedding and output layers, so put those in a ``use_adamw=True`` group.

Orientation: GradNorm standardises along the input axis, so it matters which axis that is. A group with
``orientation="in_out"`` holds weights stored ``(in, out)`` (transformers' ``Conv1D``, GPT-2); SWAN works on
their transpose, so such a weight gets exactly the transposed update of the equivalent ``nn.Linear``.
:func:`sgdlab.optim.param_groups` builds the groups for a model.

Defaults and where they come from: ``lr=1e-3`` (Adam-scale; with ``rescale=True`` the update has
entrywise RMS about 1, like Adam's); ``ns_steps=10`` coupled Newton-Schulz iterations; ``eps=1e-8``
guards the row std and the norms. We could not read the paper's algorithm box directly; the whitening
iteration, the row axis of GradNorm and the optional rescaling follow secondary descriptions of the paper
(a public summary of its update and a public re-implementation), so treat ``ns_steps`` and ``rescale``
as tunable. No ``pytorch_optimizer`` equivalent exists.
"""

from __future__ import annotations

import functools

import torch

from ._base import check_flag, defaults_from
from ._matrix import MatrixOptimizer, direction_step

__all__ = ["SWAN", "grad_norm", "grad_whitening"]


def grad_norm(g: torch.Tensor, eps: float) -> torch.Tensor:
    """GradNorm of a (batch of) matrix ``(..., m, n)``: standardise each row across its ``n`` entries."""
    centred = g - g.mean(dim=-1, keepdim=True)
    std = centred.square().mean(dim=-1, keepdim=True).sqrt()
    return centred / (std + eps)


def grad_whitening(g: torch.Tensor, ns_steps: int, eps: float) -> torch.Tensor:
    """``(G G^T)^{-1/2} G`` for a (batch of) matrix ``(..., m, n)`` by coupled Newton-Schulz iterations."""
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    a = x @ x.mT
    c = torch.linalg.matrix_norm(a, keepdim=True) + eps
    y = a / c
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = eye.expand_as(a)
    for _ in range(ns_steps):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    out = (z @ x) / c.sqrt()
    return out.mT if tall else out


class SWAN(MatrixOptimizer):
    """SWAN (Ma et al., 2024, arXiv:2412.13148): stateless GradNorm + GradWhitening for matrices,
    AdamW for the rest. See the module docstring."""

    def __init__(self, params, lr: float = 1e-3, ns_steps: int = 10, rescale: bool = True, eps: float = 1e-8,
                 weight_decay: float = 0.0, adamw_lr_ratio: float = 1.0,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8, use_adamw: bool = False,
                 orientation: str = "out_in", *, foreach: bool | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict) -> None:
        super()._validate(group)
        check_flag("rescale", group["rescale"])

    @staticmethod
    def _direction(g: torch.Tensor, group: dict) -> torch.Tensor:
        gn = grad_norm(g, group["eps"])
        d = grad_whitening(gn, group["ns_steps"], group["eps"])
        if group["rescale"]:
            d = d * (torch.linalg.matrix_norm(gn, keepdim=True)
                     / (torch.linalg.matrix_norm(d, keepdim=True) + group["eps"]))
        return d

    def _matrix_step(self, group, params, grads, foreach) -> None:
        direction = functools.partial(self._direction, group=group)
        direction_step(params, grads, direction, lr=group["lr"], weight_decay=group["weight_decay"], foreach=foreach,
                       orientation=group["orientation"])
