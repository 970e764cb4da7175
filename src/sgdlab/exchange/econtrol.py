"""``econtrol``: EControl (Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression
and Error Control", ICLR 2024, arXiv:2311.05645).

Each worker i keeps an error eᵢ and a gradient estimate hᵢ, and every worker keeps the same aggregate
h = mean hᵢ (all zero at the start, per stream). Each round, with its vector gᵢ (a gradient in ``ddp``; an
update θ − θᵢ in ``localsgd``/``diloco``)::

    Δᵢ = C(η eᵢ + gᵢ − hᵢ)      one compressed message carries both the error and the estimate's change
    eᵢ ← eᵢ + gᵢ − hᵢ − D(Δᵢ)   (D: the compressor's decode)
    hᵢ ← hᵢ + D(Δᵢ)
    h  ← h + mean_i D(Δᵢ)       the aggregate the collective returns, added to the shared h

and the strategy receives h, so ``ddp`` steps θ ← θ − γ (h^t + Δ^t) as in the paper's algorithm. η ∈ (0, 1]
sets how strongly the accumulated error is fed back (η = 0 would be EF21 with an unused error; η = 1 feeds
the whole error back at once). Default ``eta = 0.1``, sgdlab's choice: the paper treats η as a parameter
to tune, whose admissible range depends on the compressor's contraction δ. Another η:
``--compress topk,ratio=0.01,feedback=econtrol,feedback.eta=0.5``.
The error update is computed from the message as eᵢ ← (1 − η) eᵢ + mᵢ − D(Δᵢ) with mᵢ = η eᵢ + gᵢ − hᵢ,
the same quantity up to float rounding. eᵢ, hᵢ are in the per-worker ``memory``, h in the ``shared``
state: all are checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Feedback


@dataclass
class EControlOptions:
    eta: float = 0.1   # feedback strength of the accumulated error, 0 < eta <= 1

    def validate(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not (
                math.isfinite(self.eta) and 0 < self.eta <= 1):
            raise ConfigError(f"eta={self.eta!r}: EControl's error feedback strength must be in (0, 1]")


class EControl(Feedback):
    name = "econtrol"
    description = "EControl: send C(eta e_i + x - h_i), track error e_i and estimate h_i (Gao et al. 2024)"
    Options = EControlOptions

    def __init__(self, options: EControlOptions | None = None):
        super().__init__(options)
        self.options.validate()

    def message(self, x: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        if "h" not in memory:
            return x
        return self.options.eta * memory["e"] + x - memory["h"]

    def sent(self, message: torch.Tensor, decoded: torch.Tensor, memory: dict[str, torch.Tensor]) -> None:
        eta = self.options.eta
        if "h" not in memory:
            memory["e"], memory["h"] = message - decoded, decoded.clone()
            return
        memory["e"] = (1 - eta) * memory["e"] + message - decoded
        memory["h"] = memory["h"] + decoded

    def result(self, aggregate: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        shared["h"] = shared["h"] + aggregate if "h" in shared else aggregate.clone()
        return shared["h"].clone()
