"""``nan``: a worker that sends NaN (or +Inf) values — a crashed or corrupted worker, not a clever one.

ByzFL's ``Inf`` attack sends +∞ in every coordinate; ``value=nan`` sends NaN instead. Every coordinate
of the vector is the value (not omniscient), from training step ``start`` on (default 1; before it the
worker sends its own vector: a worker that fails mid-run). Under the mean the aggregate is no longer
finite and the exchange stops the run (naming the worker and the step); a robust aggregator must
discard the vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, check_range
from .base import Attack, Slot


@dataclass
class NaNOptions:
    value: str | float = "nan"  # "nan" or "inf" (a spec's value=nan is read as the float NaN)
    start: int = 1              # first training step it sends them (before: its own honest vector)

    def validate(self) -> None:
        if isinstance(self.value, float) and not math.isfinite(self.value):
            self.value = "nan" if math.isnan(self.value) else ("inf" if self.value > 0 else "-inf")
        if self.value not in ("nan", "inf"):
            raise ConfigError(f"nan attack value={self.value!r}; allowed: nan, inf")
        check_range("nan attack start", self.start, low=1, integer=True)


class NaNWorker(Attack):
    name = "nan"
    description = "sends a vector of NaN (value=nan) or +Inf (value=inf) values, from step `start` on"
    Options = NaNOptions

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        if slot.step < self.options.start:
            return own
        return torch.full_like(own, float(self.options.value))
