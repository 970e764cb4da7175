"""``qsgd``: stochastic quantisation to ``levels`` levels per bucket (QSGD; Alistarh, Grubic, Li, Tomioka
and Vojnovic, "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017,
arXiv:1610.02132).

Update rule (the paper's Q_s, applied to each bucket v of ``bucket`` consecutive elements)::

    Q_s(v_i) = ‖v‖₂ · sign(v_i) · ξ_i / s,   r_i = s·|v_i|/‖v‖₂,   l_i = ⌊r_i⌋,
    ξ_i = l_i + 1 with probability r_i − l_i, else l_i

so E[Q_s(v)] = v (unbiased) and E‖Q_s(v) − v‖² ≤ min(d/s², √d/s)·‖v‖² for a bucket of d elements (the
paper's Lemma 3.1; with buckets the bound holds per bucket, hence for the whole vector with d = bucket).

Encoding (what is sent and counted): each element's signed level ``sign(v_i)·ξ_i ∈ {−s, …, s}`` as the
code ``sign·ξ + s`` in the fewest whole bits that hold 2s + 1 values, ``b = ⌈log₂(2s + 1)⌉`` (s = 1: 2
bits, s = 7: 4 bits, s = 127: 8 bits), bit-packed over the whole vector into ``⌈n·b/8⌉`` uint8 bytes;
plus one float32 norm per bucket, ``4·⌈n/bucket⌉`` bytes. The paper's Elias coding of the levels (its
theoretical bit counts) is not used: like the paper's own experiments it sends fixed-width codes.
Payloads are all-gathered and every worker decodes and averages them in rank order.

Options and defaults: ``levels`` s (default 7, i.e. 4 bits per element with the sign: the paper's "4bit
QSGD"), ``bucket`` d (default 512, the bucket size the paper reports for its 4-bit runs; 0 = one bucket,
the whole vector, as in the paper's analysis). The norm is the bucket's 2-norm, for which the bounds
above hold (max-norm scaling, a common practical variant, is not offered). Randomness: one uniform per
element from a stream seeded by (run seed, slot key, step, rank), identical on both backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import _quant
from .base import Compressor

MAX_LEVELS = 2 ** 15 - 1  # 16-bit codes; finer levels are below float32's resolution of |v_i|/‖v‖ anyway


@dataclass
class QSGDOptions:
    levels: int = 7      # s: quantisation levels per sign (|v_i|/‖v‖ rounded to a multiple of 1/s)
    bucket: int = 512    # d: elements per float32 norm (0: the whole vector is one bucket)

    def validate(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 1 <= self.levels <= MAX_LEVELS:
            raise ConfigError(f"levels={self.levels!r}: qsgd's levels must be an integer in 1..{MAX_LEVELS}")
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket < 0:
            raise ConfigError(f"bucket={self.bucket!r}: qsgd's bucket must be an integer >= 1 "
                              "(elements per norm), or 0 for one bucket")


class QSGD(Compressor):
    name = "qsgd"
    description = ("QSGD (Alistarh et al. 2017): unbiased stochastic rounding of |x|/‖x‖ to `levels` levels per "
                   "`bucket`, sign+level in ⌈log2(2s+1)⌉ bits, one float32 norm per bucket")
    Options = QSGDOptions

    @property
    def bits(self) -> int:
        return math.ceil(math.log2(2 * self.options.levels + 1))

    def _bucket(self, n: int) -> int:
        return self.options.bucket or max(n, 1)

    def nbytes(self, n: int) -> int:
        """Payload bytes for ``n`` elements: the packed codes plus one float32 norm per bucket."""
        return _quant.packed_bytes(n, self.bits) + 4 * math.ceil(n / self._bucket(n))

    def encode(self, x, slot=None, rank=0):
        s, n, d = self.options.levels, x.numel(), self._bucket(x.numel())
        x = x.float()
        buckets = (x if n % d == 0 else torch.nn.functional.pad(x, (0, (-n) % d))).view(-1, d)
        norms = torch.linalg.vector_norm(buckets, dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        r = (buckets.abs() / safe[:, None]).view(-1)[:n].mul_(s)      # s·|v_i|/‖v‖ ∈ [0, s]
        level = r.floor()
        up = _quant.uniform(n, self.name, slot, rank, x.device) < r.sub_(level)   # P(up) = r − ⌊r⌋
        code = level.add_(up).clamp_(max=s).mul_(torch.sign(x)).add_(s)           # sign·ξ + s ∈ [0, 2s]
        return [_quant.pack(code, self.bits), norms]

    def decode(self, payload, n, slot=None, rank=0):
        packed, norms = payload
        s, d = self.options.levels, self._bucket(n)
        q = _quant.unpack(packed, self.bits, n).float().sub_(s).div_(s)
        return (q.view(-1, d) * norms[:, None]).view(-1)[:n] if n % d == 0 else \
            q * norms.repeat_interleave(d)[:n]
