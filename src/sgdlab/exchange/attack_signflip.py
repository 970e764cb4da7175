"""``signflip``: the Byzantine workers send the opposite of the honest workers' mean.

Allen-Zhu, Ebrahimian, Li and Alistarh, "Byzantine-resilient non-convex stochastic gradient descent",
ICLR 2021 (arXiv:2012.14368); the form used by ByzFL (LPD-EPFL/byzfl, ``SignFlipping``):

    b = −(1/h) Σ_{i honest} x_i          (of=mean, the default; omniscient: sees the honest vectors)
    b = −x_own                           (of=own: the worker's own honest vector, negated; not omniscient)

With few flippers the mean only shrinks (h − f honest directions minus f flipped ones); robust rules are
tested against it because the flipped vector has the honest vectors' norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Attack, Slot


@dataclass
class SignFlipOptions:
    of: str = "mean"  # "mean": −(honest mean); "own": −(own vector)

    def validate(self) -> None:
        if self.of not in ("mean", "own"):
            raise ConfigError(f"signflip of={self.of!r}; allowed: mean (the honest mean), own (its own vector)")


class SignFlip(Attack):
    name = "signflip"
    description = "sends −(mean of the honest vectors); of=own: −(its own vector) (Allen-Zhu et al. 2021)"
    Options = SignFlipOptions

    @property
    def omniscient(self) -> bool:  # type: ignore[override]
        return self.options.of == "mean"

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        if self.options.of == "own":
            return -own
        return -torch.stack(honest).mean(0)
