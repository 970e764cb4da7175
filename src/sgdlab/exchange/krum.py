"""``krum``: Krum and Multi-Krum, the vectors closest to their nearest neighbours.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017. Each vector's score is the sum of squared distances to its n − f − 2 nearest
other vectors,

    s(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖²,   N_i: the n − f − 2 nearest x_j, j ≠ i,

Krum returns the vector of lowest score; Multi-Krum (option ``m``) the mean of the m vectors of lowest
score (m = 1 is Krum, m = n is the mean). Defined for n > 2f + 2 and 1 <= m <= n − f. Ties go to the
lower rank. A non-finite vector is infinitely far from every other: its score is +inf, so with at most
f of them it is never chosen.

ByzFL (``byzfl.Krum``/``MultiKrum``, snapshot 69bd1ac) differs: its score averages the squared distances
to the n − f − 1 nearest others (not n − f − 2), and its Multi-Krum always averages n − f vectors (no m).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ._robust import check_f, distances, finite_rows, stack
from .base import Aggregator


@dataclass
class KrumOptions:
    f: int = 1  # Byzantine vectors tolerated
    m: int = 1  # vectors averaged (1: Krum; more: Multi-Krum)

    def validate(self) -> None:
        check_range("krum f", self.f, low=0, integer=True)
        check_range("krum m", self.m, low=1, integer=True)


def scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Every row's Krum score: the sum of squared distances to its n − f − 2 nearest other rows."""
    n = x.shape[0]
    d2 = distances(x, finite_rows(x)).square_().fill_diagonal_(float("inf"))
    return torch.sort(d2, dim=1).values[:, :n - f - 2].sum(dim=1)


class Krum(Aggregator):
    name = "krum"
    description = "Krum / Multi-Krum (Blanchard et al., 2017): mean of the m vectors nearest their n-f-2 neighbours"
    Options = KrumOptions

    def check_workers(self, n: int) -> None:
        f, m = self.options.f, self.options.m
        check_f(f"aggregator {self.name}", f, n, n > 2 * f + 2, "n > 2f + 2")
        check_f(f"aggregator {self.name} m={m}", f, n, m <= n - f, "m <= n - f")

    def __call__(self, vectors) -> torch.Tensor:
        x = stack(vectors)
        self.check_workers(x.shape[0])
        chosen = torch.sort(scores(x, self.options.f), stable=True).indices[:self.options.m]
        return x[chosen].mean(dim=0)
