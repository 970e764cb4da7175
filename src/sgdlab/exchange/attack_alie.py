"""``alie``: "a little is enough" — the Byzantine workers send the honest mean shifted by z standard
deviations in every coordinate.

Baruch, Baruch and Goldberg, "A little is enough: circumventing defenses for distributed learning",
NeurIPS 2019 (arXiv:1902.06156). With h = n − f honest vectors x_i (omniscient), coordinate-wise::

    b_j = μ_j + z · σ_j,   μ = (1/h) Σ x_i,   σ_j = sqrt( Σ (x_ij − μ_j)² / (h − 1) )

and, with ``z=auto`` (the default), the paper's z_max from n and f: s = ⌊n/2 + 1⌋ − f workers must "support"
the attacker for a majority, and z_max is the largest z with Φ(z) < (n − s)/n, i.e.
z_max = Φ⁻¹((n − s)/n) (Φ the standard normal CDF). For n = 16: f = 1 gives z = 0 (the attack is the
mean), f = 3 gives z ≈ 0.32.

The paper writes the shift as μ_j − z·σ_j; the sign is a convention (z σ is within the spread either way).
Here it is +z σ with the sample standard deviation (ddof = 1), as ByzFL's ``ALittleIsEnough`` (default
τ = 1.5 there, a fixed factor); for X = [[1,2,3],[4,5,6],[7,8,9]] and z = 1.5 it gives [8.5, 9.5, 10.5].
Some implementations (Blades) count only the honest workers in Φ⁻¹((n − f − s)/(n − f)); this file uses
the paper's n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from ..errors import ConfigError, check_range
from .base import Attack, Slot


def z_max(n: int, f: int) -> float:
    """The paper's z from n workers of which f are Byzantine: Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ConfigError(f"alie: with workers={n} and count={f} the paper's z is undefined "
                          f"(s = floor(n/2 + 1) - f = {s}, so (n - s)/n = {p:g} is not in (0, 1)); give z=")
    return NormalDist().inv_cdf(p)


@dataclass
class ALIEOptions:
    z: float | str = "auto"  # "auto": z_max(n, f)

    def validate(self) -> None:
        if isinstance(self.z, str):
            if self.z != "auto":
                raise ConfigError(f"alie z={self.z!r}; allowed: a number, or auto (the paper's z_max from n and f)")
        else:
            check_range("alie z", self.z)


class ALIE(Attack):
    name = "alie"
    description = ("a little is enough: honest mean + z·(coordinate std), z from n and f unless given "
                   "(Baruch et al. 2019)")
    Options = ALIEOptions
    omniscient = True

    def check(self, world: int, count: int) -> None:
        if count and self.options.z == "auto":
            z_max(world, count)
        if count and world - count < 2:
            raise ConfigError(f"alie needs at least 2 honest workers for a standard deviation; workers={world}, "
                              f"count={count}")

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        z = self.options.z
        if isinstance(z, str):  # auto
            z = z_max(slot.world, slot.world - len(honest))
        x = torch.stack(honest)
        return x.mean(0).add_(x.std(0, correction=1), alpha=z)
