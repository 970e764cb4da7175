"""``mimic``: the Byzantine workers copy one honest worker's vector, over-weighting its data.

Karimireddy, He and Jaggi, "Byzantine-robust learning on heterogeneous datasets via bucketing", ICLR 2022
(arXiv:2006.09365). Harmless under i.i.d. data; under heterogeneous data it biases the aggregate towards
one worker's distribution, and robust rules cannot tell the copies from honest vectors. Omniscient::

    b = x_{i*}       (i* an index among the honest workers, in rank order)

``worker=K`` (default 0, ByzFL's ``Mimic(epsilon=0)``) fixes i* = K. ``learn=T > 0`` uses the paper's
heuristic as ByzFL implemented it (``WorkerWithMaxVariance`` in its older ``attack_optimizers.py``): for
the first T rounds of a stream the attackers copy honest worker 0 while estimating the direction of
largest variance of the honest vectors online,

    μ_t = ((t−1) μ_{t−1} + mean_i x_i) / t,
    c_t = Σ_i (x_i − μ_t) ⟨x_i − μ_t, z_{t−1}⟩ / ‖·‖,   z_t = normalise(((t−1) z_{t−1} + c_t) / t),

with z_0 uniform in [0, 1)^d (here seeded by the run seed and the stream, the same on every rank); after
that, i* = argmax_i |⟨x_i, z_T⟩| for every later round. That state is per stream and checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._quant import hashed_seed
from .base import Attack, Slot


@dataclass
class MimicOptions:
    worker: int = 0  # the honest worker copied (an index among the honest ones), when learn=0
    learn: int = 0   # > 0: learn the max-variance direction over this many rounds, then copy along it

    def validate(self) -> None:
        check_range("mimic worker", self.worker, low=0, integer=True)
        check_range("mimic learn", self.learn, low=0, integer=True)


class Mimic(Attack):
    name = "mimic"
    description = ("copies honest worker `worker`'s vector; learn=T: the one furthest along the honest vectors' "
                   "top variance direction, learned over T rounds (Karimireddy et al. 2022)")
    Options = MimicOptions
    omniscient = True

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.state: dict[str, dict[str, Any]] = {}  # stream → {"t", "mu", "z", "at"}

    def check(self, world: int, count: int) -> None:
        if count and self.options.worker >= world - count:
            raise ConfigError(f"mimic worker={self.options.worker} is out of range; allowed: 0 <= worker < "
                              f"{world - count} (the honest workers)")

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        if self.options.learn == 0:
            return honest[self.options.worker].clone()
        return honest[self._pick(honest, slot)].clone()

    def _pick(self, honest: list[torch.Tensor], slot: Slot) -> int:
        st = self.state.setdefault(slot.key, {"t": 0, "at": -1})
        if st["at"] != slot.step:  # once per round (several Byzantine workers may share this object)
            st["at"] = slot.step
            st["t"] += 1
            if st["t"] <= self.options.learn:
                self._update(st, torch.stack(honest), slot)
        if st["t"] <= self.options.learn:
            return 0
        return int(torch.stack(honest).mv(st["z"]).abs().argmax())

    def _update(self, st: dict[str, Any], x: torch.Tensor, slot: Slot) -> None:
        t = st["t"]
        if "z" not in st:
            g = torch.Generator().manual_seed(hashed_seed(f"mimic/{slot.seed}/{slot.key}"))
            st["z"] = torch.rand(x.shape[1], generator=g).to(x.device)
            st["mu"] = torch.zeros_like(x[0])
        st["mu"] = st["mu"] * ((t - 1) / t) + x.mean(0) / t
        dev = x - st["mu"]
        c = (dev * dev.mv(st["z"])[:, None]).sum(0)
        c = c / c.norm()
        z = st["z"] * ((t - 1) / t) + c / t
        st["z"] = z / z.norm()

    def state_dict(self) -> dict[str, Any]:
        return {k: dict(v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: dict(v) for k, v in state.items()}
