"""What the Byzantine-robust rules share: stacking, finiteness, pairwise distances, the bound on f.

A worker vector with a NaN or an infinity is treated as infinitely far from every other vector (its
distances are +inf), so a rule that tolerates f bad vectors never lets it reach its output.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def stack(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The ``n × d`` matrix of the vectors (their dtype and device)."""
    return torch.stack(list(vectors))


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows of ``x`` hold finite numbers only (a bool vector)."""
    return torch.isfinite(x).all(dim=1)


def nan_to_inf(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN read as +inf, so that a sort puts it last (a copy only when there is a NaN)."""
    nan = torch.isnan(x)
    return torch.where(nan, torch.full_like(x, float("inf")), x) if bool(nan.any()) else x


def distances(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``n × n`` Euclidean distances between the rows of ``x``; +inf for every pair with a row that is
    not ``ok`` (non-finite) and for any distance that overflows. The diagonal is 0."""
    d = torch.cdist(x.unsqueeze(0), x.unsqueeze(0)).squeeze(0)
    bad = ~ok
    d = torch.where(bad.unsqueeze(0) | bad.unsqueeze(1) | torch.isnan(d), torch.full_like(d, float("inf")), d)
    return d.fill_diagonal_(0.0)


def zero_bad(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``x`` with its non-finite rows set to 0, for products where they have weight 0 (0 · NaN is NaN)."""
    return x if bool(ok.all()) else torch.where(ok.unsqueeze(1), x, torch.zeros_like(x))


def check_f(rule: str, f: int, n: int, ok: bool, bound: str) -> None:
    """Raise unless ``ok``: the bound on f (``bound``, e.g. ``"n > 2f"``) of ``rule`` (``"aggregator krum"``)
    holds for ``n`` vectors."""
    if not ok:
        raise ConfigError(f"{rule}: f={f} with n={n} vectors breaks its bound {bound}; "
                          f"use fewer assumed Byzantine workers (f) or more workers")
