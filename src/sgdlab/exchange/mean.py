"""``mean``: the plain average of the workers' vectors, the aggregate of every strategy by default."""

from __future__ import annotations

import torch

from .base import Aggregator


class Mean(Aggregator):
    name = "mean"
    description = "the average over workers, (1/N) Σ_i x_i (summed in rank order)"
    linear = True

    def __call__(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        total = vectors[0].clone()
        for v in vectors[1:]:
            total += v
        return total.div_(len(vectors))
