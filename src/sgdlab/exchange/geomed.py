"""``geomed``: the geometric median, by the smoothed Weiszfeld algorithm.

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning" (RFA), IEEE TSP 2022
(arXiv:1912.13445); Weiszfeld, 1937. The geometric median minimises Σ_i ‖z − x_i‖; smoothed Weiszfeld
iterates

    β_i = 1 / max(ν, ‖z − x_i‖),    z ← Σ_i β_i x_i / Σ_i β_i,

(ν > 0 keeps the weights bounded near a data point) until the objective g(z) = Σ_i max(ν, ‖z − x_i‖)
improves by less than ``tol`` · g(z), at most ``max_iter`` times. Here z starts at the coordinate-wise
median (robust, so few iterations are needed even when some vectors are far away). Robust for f < n/2
(breakdown point 1/2). A non-finite vector has weight 0 (it is infinitely far).

ByzFL's ``GeometricMedian(nu=0.1, T=3)`` starts from the zero vector and runs exactly T iterations
without a stopping test, so its values differ from a converged geometric median.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ._robust import finite_rows, stack
from .base import Aggregator
from .median import Median


@dataclass
class GeoMedOptions:
    nu: float = 1e-6      # smoothing: distances below nu count as nu
    tol: float = 1e-6     # stop when the objective improves by less than tol · objective
    max_iter: int = 100   # Weiszfeld iterations at most

    def validate(self) -> None:
        check_range("geomed nu", self.nu, low=0, low_open=True)
        check_range("geomed tol", self.tol, low=0)
        check_range("geomed max_iter", self.max_iter, low=1, integer=True)


class GeoMed(Aggregator):
    name = "geomed"
    description = "geometric median by smoothed Weiszfeld (Pillutla et al., RFA): robust for f < n/2"
    Options = GeoMedOptions

    def __call__(self, vectors) -> torch.Tensor:
        x = stack(vectors)
        ok = finite_rows(x)
        x = x[ok] if not bool(ok.all()) else x
        if x.shape[0] == 0:
            return torch.full_like(vectors[0], float("nan"))
        nu, z = self.options.nu, Median()(list(x))
        obj = None
        for _ in range(self.options.max_iter):
            dist = torch.linalg.vector_norm(x - z, dim=1).clamp_min_(nu)
            new_obj = float(dist.double().sum())
            if obj is not None and obj - new_obj <= self.options.tol * new_obj:
                break
            obj = new_obj
            w = dist.reciprocal_()
            z = (w @ x) / w.sum()
        return z
