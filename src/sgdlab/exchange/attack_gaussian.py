"""``gaussian``: the Byzantine workers send random vectors, g ~ N(μ, σ² I) (not omniscient).

The Gaussian Byzantine worker of Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine learning with
adversaries: Byzantine tolerant gradient descent", NeurIPS 2017 (arXiv:1703.02757); ByzFL's ``Gaussian``
(defaults μ = 0, σ = 1, the defaults here). A large σ breaks the mean; robust rules discard the vector.

The draw is seeded by (run seed, stream, step, rank) through :func:`sgdlab.exchange._quant.seed_of`, on a
CPU generator, so the simulator and the torch backend send the same numbers; ByzFL draws from the global
generator instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ._quant import seed_of
from .base import Attack, Slot


@dataclass
class GaussianOptions:
    sigma: float = 1.0
    mu: float = 0.0

    def validate(self) -> None:
        check_range("gaussian sigma", self.sigma, low=0)
        check_range("gaussian mu", self.mu)


class Gaussian(Attack):
    name = "gaussian"
    description = "sends a random vector, every coordinate N(mu, sigma^2), seeded by run, stream, step and rank"
    Options = GaussianOptions

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_of("gaussian", slot, rank))
        x = torch.randn(own.numel(), generator=g, dtype=torch.float32)
        return x.mul_(self.options.sigma).add_(self.options.mu).to(own.device)
