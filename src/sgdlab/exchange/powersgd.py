"""PowerSGD: rank-r compression by one power iteration per round, warm-started, with error feedback.

Vogels, Karimireddy & Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", NeurIPS 2019 (arXiv:1905.13727), Algorithm 1 (rank-r compression and aggregation) inside
Algorithm 2 (error feedback).

The round's flat vector is split back into its tensors (``Slot.shapes``). A tensor with two or more
dimensions is viewed as a matrix ``M ∈ R^{n×m}`` (``n = shape[0]``, ``m`` the rest) and compressed at
rank ``r = min(rank, n, m)``, unless the two factors would not be smaller than the matrix
(``r·(n + m) · min_ratio >= n·m``); vectors (biases, norm scales) and those matrices are sent exactly.
For every compressed matrix, with ``W`` workers and ``Q ∈ R^{m×r}`` shared by all of them::

    M_w  = x_w + e_w                          worker w's update plus its memory (e_w = 0 at first)
    P    = (1/W) Σ_w M_w Q                    all-reduce 1 (together with the uncompressed tensors)
    P̂    = orthogonalise(P)                   modified Gram–Schmidt: p_i ← p_i − Σ_{j<i} (p̂_jᵀ p_i) p̂_j,
                                              p̂_i = p_i / (‖p_i‖ + epsilon)
    Q_w  = M_wᵀ P̂,    Q = (1/W) Σ_w Q_w        all-reduce 2
    out  = P̂ Qᵀ                               what every worker receives (the mean of the P̂ Q_wᵀ)
    e_w  ← M_w − P̂ Q_wᵀ                        Algorithm 2, line 9: minus the worker's own decoded message
    Q    is kept for the next round           warm start (``warm_start=false``: drawn afresh each round)

Two collectives per round, both ring all-reduces of float32: each worker sends
``2(W−1)/W · 4 · (Σ n·r + uncompressed values)`` and then ``2(W−1)/W · 4 · Σ m·r`` bytes; a round with
no compressed matrix is one all-reduce. The uncompressed tensors leave no residual.

Defaults: ``rank=2``, the rank of the paper's main ResNet-18 / CIFAR-10 experiments (its LSTM runs
use rank 4; epfml/powersgd and torch's ``powerSGD_hook`` default to 1); ``Q`` initialised i.i.d.
standard normal, as in the paper, from a generator seeded by the run's seed, the stream and the tensor's
index, so every worker (every process) starts from the same ``Q``; ``epsilon=1e-8`` (as epfml's
``orthogonalize``; the torch hook's default is 0); ``min_ratio=1``: compress whenever it is smaller.

Error feedback is PowerSGD's own (``error_feedback=true``): the residual ``e_w`` and the worker's copy
of every warm-started ``Q`` live in the worker's exchange memory for the stream (``powersgd.e``,
``powersgd.q<i>``; the exchange checkpoints it, ``Exchange.state_dict()["memory"]["<stream>/<rank>"]``),
so a resumed run continues bit for bit. A ``feedback=`` rule on top is refused (it would correct twice,
and a lone worker's message cannot be decoded before the round's ``P̂`` is known), and so is an
aggregator other than the mean (the all-reduces sum the workers' factors).

Differences from the reference code:

* epfml/powersgd and the torch hook keep ``e_w = M_w − P̂ Qᵀ`` (minus the aggregate; the hook also keeps
  ``own − mean`` for the uncompressed tensors), this keeps the paper's ``M_w − P̂ Q_wᵀ``. Both
  all-reduces are linear in the ``M_w``, so every round's output depends on the workers only through
  their mean, and the mean of the memories is the same under both rules: the outputs (the training)
  are the same in exact arithmetic; only how the residual is split among the workers differs.
* The torch hook sends plain all-reduces for its first ``start_powerSGD_iter=1000`` steps and compresses
  only at ``min_compression_rate=2``; epfml's current ``Config`` (arXiv:2008.01425) uses two power
  iterations per step and ``min_compression_rate=10``. Here: compressed from the first round, one
  iteration, ``min_ratio=1``.
* A column of the warm-started ``Q`` that came back exactly zero (a matrix whose update was zero, such as
  an unused layer) is drawn afresh from the shared seed; warm-started, it would stay zero for good.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .base import Compressor, Slot


@dataclass
class PowerSGDOptions:
    rank: int = 2                  # r: columns of P and Q
    min_ratio: float = 1.0         # compress a matrix only if n·m > min_ratio · r·(n + m)
    epsilon: float = 1e-8          # Gram–Schmidt: p / (‖p‖ + epsilon)
    warm_start: bool = True        # reuse last round's Q (else draw a new one every round)
    error_feedback: bool = True    # keep e_w = M_w − P̂ Q_wᵀ and add it to the next round's update

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank={self.rank!r}: the rank of PowerSGD's factors must be an integer >= 1")
        if not math.isfinite(self.min_ratio) or self.min_ratio < 0:
            raise ConfigError(f"min_ratio={self.min_ratio!r}: allowed is a finite number >= 0 (compress a matrix "
                              "when n*m > min_ratio * rank * (n + m))")
        if not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise ConfigError(f"epsilon={self.epsilon!r}: allowed is a finite number >= 0")


@dataclass(frozen=True)
class _Part:
    offset: int
    numel: int
    rows: int = 0
    cols: int = 0
    rank: int = 0     # 0: sent uncompressed

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset:self.offset + self.numel]


def orthogonalise(p: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Modified Gram–Schmidt on the columns of ``p`` (in place; returned)."""
    for i in range(p.shape[1]):
        col = p[:, i:i + 1]
        col.div_(col.norm() + epsilon)
        if i + 1 < p.shape[1]:
            rest = p[:, i + 1:]
            rest.sub_(col * (col * rest).sum(0, keepdim=True))
    return p


def initial_q(seed: int, key: str, index: int, cols: int, rank: int, draw: int = 0) -> torch.Tensor:
    """Standard normal ``cols × rank`` matrix every worker draws alike (``draw`` > 0: a fresh one)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{key}/{index}/{draw}".encode())) % 2**63)
    return torch.randn(cols, rank, generator=g)


class PowerSGD(Compressor):
    name = "powersgd"
    description = ("PowerSGD (Vogels et al. 2019): rank-`rank` P Qᵀ of every matrix by one warm-started power "
                   "iteration, two all-reduces, own error feedback; vectors sent exactly")
    Options = PowerSGDOptions
    summable = True
    stateful = True       # encode gets the worker's memory: residual "powersgd.e", warm start "powersgd.q<i>"
    own_feedback = True   # the residual is PowerSGD's own error feedback: no feedback= rule on top
    mean_only = True      # the all-reduces sum the workers' factors: only the mean aggregates them

    def __init__(self, options: Any = None):
        super().__init__(options)
        self._memory: dict[int, dict[str, torch.Tensor]] = {}   # this round's memory dict of each local worker
        self._own: dict[str, dict[str, torch.Tensor]] = {}

    def encode(self, x, slot=None, rank=0, memory=None):
        """``M_w = x_w + e_w``; the factors depend on every worker's ``P``, so they are made in communicate."""
        if memory is None:  # called without the exchange's memory: keep it here (not checkpointed)
            memory = self._own.setdefault(f"{slot.key if slot is not None else ''}/{rank}", {})
        self._memory[rank] = memory
        e = memory.get("powersgd.e") if self.options.error_feedback else None
        return [x + e if e is not None else x]

    def decode(self, payload, n, slot=None, rank=0):
        raise NotImplementedError("PowerSGD decodes the round's factors in communicate, not one payload")

    def layout(self, shapes: tuple[torch.Size, ...], n: int) -> list[_Part]:
        """Where each tensor lies in the flat vector, and whether (at which rank) it is compressed."""
        shapes = shapes or (torch.Size([n]),)
        parts, offset = [], 0
        for shape in shapes:
            numel = math.prod(shape)
            part = _Part(offset, numel)
            if len(shape) >= 2 and numel > 0:
                rows, cols = shape[0], numel // shape[0]
                r = min(self.options.rank, rows, cols)
                if rows * cols > self.options.min_ratio * r * (rows + cols):
                    part = _Part(offset, numel, rows, cols, r)
            parts.append(part)
            offset += numel
        if offset != n:
            raise ValueError(f"powersgd: the slot's shapes hold {offset} values, the vector has {n}")
        return parts

    def _q(self, memory: dict[str, torch.Tensor], slot: Slot, i: int, part: _Part, device) -> torch.Tensor:
        """This worker's copy of tensor ``i``'s ``Q`` (the same on every worker)."""
        q = memory.get(f"powersgd.q{i}")
        if not self.options.warm_start:
            q = initial_q(slot.seed, slot.key, i, part.cols, part.rank, draw=slot.step)
        elif q is None or q.shape != (part.cols, part.rank):
            q = initial_q(slot.seed, slot.key, i, part.cols, part.rank)
        else:
            dead = ~q.any(0)
            if dead.any():
                q = q.clone()
                q[:, dead] = initial_q(slot.seed, slot.key, i, part.cols, part.rank, slot.step).to(q.device)[:, dead]
        return q.to(device)

    def communicate(self, payloads, group, n, slot, aggregator):
        if not aggregator.linear:
            raise ConfigError(f"compress=powersgd needs aggregate=mean (its all-reduces sum the workers' factors), "
                              f"got aggregate={aggregator.name}")
        o = self.options
        parts = self.layout(slot.shapes, n)
        low = [(i, p) for i, p in enumerate(parts) if p.rank]
        exact = [p for p in parts if not p.rank]
        ms = [payload[0] for payload in payloads]           # M_w, one flat vector per local worker
        memories = [self._memory.pop(rank, {}) for rank in group.local]

        def mat(m, p):
            return p.view(m).view(p.rows, p.cols)

        # all-reduce 1: P_w = M_w Q, together with the uncompressed tensors
        first = []
        for m, memory in zip(ms, memories, strict=True):
            qs = [self._q(memory, slot, i, p, m.device) for i, p in low]
            first.append(torch.cat([(mat(m, p) @ q).reshape(-1) for (_, p), q in zip(low, qs, strict=True)]
                                   + [p.view(m) for p in exact]))
        (total,) = group.sum_payloads([[f] for f in first])
        total.div_(group.world)
        sent, secs = group.network.all_reduce(self.payload_bytes([first[0]]), group.world)
        out = torch.empty(n, dtype=total.dtype, device=total.device)
        phat, offset = [], 0
        for _, p in low:
            size = p.rows * p.rank
            phat.append(orthogonalise(total[offset:offset + size].view(p.rows, p.rank).clone(), o.epsilon))
            offset += size
        for p in exact:
            p.view(out).copy_(total[offset:offset + p.numel])
            offset += p.numel
        if not low:
            return out, sent, secs

        # all-reduce 2: Q_w = M_wᵀ P̂
        own = [[mat(m, p).T @ ph for (_, p), ph in zip(low, phat, strict=True)] for m in ms]
        second = [torch.cat([q.reshape(-1) for q in qw]) for qw in own]
        (qtotal,) = group.sum_payloads([[s] for s in second])
        qtotal.div_(group.world)
        more, more_secs = group.network.all_reduce(self.payload_bytes([second[0]]), group.world)
        offset, qbar = 0, []
        for (_, p), ph in zip(low, phat, strict=True):
            size = p.cols * p.rank
            qbar.append(qtotal[offset:offset + size].view(p.cols, p.rank))
            offset += size
            torch.mm(ph, qbar[-1].T, out=mat(out, p))
        for m, memory, qw in zip(ms, memories, own, strict=True):
            for (i, _), q in zip(low, qbar, strict=True):
                memory[f"powersgd.q{i}"] = q.clone()          # warm start: every worker keeps the same Q
            if o.error_feedback:                               # e_w = M_w − P̂ Q_wᵀ (0 where sent exactly)
                e = memory.get("powersgd.e")                   # overwritten in place: M_w no longer needs it
                if e is None or e.shape != m.shape:
                    e = torch.zeros_like(m)
                for (_, p), ph, q in zip(low, phat, qw, strict=True):
                    torch.addmm(mat(m, p), ph, q.T, alpha=-1, out=mat(e, p))
                memory["powersgd.e"] = e
        return out, sent + more, secs + more_secs
