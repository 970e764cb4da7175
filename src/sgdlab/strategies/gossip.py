"""``gossip``: decentralised gossip SGD on a fixed topology, and "A Single Merging Suffices" (SCOPE D11).

Gossip SGD (decentralised SGD; Lian et al., "Can Decentralized Algorithms Outperform Centralized
Algorithms?", NeurIPS 2017, arXiv:1705.09056). Every worker i keeps its own parameters x_i, takes H steps
of its inner optimizer on its own data, then mixes with its neighbours by point-to-point messages
(gossip *after* the local steps, "adapt then combine", as in the single-merging paper's code):

    x_i ← Σ_j W_ij x_j        every H steps (``sync_every``, default 1)

W is doubly stochastic (rows and columns sum to 1, so the network mean x̄ = (1/N) Σ_i x_i is preserved).
Weights: uniform over a worker and the distinct ranks it receives from, W_ij = 1/(d+1) with d the in-degree
(every topology here is regular; on the undirected ones this is also the Metropolis–Hastings rule
1/(1 + max(d_i, d_j))):

* ``ring``: i ← i ± 1 (mod N); d = 2 (N = 2: d = 1).
* ``torus``: an R×C grid with wrap-around, rank i = r·C + c, neighbours (r ± 1, c), (r, c ± 1) (distinct
  ones: R = 2 or C = 2 gives one neighbour along that axis). Needs N = R·C with R, C ≥ 2: ``torus_shape``
  ("2x4"), by default the most square factorisation (R the largest divisor of N with R ≤ √N); a prime N is
  refused.
* ``exponential``: the static exponential graph of Ying et al., "Exponential Graph is Provably Efficient
  for Decentralized Deep Training", NeurIPS 2021 (arXiv:2110.13363): i receives from i + 2^k (mod N),
  k = 0 .. τ−1, τ = ⌈log₂ N⌉, each with weight 1/(τ+1) (directed: i sends to i − 2^k).
* ``one-peer-exponential``: the same paper's time-varying graph: round t (1, 2, ...) uses one peer,
  W_ii = W_{i,i+2^k} = 1/2 with k = (t−1) mod τ. For N a power of 2 any τ consecutive rounds multiply to
  the exact average J/N.
* ``complete``: W = J/N (every worker receives from every other; with H = 1 this is Local SGD with H = 1).
* ``none``: W = I, no communication (the single-merging paper's "no gossip" arm).

The matrix (or, for ``one-peer-exponential``, the τ matrices of a period) is logged once, in the first
metrics record (key ``gossip``, with the degree and ρ = the second largest singular value of W, or of the
period's product, the consensus contraction factor).

"A Single Merging Suffices" (Zhu, Zhang, Wang, Zhou, Wang, arXiv:2507.06542, 2025; "On the Surprising
Effectiveness of a Single Global Merging in Decentralized Learning", ICLR 2026): train decentralised with
little or no gossip and merge the workers once, x_i ← x̄ (the exact mean). ``merge_at`` = T > 0 does that
after step T's gossip: one all-reduce of the parameters (and ``buffers=gossip``'s floating buffers), exact,
counted as traffic; optimizer states are not merged; training goes on decentralised after it. ``merge_at``
= 0 (default) never merges the workers.

What is evaluated (``evaluate``): ``average`` (default) is the model with x̄ — the model a single merge at
this step would give, so a run's final validation loss *is* the single-merge result without any traffic;
it is computed by an all-reduce that is not counted (evaluation only). ``local`` evaluates local worker 0's
own x_i. Every evaluation also logs ``consensus_distance`` = (1/N) Σ_i ‖x_i − x̄‖² over the parameters
(uncounted).

Communication (:meth:`sgdlab.distributed.group.Group.exchange_neighbors`): a worker sends all of its
parameters (and floating buffers under ``buffers=gossip``), exact, in their own dtype, to each rank that
receives from it: d·S bytes per worker per round for a payload of S bytes; its d messages go one after
another on its link (d·(α + 8S/β) seconds) and it waits for its senders only, not for the slowest worker.
The complete graph sends (N−1)·S per worker per round, N/2 times a ring all-reduce's 2(N−1)/N·S. Compressed
gossip (e.g. CHOCO-SGD) is not implemented: ``--compress``/``--aggregate``/``--byzantine`` are refused.

The paper's defaults and code (Raiden-Zhu/ICLR-2026-Grokking-in-Decentralized-Learning): 32 nodes, SGD lr
0.01, one gossip round per 100 steps on a "random" topology (each node, with probability 0.2, averages 50/50
with one random node: a row-stochastic "pull" that does not preserve the mean, not implemented here) and a
complete-graph round as the last one. The code averages only learnable parameters and re-estimates BatchNorm
statistics after the merge; here floating buffers are mixed and merged like parameters (``buffers=gossip``)
or stay each worker's own (``buffers=local``). Lian et al.'s D-PSGD mixes the pre-step parameters and adds
the gradient taken there, x_i ← Σ_j W_ij x_j − η g_i(x_i); here the gradient step comes first.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed.group import Group, _flat_by_dtype, _unflat_by_dtype
from ..errors import ConfigError, UnknownNameError, check_range
from ..exchange import ExchangeSpec
from .base import Strategy, Worker, synced_buffers

TOPOLOGIES = ("ring", "torus", "exponential", "one-peer-exponential", "complete", "none")
BUFFERS = ("gossip", "local")
EVALUATE = ("average", "local")


@dataclass
class GossipOptions:
    topology: str = field(default="ring", metadata={"help": f"gossip graph: {', '.join(TOPOLOGIES)}"})
    sync_every: int = 1       # H: local steps between gossip rounds
    torus_shape: str | None = field(default=None, metadata={"help": "RxC grid of topology=torus (None: the most "
                                                                    "square one)"})
    merge_at: int = field(default=0, metadata={"help": "step after which every worker takes the exact mean "
                                                       "(one counted all-reduce; 0: never)"})
    buffers: str = field(default="gossip", metadata={"help": "floating buffers: gossip (mixed and merged like "
                                                             "parameters) or local"})
    evaluate: str = field(default="average", metadata={"help": "evaluated model: average (uncounted mean of "
                                                               "the workers) or local (worker 0's own)"})

    def validate(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise UnknownNameError("topology", self.topology, TOPOLOGIES)
        check_range("sync_every", self.sync_every, low=1, integer=True)
        check_range("merge_at", self.merge_at, low=0, integer=True)
        if self.buffers not in BUFFERS:
            raise UnknownNameError("buffers", self.buffers, BUFFERS)
        if self.evaluate not in EVALUATE:
            raise UnknownNameError("evaluate", self.evaluate, EVALUATE)
        if self.torus_shape is not None:
            if self.topology != "torus":
                raise ConfigError(f"torus_shape={self.torus_shape!r} applies to topology=torus, not "
                                  f"topology={self.topology!r}")
            parse_shape(self.torus_shape)


def parse_shape(shape: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", shape)
    if not m or int(m.group(1)) < 2 or int(m.group(2)) < 2:
        raise ConfigError(f"torus_shape={shape!r}; allowed: RxC with integers R, C >= 2, e.g. 2x4")
    return int(m.group(1)), int(m.group(2))


def torus_shape(workers: int, shape: str | None = None) -> tuple[int, int]:
    """(R, C) of the torus on ``workers`` ranks: ``shape`` if given, else R the largest divisor <= √N."""
    if shape:
        r, c = parse_shape(shape)
        if r * c != workers:
            raise ConfigError(f"torus_shape={shape!r} has {r * c} nodes but workers={workers}; allowed: RxC with "
                              f"R*C = workers")
        return r, c
    r = max(d for d in range(1, math.isqrt(workers) + 1) if workers % d == 0)
    if r < 2:
        raise ConfigError(f"topology=torus needs workers = R x C with R, C >= 2; workers={workers} has no such "
                          "factorisation (allowed: 4, 6, 8, 9, 10, 12, ...); use topology=ring or exponential")
    return r, workers // r


def in_neighbours(topology: str, n: int, phase: int = 0, shape: str | None = None) -> list[list[int]]:
    """For every rank i, the distinct ranks j != i that i receives from (W_ij > 0) in round ``phase``."""
    tau = (n - 1).bit_length()  # ⌈log₂ N⌉
    out: list[list[int]] = []
    for i in range(n):
        if topology == "ring":
            js = {(i - 1) % n, (i + 1) % n}
        elif topology == "torus":
            rows, cols = torus_shape(n, shape)
            r, c = divmod(i, cols)
            js = {((r - 1) % rows) * cols + c, ((r + 1) % rows) * cols + c,
                  r * cols + (c - 1) % cols, r * cols + (c + 1) % cols}
        elif topology == "exponential":
            js = {(i + 2 ** k) % n for k in range(tau)}
        elif topology == "one-peer-exponential":
            js = {(i + 2 ** (phase % tau)) % n} if tau else set()
        elif topology == "complete":
            js = set(range(n))
        elif topology == "none":
            js = set()
        else:
            raise UnknownNameError("topology", topology, TOPOLOGIES)
        out.append(sorted(js - {i}))
    return out


def period(topology: str, n: int) -> int:
    """Rounds after which the topology repeats (τ = ⌈log₂ N⌉ for one-peer-exponential, else 1)."""
    return max(1, (n - 1).bit_length()) if topology == "one-peer-exponential" else 1


def mixing_matrix(topology: str, n: int, phase: int = 0, shape: str | None = None) -> torch.Tensor:
    """W (float64, N×N) of round ``phase``: W_ij = 1/(d_i + 1) for j = i and every j that i receives from."""
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, js in enumerate(in_neighbours(topology, n, phase, shape)):
        w[i, [i, *js]] = 1.0 / (len(js) + 1)
    return w


def contraction(ws: list[torch.Tensor]) -> float:
    """ρ: the second largest singular value of the product of ``ws`` (how much one period shrinks the
    distance to consensus; 0 is exact averaging)."""
    prod = torch.eye(ws[0].shape[0], dtype=torch.float64)
    for w in ws:
        prod = w @ prod
    s = torch.linalg.svdvals(prod - torch.full_like(prod, 1.0 / prod.shape[0]))
    return float(s[0])  # W − J/N keeps every singular value of W but the top one, 1


class Gossip(Strategy):
    name = "gossip"
    description = ("gossip SGD on a ring, torus, exponential or complete graph (Lian et al., 2017), and a "
                   "single global merge (Zhu et al., 2025)")
    Options = GossipOptions

    @classmethod
    def check_workers(cls, options: Any, workers: int) -> None:
        if options.topology == "torus":
            torus_shape(workers, options.torus_shape)

    def __init__(self, options: Any, group: Group, exchange: ExchangeSpec | None = None, seed: int = 0):
        super().__init__(options, group, exchange, seed)
        if self.exchange_spec.canonical() != ExchangeSpec().canonical():
            raise ConfigError("strategy gossip sends exact parameters to its neighbours; compress, aggregate and "
                              "byzantine are not supported (got compress="
                              f"{self.exchange_spec.compress!r}, aggregate={self.exchange_spec.aggregate!r}, "
                              f"byzantine={self.exchange_spec.byzantine!r})")
        self.check_workers(options, group.world)
        o, n = options, group.world
        self.matrices = [mixing_matrix(o.topology, n, k, o.torus_shape) for k in range(period(o.topology, n))]
        self.receives = [in_neighbours(o.topology, n, k, o.torus_shape) for k in range(len(self.matrices))]
        # rank s sends to every i that receives from s
        self.sends = [[[i for i in range(n) if s in rec[i]] for s in range(n)] for rec in self.receives]

    def setup(self, workers: list[Worker]) -> None:
        self._eval_model = copy.deepcopy(workers[0].model)
        self._consensus = 0.0

    def _state(self, w: Worker, buffers: bool | None = None) -> list[torch.Tensor]:
        """What is mixed and merged: the parameters, then (``buffers=gossip``) the floating buffers."""
        with_buffers = self.options.buffers == "gossip" if buffers is None else buffers
        return [p.data for p in w.params] + (synced_buffers(w.model) if with_buffers else [])

    def after_step(self, workers: list[Worker], step: int) -> None:
        o = self.options
        if o.topology != "none" and step % o.sync_every == 0:
            self.gossip(workers, (step // o.sync_every - 1) % len(self.matrices))
        if step == o.merge_at:
            with torch.no_grad():
                self.group.mean_exact_([self._state(w) for w in workers])

    def gossip(self, workers: list[Worker], phase: int) -> None:
        """x_i ← Σ_j W_ij x_j with the matrix of round ``phase``, summed over j in rank order."""
        w, states = self.matrices[phase], [self._state(wk) for wk in workers]
        flats = [_flat_by_dtype(ts) for ts in states]
        got = self.group.exchange_neighbors(flats, self.sends[phase])
        with torch.no_grad():
            for rank, own, ts, received in zip(self.group.local, flats, states, got, strict=True):
                senders = {**received, rank: own}
                mixed = None
                for j in sorted(senders):
                    term = [f * float(w[rank, j]) for f in senders[j]]
                    mixed = term if mixed is None else [m.add_(t) for m, t in zip(mixed, term, strict=True)]
                _unflat_by_dtype(mixed, ts)

    def eval_model(self, workers: list[Worker]) -> nn.Module:
        """``evaluate=average``: x̄ by an uncounted all-reduce (and buffers: their mean under
        ``buffers=gossip``, else worker 0's); ``local``: local worker 0's model."""
        if self.options.evaluate == "local":
            self._consensus = self._distance(workers, None)
            return workers[0].model
        states = [self._state(w) for w in workers]
        flats = [_flat_by_dtype(ts) for ts in states]
        total = self.group.sum_payloads(flats)  # not charged: evaluation only
        mean = [t / self.group.world for t in total]
        with torch.no_grad():
            for b, wb in zip(self._eval_model.buffers(), workers[0].model.buffers(), strict=True):
                b.copy_(wb)
            _unflat_by_dtype(mean, self._state_of(self._eval_model))
        self._consensus = self._distance(workers, self._state_of(self._eval_model)[:len(workers[0].params)])
        return self._eval_model

    def _state_of(self, model: nn.Module) -> list[torch.Tensor]:
        return [p.data for p in model.parameters()] + (synced_buffers(model) if self.options.buffers == "gossip"
                                                       else [])

    def _distance(self, workers: list[Worker], mean: list[torch.Tensor] | None) -> float:
        """(1/N) Σ_i ‖x_i − x̄‖² over the parameters (uncounted all-reduces)."""
        if mean is None:
            flats = [_flat_by_dtype(self._state(w, buffers=False)) for w in workers]
            mean = [t / self.group.world for t in self.group.sum_payloads(flats)]
            mine = [sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(f, mean, strict=True))
                    for f in flats]
        else:
            mine = [sum(float((p.detach().double() - m.double()).pow(2).sum())
                        for p, m in zip(w.params, mean, strict=True)) for w in workers]
        return self.group.mean_vector([sum(mine) / len(mine)])[0]

    def eval_info(self, workers: list[Worker]) -> dict[str, float]:
        return {"consensus_distance": self._consensus}

    def log_info(self) -> dict[str, Any]:
        o, n = self.options, self.group.world
        degrees = sorted({len(r) for rec in self.receives for r in rec})
        info: dict[str, Any] = {"topology": o.topology, "workers": n, "weights": "uniform 1/(d+1)",
                                "degree": degrees[0] if len(degrees) == 1 else degrees,
                                "rho": contraction(self.matrices), "W": [w.tolist() for w in self.matrices]}
        if o.topology == "torus":
            info["torus_shape"] = "x".join(map(str, torus_shape(n, o.torus_shape)))
        return {"gossip": info}
