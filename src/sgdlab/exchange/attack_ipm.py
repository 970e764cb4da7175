"""``ipm``: inner-product manipulation — the Byzantine workers send −ε times the honest mean.

Xie, Koyejo and Gupta, "Fall of empires: breaking Byzantine-tolerant SGD by inner product manipulation",
UAI 2019 (arXiv:1903.03936). With h honest vectors x_i and f attackers (omniscient: they see the x_i)::

    b = −ε · (1/h) Σ_{i honest} x_i

The mean of all n vectors is then ((h − f ε)/n) · mean_honest: for ε > h/f its inner product with the
true gradient is negative (descent turns into ascent). A small ε hides among the honest vectors and targets
median/Krum-type rules; a large ε breaks the mean. Default ε = 2, ByzFL's default
(``InnerProductManipulation(tau=2.0)``; its older ``FallOfEmpires(tau)`` sends (1 − τ)·mean, the same
vector for τ = 1 + ε).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from .base import Attack, Slot


@dataclass
class IPMOptions:
    eps: float = 2.0

    def validate(self) -> None:
        check_range("ipm eps", self.eps, low=0, low_open=True)


class IPM(Attack):
    name = "ipm"
    description = "inner-product manipulation: sends −eps·(mean of the honest vectors) (Xie et al. 2019)"
    Options = IPMOptions
    omniscient = True

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        return torch.stack(honest).mean(0).mul_(-self.options.eps)
