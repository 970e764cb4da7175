r"""AuON and Hybrid-AuON: linear-time alternatives to Muon's orthogonalised momentum.

Paper: Dipan Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
arXiv:2509.24320 (2025; v1). Code: github.com/ryyzn9/AuON.

Update rule for a matrix parameter ``W`` (shape ``m x n``; a conv weight ``(out, in, kh, kw)`` is
viewed as ``(out, in*kh*kw)``), with gradient ``g_t``::

    M_t   = beta M_{t-1} + (1 - beta) g_t                       (momentum buffer, as in Muon)
    V_t   = (1 - beta) g_t + beta M_t   if nesterov else M_t
    G_t   = V_t / (||V_t||_F + 1e-7)                            (unit Frobenius norm)
    U_t   = G_t / (sqrt(mean_ij cosh(G_t)_ij^2) + 1e-8)         (cosh-RMS "brake", linear time)
    W_t   = (1 - lr wd) W_{t-1} - lr sqrt(max(1, m/n)) U_t

Since ``||G_t||_2 <= ||G_t||_F = 1`` and ``cosh >= 1``, ``||U_t||_2 < 1``: the step stays inside a
spectral-norm trust region without any matrix factorisation; the cosh RMS grows with heavy-tailed
entries and so shrinks spiky updates harder.

Hybrid-AuON applies one quintic Newton-Schulz step (Muon's coefficients
``(a, b, c) = (3.4445, -4.7750, 2.0315)``) to the normalised momentum before the cosh-RMS scaling::

    X = V_t / (||V_t||_F + 1e-7);   X <- a X + (b X X^T + c (X X^T)^2) X   (on the short side)
    then G_t = X / (||X||_F + 1e-7) and U_t as above.

Non-matrix parameters (biases, norm gains, anything with ``ndim < 2``) and every parameter of a group
with ``use_adamw=True`` (the paper's and the reference code's choice for embeddings and the output
head) are updated by AdamW with the same betas/eps semantics as ``torch.optim.AdamW`` and learning rate
``lr * adamw_lr_ratio``. The reference code trains small parameters with Adam at lr 0.008 next to AuON
at lr 0.08, hence ``adamw_lr_ratio=0.1``.

Orientation: ``m x n`` is ``out x in``. A group with ``orientation="in_out"`` holds weights stored ``(in, out)``
(transformers' ``Conv1D``, GPT-2); AuON works on their transpose, so such a weight gets exactly the transposed
update of the equivalent ``nn.Linear`` (same ``sqrt(max(1, m/n))``). :func:`sgdlab.optim.param_groups` builds
the groups for a model.

Defaults: ``lr=0.08, momentum=0.95, weight_decay=0.01`` come from the repository's README example;
``nesterov=True`` and the ``1e-7``/``1e-8`` constants from the paper's description and code;
``adamw_betas=(0.8, 0.95)`` from the README's Adam for small parameters.
Difference from the reference repository's ``optimizer.py``: that file multiplies the normalised
momentum by an extra ``gamma=1.5`` inside ``cosh`` and divides the *unnormalised* momentum by the RMS;
we follow the paper's formula above (unit-Frobenius ``G_t`` inside and outside ``cosh``).
No ``pytorch_optimizer`` equivalent exists.
"""

from __future__ import annotations

import math

import torch

from ._base import defaults_from
from ._matrix import MatrixOptimizer, direction_step, matrix_shape, momentum, newton_schulz5_step

__all__ = ["AuON", "HybridAuON"]

_NORM_EPS = 1e-7
_RMS_EPS = 1e-8


class AuON(MatrixOptimizer):
    """AuON (Maity, 2025, arXiv:2509.24320): momentum normalised to unit Frobenius norm, then divided by
    the RMS of its elementwise cosh; AdamW for non-matrix parameters. See the module docstring."""

    _hybrid = False

    def __init__(self, params, lr: float = 0.08, momentum: float = 0.95, weight_decay: float = 0.01,
                 nesterov: bool = True, adamw_lr_ratio: float = 0.1, adamw_betas: tuple[float, float] = (0.8, 0.95),
                 adamw_eps: float = 1e-8, use_adamw: bool = False, orientation: str = "out_in", *,
                 foreach: bool | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    def _direction(self, v: torch.Tensor) -> torch.Tensor:
        """``U`` from the (batched, ``(..., m, n)``) momentum direction ``v``."""
        if self._hybrid:
            v = newton_schulz5_step(v / (torch.linalg.matrix_norm(v, keepdim=True) + _NORM_EPS))
        g = v / (torch.linalg.matrix_norm(v, keepdim=True) + _NORM_EPS)
        rms = torch.cosh(g).square().mean(dim=(-2, -1), keepdim=True).sqrt()
        return g / (rms + _RMS_EPS)

    def _matrix_step(self, group, params, grads, foreach) -> None:
        vs = momentum(self, params, grads, group["momentum"], group["nesterov"], foreach)
        shapes = [matrix_shape(p, group["orientation"]) for p in params]
        scales = [math.sqrt(max(1.0, m / n)) for m, n in shapes]
        direction_step(params, vs, self._direction, lr=group["lr"], weight_decay=group["weight_decay"],
                       foreach=foreach, scales=scales, orientation=group["orientation"])


class HybridAuON(AuON):
    """Hybrid-AuON (Maity, 2025, arXiv:2509.24320): AuON with one quintic Newton-Schulz step applied to
    the Frobenius-normalised momentum before the cosh-RMS scaling. See the module docstring."""

    _hybrid = True
