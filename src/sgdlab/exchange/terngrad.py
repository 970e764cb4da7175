"""``terngrad``: ternary gradients {−1, 0, 1}·s with scalar sharing and gradient clipping (TernGrad; Wen,
Xu, Yan, Wu, Wang, Chen and Li, "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep
Learning", NeurIPS 2017, arXiv:1705.07878).

Update rule, per tensor ("layer-wise ternarizing", the paper's choice; one segment when the tensor
shapes are unknown), for worker i::

    clip:       g ← sign(g)·min(|g|, c·σ)          σ = the standard deviation of the tensor's elements
    scale:      s_i = max_k |g_k|                   (after clipping)
    share:      s = max_i s_i                       (scalar sharing: every worker uses the largest scale)
    ternarise:  g̃_k = s · sign(g_k) · b_k,   b_k ~ Bernoulli(|g_k| / s)

so E[g̃] = g (unbiased for the clipped vector; clipping itself is the paper's deliberate bias). Defaults
as in the paper: ``clip`` c = 2.5 (0 disables clipping; a tensor whose σ is 0 is not clipped, since
clipping it would zero it), ``share`` on. σ is the population standard deviation (around the mean).

How scalar sharing is done here: each worker ternarises with its own scale s_i (its ``encode``; what an
error-feedback rule sees as its message), the workers all-gather their per-tensor scales (4 bytes per
tensor, counted), and each worker then thins its nonzero entries, keeping each with probability s_i / s
(an independent Bernoulli draw from its own seeded stream). A kept entry is Bernoulli(|g_k|/s_i · s_i/s)
= Bernoulli(|g_k|/s), exactly the distribution of ternarising with the shared s directly, as the paper's
Algorithm 1 does after exchanging the scalars. Then the 2-bit ternaries are all-gathered and decoded with
the shared s. With ``share=false`` each worker's payload carries its own scales (one collective). With
``share=true`` and an error-feedback rule, the memory is computed from the worker's own-scale message
(same expectation as what is sent); use ``share=false`` when the EF invariant must hold exactly.

Encoding: the code g̃/s + 1 ∈ {0, 1, 2} in 2 bits, packed 4 per byte (``⌈n/4⌉`` bytes), plus one float32
scale per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import _quant
from .base import Compressor


@dataclass
class TernGradOptions:
    clip: float = 2.5     # c: clip |g| at c·σ before ternarising (0: no clipping)
    share: bool = True    # scalar sharing: every worker ternarises with the max of the workers' scales

    def validate(self) -> None:
        if not isinstance(self.clip, float) or not math.isfinite(self.clip) or self.clip < 0:
            raise ConfigError(f"clip={self.clip!r}: terngrad's clip must be a finite number >= 0 (c in c·σ; "
                              "0 disables clipping)")


class TernGrad(Compressor):
    name = "terngrad"
    description = ("TernGrad (Wen et al. 2017): per-tensor ternary {-1,0,1}·max|g| after clipping at `clip`·σ, "
                   "stochastic, unbiased; 2 bits per element + one float32 scale per tensor, scales shared")
    Options = TernGradOptions

    def nbytes(self, n: int, tensors: int = 1) -> int:
        return _quant.packed_bytes(n, 2) + 4 * tensors

    def clipped(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """``x`` with each tensor clipped at ``clip``·σ (σ of that tensor; unclipped where σ = 0)."""
        if not self.options.clip:
            return x
        parts = [x] if len(sizes) == 1 else torch.split(x, sizes)
        sigma = torch.stack([p.std(correction=0) if p.numel() > 1 else p.new_zeros(()) for p in parts])
        bound = torch.where(sigma > 0, self.options.clip * sigma, torch.full_like(sigma, math.inf))
        if len(sizes) == 1:
            return x.clamp(-bound[0], bound[0])
        out = torch.empty_like(x)  # tensor by tensor: no per-element copy of the bounds
        for part, o, b in zip(parts, torch.split(out, sizes), bound.unbind(), strict=True):
            torch.clamp(part, -b, b, out=o)
        return out

    def encode(self, x, slot=None, rank=0):
        sizes = _quant.segments(x.numel(), slot)
        g = self.clipped(x.float(), sizes)
        p = g.abs()
        scale = _quant.per_segment(p, sizes, "amax")
        for q, sc in zip(torch.split(p, sizes), scale.unbind(), strict=True):  # |g| / max|g| in place, per tensor
            q.div_(torch.where(sc > 0, sc, torch.ones_like(sc)))
        keep = _quant.uniform(x.numel(), self.name, slot, rank, x.device) < p
        return [_quant.pack(torch.sign(g).mul_(keep).add_(1), 2), scale]   # code g̃/s + 1 ∈ {0, 1, 2}

    def decode(self, payload, n, slot=None, rank=0):
        packed, scale = payload
        sizes = _quant.segments(n, slot)
        if len(sizes) != scale.numel():
            sizes = [n]
        return _quant.unpack(packed, 2, n).float().sub_(1).mul_(_quant.spread(scale, sizes))

    def communicate(self, payloads, group, n, slot, aggregator):
        if not self.options.share:
            return super().communicate(payloads, group, n, slot, aggregator)
        # 1. every worker's per-tensor scales → the shared scale s = max_i s_i
        scales = group.gather_payloads([[p[1]] for p in payloads])
        shared = torch.stack([sc[0] for sc in scales]).amax(0)
        sent1, secs1 = group.network.all_gather(4 * shared.numel(), group.world)
        # 2. each worker thins its ternary to the shared scale, then the 2-bit codes are all-gathered
        sizes = _quant.segments(n, slot)
        thinned = []
        for rank, (packed, own) in zip(group.local, payloads, strict=True):
            ratio = own / torch.where(shared > 0, shared, torch.ones_like(shared))
            keep = _quant.uniform(n, self.name + "/share", slot, rank, packed.device) < _quant.spread(ratio, sizes)
            codes = _quant.unpack(packed, 2, n)
            thinned.append([_quant.pack(torch.where(keep, codes, torch.ones_like(codes)), 2)])
        gathered = group.gather_payloads(thinned)
        sent2, secs2 = group.network.all_gather(_quant.packed_bytes(n, 2), group.world)
        decoded = [self.decode([p[0], shared], n, slot, r) for r, p in enumerate(gathered)]
        return aggregator(decoded), sent1 + sent2, secs1 + secs2
