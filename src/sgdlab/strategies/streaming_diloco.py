"""``streaming-diloco``: DiLoCo with streamed, overlapped, low-precision fragment syncs (SCOPE D4).

Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a Distributed Free Lunch",
2025 (arXiv:2501.18512). The parameters are split into P fragments (consecutive parameters of the model,
balanced by size). Fragment p is synchronised every H steps, at steps t ≡ (p+1)·H/P (mod H), so the
fragments' syncs are staggered and peak bandwidth drops by P. A sync of fragment p at step t:

    Δ_p = (1/N) Σ_i (θ_p − θ_{i,p}(t))      exchanged in ``precision`` (fp32, bf16, fp16, int8, int4)
    θ_p ← OuterOpt_p(θ_p, Δ_p)               one outer optimizer (Nesterov SGD) per fragment
    at step t + τ:  θ_{i,p} ← α·θ_{i,p}(t+τ) + (1 − α)·θ_p

The exchange overlaps the next τ inner steps (τ = ``overlap``, 0 ≤ τ < H/P); a worker only waits if the
transfer takes longer than those τ steps. α = ``mix_alpha`` (the paper uses 0.5); α = 0 replaces the
local fragment by the global one. With P = 1, τ = 0, α = 0 and fp32 this is exactly DiLoCo.

Buffers (``buffers``, default ``"average"``) are not fragmented: every H steps (when the last fragment
syncs) all floating buffers are synchronised at once, exactly and without overlap, as in DiLoCo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, check_range
from .base import GlobalModelMixin, Worker
from .diloco import DiLoCo, DiLoCoOptions, make_outer, outer_step


@dataclass
class StreamingDiLoCoOptions(DiLoCoOptions):
    fragments: int = 2          # P
    overlap: int = 0            # τ: inner steps the exchange overlaps
    mix_alpha: float = 0.5      # α: weight of the local fragment when the global one arrives

    def validate(self) -> None:
        super().validate()
        check_range("fragments", self.fragments, low=1, integer=True)
        check_range("overlap", self.overlap, low=0, integer=True)
        check_range("mix_alpha", self.mix_alpha, low=0, high=1)
        if self.sync_rule != "fixed":
            raise ConfigError(f"sync_rule={self.sync_rule!r}: streaming-diloco staggers its fragments over a fixed "
                              "sync_every; allowed: sync_rule=fixed")
        if self.sync_every % self.fragments:
            raise ConfigError(f"sync_every={self.sync_every} must be divisible by fragments={self.fragments} "
                              "(fragments are synced every sync_every/fragments steps, in turn)")
        if self.overlap >= self.sync_every // self.fragments:
            raise ConfigError(f"overlap={self.overlap} must be smaller than sync_every/fragments="
                              f"{self.sync_every // self.fragments} (a fragment's exchange must land before "
                              "the next fragment's starts)")


def split_fragments(params: list[torch.Tensor], p: int) -> list[list[int]]:
    """Indices of consecutive parameters, cut into ``p`` non-empty groups of about equal element count."""
    n = len(params)
    if p > n:
        raise ConfigError(f"fragments={p} is more than the model's {n} parameter tensors")
    sizes = [t.numel() for t in params]
    total, cum, starts = sum(sizes), 0, [0]
    for i, size in enumerate(sizes):
        cum += size
        k = len(starts)
        if k < p and cum >= k * total / p:  # fragment k starts after tensor i
            starts.append(i + 1)
    while len(starts) < p:
        starts.append(starts[-1] + 1)
    for k in range(1, p):  # every fragment non-empty, and room left for the ones after it
        starts[k] = min(max(starts[k], starts[k - 1] + 1), n - (p - k))
    bounds = starts + [n]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(p)]


class StreamingDiLoCo(DiLoCo):
    name = "streaming-diloco"
    description = ("Streaming DiLoCo: staggered fragment syncs, overlapped with tau inner steps, mixed by "
                   "alpha, low-precision exchange (Douillard et al., 2025)")
    Options = StreamingDiLoCoOptions
    supports_client_dp = False  # fragments are exchanged at different times; not covered by client DP

    def setup(self, workers: list[Worker]) -> None:
        self.init_global(workers)
        o = self.options
        self.fragments = split_fragments(self.global_params, o.fragments)
        self.outers = [make_outer(o, [self.global_params[i] for i in frag]) for frag in self.fragments]
        self.pending: list[tuple[int, int, float]] = []  # (apply at step, fragment, completion time)

    def after_step(self, workers: list[Worker], step: int) -> None:
        o = self.options
        period = o.sync_every // o.fragments
        if step % period == 0:
            p = (step // period - 1) % o.fragments
            frag = self.fragments[p]
            deltas = self.pseudo_gradients(workers, frag)
            done = self.exchange.mean_(deltas, key=f"fragment{p}", step=step, wait=False)
            outer_step(self.outers[p], [self.global_params[i] for i in frag], deltas[0])
            self.pending.append((step + o.overlap, p, done))
        if step % o.sync_every == 0:
            self.sync_buffers(workers)
        while self.pending and self.pending[0][0] == step:
            _, p, done = self.pending.pop(0)
            self.group.wait_until(done)
            with torch.no_grad():
                for w in workers:
                    for i in self.fragments[p]:
                        w.params[i].mul_(o.mix_alpha).add_(self.global_params[i], alpha=1 - o.mix_alpha)

    def metrics(self) -> dict[str, float]:
        return {}  # fixed rounds: no sync period to log

    def state_dict(self) -> dict[str, Any]:
        return {**GlobalModelMixin.state_dict(self), "outers": [o.state_dict() for o in self.outers],
                "pending": [list(x) for x in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        GlobalModelMixin.load_state_dict(self, state)
        for o, s in zip(self.outers, state["outers"], strict=True):
            o.load_state_dict(s)
        self.pending = [(int(a), int(b), float(c)) for a, b, c in state["pending"]]
