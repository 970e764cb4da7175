"""``arc`` (pre-aggregation): adaptive robust clipping, the k largest vectors clipped to the next norm.

Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "The Vital Role of Gradient Clipping in
Byzantine-Resilient Distributed Learning", 2024 (arXiv:2405.14432). With k = ⌊2 (f/n) (n − f)⌋ and
the norms sorted, ‖x_π(1)‖ <= ... <= ‖x_π(n)‖,

    ARC_f(x_1..x_n) = (x_i · min(1, ‖x_π(n−k)‖ / ‖x_i‖))_i,

so the k largest vectors are clipped to the (k+1)-th largest norm (k = 0: nothing is clipped); defined
for n > 2f, where k >= f. A non-finite vector has infinite norm and is clipped to 0 (its direction is
undefined); so is a finite one whose norm overflows. ByzFL's ``ARC(f)`` is the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ._robust import check_f, finite_rows, stack, zero_bad
from .base import PreAggregator


@dataclass
class ARCOptions:
    f: int = 1  # Byzantine vectors tolerated: k = floor(2 f (n - f) / n) vectors are clipped

    def validate(self) -> None:
        check_range("arc f", self.f, low=0, integer=True)


class ARC(PreAggregator):
    name = "arc"
    description = "adaptive robust clipping (Allouah et al., 2024): the floor(2f(n-f)/n) largest clipped; n > 2f"
    Options = ARCOptions

    def check_workers(self, n: int) -> None:
        f = self.options.f
        check_f(f"pre-aggregator {self.name}", f, n, n > 2 * f, "n > 2f")

    def __call__(self, vectors, slot=None) -> list[torch.Tensor]:
        x = stack(vectors)
        n, f = x.shape[0], self.options.f
        self.check_workers(n)
        k = (2 * f * (n - f)) // n
        if k == 0:
            return list(x.unbind(0))
        ok = finite_rows(x)
        norms = torch.where(ok, torch.linalg.vector_norm(x, dim=1), torch.full_like(x[:, 0], float("inf")))
        threshold = torch.sort(norms).values[n - k - 1]
        scale = torch.where(norms > threshold, threshold / norms, torch.ones_like(norms))  # 0 for inf norms
        return list((zero_bad(x, ok) * scale.unsqueeze(1)).unbind(0))
