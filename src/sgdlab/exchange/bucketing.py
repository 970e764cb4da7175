"""``bucketing`` (pre-aggregation): the means of random buckets of s vectors.

Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR 2022
(arXiv:2006.09365). With π a random permutation of [n],

    Bucketing_s(x_1..x_n) = (y_1..y_⌈n/s⌉),    y_b = mean of x_{π(j)}, j = (b − 1)s + 1 .. min(bs, n),

(the last bucket holds the remainder, as in ByzFL's ``Bucketing(s)``), then a robust aggregator runs on
the ⌈n/s⌉ bucket means: a Byzantine vector spoils at most one bucket, so the aggregator's own f still
counts the bad inputs, out of ⌈n/s⌉ (its bound is checked with that count). π is drawn from the run's
seed, the stream and the step, the same in every process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import check_range
from ._quant import hashed_seed
from ._robust import stack
from .base import PreAggregator, Slot


@dataclass
class BucketingOptions:
    s: int = 2  # vectors per bucket

    def validate(self) -> None:
        check_range("bucketing s", self.s, low=1, integer=True)


def permutation(n: int, slot: Slot | None) -> torch.Tensor:
    slot = slot or Slot("", 0)
    g = torch.Generator().manual_seed(hashed_seed(f"bucketing/{slot.seed}/{slot.key}/{slot.step}"))
    return torch.randperm(n, generator=g)


class Bucketing(PreAggregator):
    name = "bucketing"
    description = "means of random buckets of s vectors (Karimireddy et al., 2022): ceil(n/s) vectors out"
    Options = BucketingOptions

    def count(self, n: int) -> int:
        return math.ceil(n / self.options.s)

    def __call__(self, vectors, slot=None) -> list[torch.Tensor]:
        x = stack(vectors)
        x = x[permutation(x.shape[0], slot).to(x.device)]
        return [b.mean(dim=0) for b in torch.split(x, self.options.s)]
