"""``median``: the coordinate-wise median of the workers' vectors.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", ICML 2018 (arXiv:1803.01498). Coordinate k of the aggregate is

    [Median(x_1..x_n)]_k = median([x_1]_k, ..., [x_n]_k)

(for even n the mean of the two middle values, as numpy's median; ``torch.median`` and ByzFL's torch
path take the lower one). Robust while fewer than half of the vectors are Byzantine (f < n/2). NaN is read
as +inf before ordering, so at most f non-finite vectors never reach the output.
"""

from __future__ import annotations

import torch

from ._robust import nan_to_inf, stack
from .base import Aggregator


class Median(Aggregator):
    name = "median"
    description = "coordinate-wise median (Yin et al., 2018): robust for f < n/2"

    def __call__(self, vectors) -> torch.Tensor:
        x = nan_to_inf(stack(vectors))
        n = x.shape[0]
        if n % 2:
            return torch.median(x, dim=0).values
        s = torch.sort(x, dim=0).values
        return s[n // 2 - 1].mul(0.5).add_(s[n // 2], alpha=0.5)  # halves first: no overflow
