"""``nnm`` (pre-aggregation): nearest-neighbour mixing, each vector replaced by the mean of its n − f
nearest vectors.

Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal Byzantine
ML under Heterogeneity", AISTATS 2023 (arXiv:2302.01772). With N_i the n − f nearest vectors to x_i
(x_i itself included; ties go to the lower rank),

    NNM_f(x_1..x_n) = (y_1..y_n),    y_i = (1/(n − f)) Σ_{j ∈ N_i} x_j,

then any robust aggregator runs on the y_i (``--pre-aggregate nnm,f=F --aggregate RULE``). Defined for
n > 2f. A non-finite vector is infinitely far from every other, so it is in no finite vector's
neighbourhood; its own row becomes a mean of zeros and other vectors (finite, and one of at most f rows
the aggregator must tolerate). ByzFL's ``NNM(f)`` is the same rule (argpartition: ties in any order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ._robust import check_f, distances, finite_rows, stack, zero_bad
from .base import PreAggregator


@dataclass
class NNMOptions:
    f: int = 1  # Byzantine vectors tolerated: each vector is mixed with its n - f nearest

    def validate(self) -> None:
        check_range("nnm f", self.f, low=0, integer=True)


def mix(x: torch.Tensor, f: int) -> torch.Tensor:
    """The ``n × d`` NNM output of the rows of ``x``: row i is the mean of its n − f nearest rows."""
    n = x.shape[0]
    ok = finite_rows(x)
    nearest = torch.sort(distances(x, ok), dim=1, stable=True).indices[:, :n - f]
    weights = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    weights.scatter_(1, nearest, 1.0 / (n - f))
    return weights @ zero_bad(x, ok)


class NNM(PreAggregator):
    name = "nnm"
    description = "nearest-neighbour mixing (Allouah et al., 2023): each vector -> mean of its n-f nearest; n > 2f"
    Options = NNMOptions

    def check_workers(self, n: int) -> None:
        f = self.options.f
        check_f(f"pre-aggregator {self.name}", f, n, n > 2 * f, "n > 2f")

    def __call__(self, vectors, slot=None) -> list[torch.Tensor]:
        x = stack(vectors)
        self.check_workers(x.shape[0])
        return list(mix(x, self.options.f).unbind(0))
