"""``cclip``: centered clipping around the previous aggregate.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021
(arXiv:2012.10333). Starting from the previous round's aggregate v_0 (zero in the first round), L times

    v ← v + (1/n) Σ_i (x_i − v) · min(1, τ / ‖x_i − v‖),

and v is the aggregate (kept per stream as the next round's centre, in the exchange's checkpointed
state; every process computes the same v). τ = inf is the mean. The paper pairs it with worker momentum
(the inner optimizer's momentum here). A non-finite vector contributes nothing (its direction is
undefined; clipped, an infinitely far point would still move v by at most τ/n).

ByzFL's ``CenteredClipping(m=None, L=1, tau=100)`` keeps the centre in the instance (one stream) and
starts from zero; its defaults are the ones used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ._robust import finite_rows, stack, zero_bad
from .base import Aggregator


@dataclass
class CClipOptions:
    tau: float = 100.0  # clipping radius around the centre (inf: the mean)
    iters: int = 1      # L: clipping iterations per round

    def validate(self) -> None:
        check_range("cclip tau", self.tau, low=0, low_open=True)
        check_range("cclip iters", self.iters, low=1, integer=True)


class CClip(Aggregator):
    name = "cclip"
    description = "centered clipping around the previous aggregate (Karimireddy et al., 2021): tau, iters"
    Options = CClipOptions
    stateful = True

    def __call__(self, vectors) -> torch.Tensor:
        return self.aggregate(vectors)  # from the zero vector

    def aggregate(self, vectors, slot=None, state=None) -> torch.Tensor:
        x = stack(vectors)
        ok = finite_rows(x)
        x, n = zero_bad(x, ok), x.shape[0]
        state = {} if state is None else state
        v = state.get("centre")
        v = torch.zeros_like(x[0]) if v is None else v.to(x.device, x.dtype)
        for _ in range(self.options.iters):
            diff = x - v
            norm = torch.linalg.vector_norm(diff, dim=1)
            scale = torch.clamp(self.options.tau / norm, max=1.0)  # 1 where the norm is 0 (tau/0 = inf)
            scale = torch.where(ok & torch.isfinite(norm), scale, torch.zeros_like(scale))
            v = v + (scale @ diff) / n
        state["centre"] = v.clone()
        return v
