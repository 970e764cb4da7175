"""``trimmed-mean``: the coordinate-wise trimmed mean, dropping the f largest and f smallest values.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", ICML 2018 (arXiv:1803.01498). With π_k sorting coordinate k in non-decreasing order,

    [TrMean_f(x_1..x_n)]_k = 1/(n − 2f) · Σ_{j=f+1}^{n−f} [x_{π_k(j)}]_k,

defined for n > 2f (f = 0 is the mean). ByzFL's ``TrMean(f)`` is the same rule. NaN is read as +inf
before sorting, so at most f non-finite vectors are always trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ._robust import check_f, nan_to_inf, stack
from .base import Aggregator


@dataclass
class TrimmedMeanOptions:
    f: int = 1  # values dropped at each end of every coordinate

    def validate(self) -> None:
        check_range("trimmed-mean f", self.f, low=0, integer=True)


class TrimmedMean(Aggregator):
    name = "trimmed-mean"
    description = "coordinate-wise mean without the f largest and f smallest values (Yin et al., 2018): n > 2f"
    Options = TrimmedMeanOptions

    def check_workers(self, n: int) -> None:
        f = self.options.f
        check_f(f"aggregator {self.name}", f, n, n > 2 * f, "n > 2f")

    def __call__(self, vectors) -> torch.Tensor:
        x = nan_to_inf(stack(vectors))
        n, f = x.shape[0], self.options.f
        self.check_workers(n)
        return torch.sort(x, dim=0).values[f:n - f].mean(dim=0)
