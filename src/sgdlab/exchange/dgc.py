"""``dgc``: Deep Gradient Compression (Lin, Han, Mao, Wang & Dally, ICLR 2018, arXiv:1712.01887) — top-k
of a locally accumulated, momentum-corrected gradient, so that about 0.1 % of the entries are sent.

Each worker k keeps a velocity u and an accumulation v per stream (in the exchange's per-worker memory,
so they are checkpointed) and, for the vector g it is given each round (its gradient in ``ddp``)::

    g ← g · min(1, clip·√N / (‖g‖ + 1e-6))          local gradient clipping (clip > 0), N = workers
    u ← m·u + g,        v ← v + u                    momentum correction (nesterov: u ← m·(u + g),
                                                                           v ← v + u + g)
    I ← the top-k(ratio_t) entries of |v|, per tensor (Algorithm 1 picks a threshold per layer)
    send v_I;  v_I ← 0;  u_I ← 0                     sparsify; momentum factor masking (masking=true)

and the exchange returns the mean of the workers' sparse v_I, which the strategy hands to the inner
optimizer. The paper writes the step as a *sum* over nodes of G_k = g_k / N (each node's share of the
gradient of the whole batch) and clips each G_k at the global threshold times N^(-1/2) (the sum of N
i.i.d. gradients has √N times their norm); sgdlab's workers hold mean gradients g_k and the exchange
averages, and every step above is linear or scale-free, so that is the same rule with ‖g_k‖ ≤ clip·√N.
``--grad-clip`` is not this: it clips the averaged update after the exchange.

**Use DGC with an inner SGD without momentum** (``--optimizer sgd`` with momentum 0; in ``diloco`` an
outer SGD without momentum): the momentum lives in DGC's velocity, and the update is
w ← w − η · mean_k(v_I^k), the paper's ``ω ← SGD(ω, G̃)`` with momentum folded into u. Weight decay set on
the inner optimizer is applied to the parameters after the exchange, outside the momentum.

**Defaults are the paper's**: ratio 0.001 (99.9 % sparsity), momentum 0.9 (the paper's SGD momentum),
masking on, Nesterov off. Local clipping is off by default (``clip=0``); the paper clips for the
recurrent models with the global threshold it would use undistributed — give that as ``clip``.
Warm-up: the paper raises the sparsity exponentially over the first four epochs, 75 %, 93.75 %,
98.4375 %, 99.6 %, then the target; sgdlab has no epochs at the exchange, so ``warmup_steps=W`` spreads
those four stages over training steps 1..W (stage ``⌊4(step−1)/W⌋``, ratio ``max(ratio, 4^-(stage+1))``);
the paper's setting is W = 4 epochs' worth of steps. ``warmup_steps=0`` (the default) starts at the target.

**Selection and encoding** are :mod:`~sgdlab.exchange.topk`'s: exact top-k (ties to the lower index),
``k_l = ceil(ratio_t · n_l)`` per tensor of the slot (``per_tensor=false``: one top-k over the whole
vector), payload = the float32 values + int32 indices or a bitmap over the vector, whichever is smaller;
all-gathered (``(N − 1) ×`` payload per worker).

The paper estimates the threshold from a 0.1–1 % sample of |v|; sgdlab's selection is exact (a strided
sample only narrows the candidates, see :func:`~sgdlab.exchange.topk.top_indices`), so k is met exactly.

**What the reference code (synxlin/deep-gradient-compression) does differently**: it estimates the
threshold from a 1 % strided sample and accepts 0.8–1.3× the target count (adapting up to 10 times,
then an exact top-k of the candidates), where sgdlab takes the exact top-k; it sparsifies only tensors
with ≥ 2 dimensions and sends biases and norms dense (with the momentum applied locally), where sgdlab
follows the paper and sparsifies every tensor; its weight decay gets its own local momentum buffer;
its optional clipping is a callable on each gradient tensor (e.g. by a norm all-reduced across workers),
not the N^(-1/2)-scaled local threshold; its warm-up is ``ratio^((e+1)/(E+1))`` per epoch over E = 5
epochs (0.316, 0.1, 0.0316, 0.01, 0.00316), not the paper's powers of 1/4; it sends int64 indices (int32
optional) and no bitmap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Compressor
from .topk import check_ratio, decode_sparse, encode_sparse, num_kept, sparse_bytes, top_indices

WARMUP_STAGES = 4      # the paper's four warm-up epochs
WARMUP_BASE = 0.25     # ... at sparsity 1 - 4^-(e+1): 75 %, 93.75 %, 98.4375 %, 99.6 %


@dataclass
class DGCOptions:
    ratio: float = 0.001      # entries kept after the warm-up, in (0, 1] (the paper: 99.9 % sparsity)
    momentum: float = 0.9     # m of the momentum correction, in [0, 1)
    nesterov: bool = False    # Nesterov momentum correction (the paper's appendix)
    masking: bool = True      # momentum factor masking: zero u where v was sent
    clip: float = 0.0         # global gradient-norm threshold; each worker clips its own at clip*sqrt(N); 0: off
    warmup_steps: int = 0     # the paper's 4-stage sparsity warm-up over steps 1..warmup_steps; 0: off
    per_tensor: bool = True   # top-k per tensor (the paper's per-layer threshold); false: whole vector

    def validate(self) -> None:
        check_ratio(self.ratio)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum!r}: the DGC momentum must be in [0, 1)")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ConfigError(f"clip={self.clip!r}: the clipping threshold must be a finite number >= 0 (0: off)")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r}: must be an integer >= 0 (0: no warm-up)")


class DGC(Compressor):
    name = "dgc"
    description = ("Deep Gradient Compression: top-k of the momentum-corrected accumulation, momentum masking, "
                   "local clipping, sparsity warm-up (inner SGD without momentum)")
    Options = DGCOptions
    stateful = True
    own_feedback = True

    def ratio_at(self, step: int) -> float:
        """The fraction kept at training step ``step`` (1-based): the warm-up schedule, then ``ratio``."""
        o = self.options
        s = step - 1
        if o.warmup_steps > 0 and 0 <= s < o.warmup_steps:
            return max(o.ratio, WARMUP_BASE ** (s * WARMUP_STAGES // o.warmup_steps + 1))
        return o.ratio

    def _sizes(self, n: int, slot) -> list[int]:
        sizes = [math.prod(s) for s in slot.shapes] if slot is not None and slot.shapes else []
        return sizes if self.options.per_tensor and sum(sizes) == n else [n]

    def kept(self, n: int, slot) -> int:
        ratio = self.ratio_at(slot.step if slot is not None else 1)
        return sum(num_kept(ratio, m) for m in self._sizes(n, slot))

    def nbytes(self, n: int, slot=None) -> int:
        return sparse_bytes(n, self.kept(n, slot))

    def select(self, v: torch.Tensor, slot) -> torch.Tensor:
        ratio = self.ratio_at(slot.step if slot is not None else 1)
        parts, offset = [], 0
        for m in self._sizes(v.numel(), slot):
            parts.append(top_indices(v[offset:offset + m].abs(), num_kept(ratio, m)) + offset)
            offset += m
        return torch.cat(parts)

    def encode(self, x, slot=None, rank=0, memory=None):
        o = self.options
        memory = {} if memory is None else memory   # without one: a fresh worker, nothing kept
        g = x.float()
        if o.clip > 0:
            threshold = o.clip * math.sqrt(slot.world if slot is not None else 1)  # (clip / √N) · N, see above
            coef = threshold / (float(g.norm()) + 1e-6)
            if coef < 1:
                g = g * coef
        u = memory["dgc.u"] if "dgc.u" in memory else torch.zeros_like(g)   # out of place below: a loaded
        v = memory["dgc.v"] if "dgc.v" in memory else torch.zeros_like(g)   # checkpoint is never written
        if o.nesterov:
            u = (u + g) * o.momentum
            v = v + u + g
        else:
            u = u * o.momentum + g
            v = v + u
        idx = self.select(v, slot)
        payload = encode_sparse(v, idx)
        v[idx] = 0
        if o.masking:
            u[idx] = 0
        memory["dgc.u"], memory["dgc.v"] = u, v
        return payload

    def decode(self, payload, n, slot=None, rank=0):
        return decode_sparse(payload, n)
