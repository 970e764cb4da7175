"""Low-precision exchange (SCOPE C1): ``fp32`` (lossless), ``bf16``, ``fp16``, and ``int8``/``int4`` with
per-block absmax scales.

Byte counts are the payload tensors' sizes: ``bf16``/``fp16`` send two bytes per element; ``int8`` sends
one byte per element plus one float32 scale per block of ``block`` elements (default 128); ``int4`` packs
two elements per byte (``ceil(n / 2)`` bytes) plus the same scales. Quantisation is symmetric and rounds to
nearest: ``q = round(x / s)`` with ``s = max|x_block| / qmax`` (qmax = 127 for int8, 7 for int4), so the
error per element is at most s/2.

**The collective.** ``fp32`` payloads add up, so its collective is a ring all-reduce. The low-precision
formats are averaged by a *quantised reduce-scatter followed by an all-gather* (the exchange the Streaming
DiLoCo paper, Douillard et al. 2025, assumes for its low-precision outer gradients):

1. every worker quantises its whole vector (the payload above) and cuts it into N chunks, one per rank
   (``int8``/``int4`` chunks start on block boundaries, so a chunk is exactly the quantisation of that
   slice of the vector, scales included);
2. reduce-scatter: worker r receives the N quantised copies of chunk r (an all-to-all), decodes them, sums
   them in float32 in rank order, divides by N and quantises its averaged chunk again;
3. all-gather: every worker receives the N quantised averaged chunks and decodes them.

Each value is thus rounded twice (once by its worker, once after averaging). **Bytes charged**: in step 2 a
worker sends N − 1 of its N chunks, in step 3 its averaged chunk is forwarded N − 1 times along the ring, so
all workers together send ``2(N − 1) × payload`` and each worker is charged the average,
``2(N − 1)/N × payload`` (chunks may differ by a block, so single workers send slightly more or less), in
``2(N − 1)·latency + 8·bytes/bandwidth`` seconds: the cost of a ring all-reduce of the payload. On
``torch.distributed`` step 2 is one ``all_to_all_single`` per payload tensor (gloo and NCCL) and step 3 an
``all_gather`` of the chunks padded to the largest one (the padding is not charged). With a non-linear
aggregator (a robust rule needs every worker's whole vector) or one worker, the payloads are all-gathered
instead, decoded and aggregated in rank order (``(N − 1) ×`` payload per worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import Compressor

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
DEFAULT_BLOCK = 128


@dataclass
class BlockOptions:
    block: int = DEFAULT_BLOCK   # elements per float32 scale

    def validate(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2 or self.block % 2:
            raise ConfigError(f"block={self.block!r}: the quantisation block must be an even integer >= 2")


class Precision(Compressor):
    """A number format for every value of the vector."""

    def nbytes(self, n: int) -> int:
        """Analytic payload size in bytes for ``n`` elements."""
        raise NotImplementedError

    # ---- the quantised reduce-scatter + all-gather (lossy formats under a linear aggregator) ----------
    def chunk_bounds(self, n: int, world: int) -> list[tuple[int, int]]:
        """The element range [start, end) of each rank's chunk: ``n`` split as evenly as possible."""
        return [(r * n // world, (r + 1) * n // world) for r in range(world)]

    def chunk(self, payload: list[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
        """The payload tensors of elements [start, end) (what encoding that slice alone gives)."""
        return [payload[0][start:end]]

    def communicate(self, payloads, group, n, slot, aggregator):
        if self.lossless or not aggregator.linear or group.world == 1:
            return super().communicate(payloads, group, n, slot, aggregator)
        world = group.world
        bounds = self.chunk_bounds(n, world)
        sends = [[self.chunk(p, s, e) for s, e in bounds] for p in payloads]
        averaged = []  # each local worker's own chunk, averaged over the workers and quantised again
        for rank, copies in zip(group.local, group.scatter_chunks(sends), strict=True):
            size = bounds[rank][1] - bounds[rank][0]
            total = self.decode(copies[0], size, slot, 0).clone()
            for src in range(1, world):
                total += self.decode(copies[src], size, slot, src)
            averaged.append(self.encode(total.div_(world), slot, rank))
        sizes = [[t.numel() for t in c] for c in sends[0]]  # chunk j's tensor sizes (alike on every worker)
        widest = [max(s[k] for s in sizes) for k in range(len(sizes[0]))]
        padded = [[torch.cat([t, t.new_zeros(w - t.numel())]) for t, w in zip(p, widest, strict=True)]
                  for p in averaged]
        gathered = group.gather_payloads(padded)
        parts = [self.decode([t[:k] for t, k in zip(p, sizes[r], strict=True)], e - s, slot, r)
                 for r, (p, (s, e)) in enumerate(zip(gathered, bounds, strict=True))]
        nbytes = sum(self.payload_bytes(c) for c in sends[0])  # == the whole payload's bytes
        sent, secs = group.network.all_reduce(nbytes, world)
        return torch.cat(parts), sent, secs


class FP32(Precision):
    name = "fp32"
    description = "lossless float32 (a ring all-reduce of the values)"
    summable = lossless = True

    def nbytes(self, n: int) -> int:
        return 4 * n

    def encode(self, x, slot=None, rank=0):
        return [x]

    def decode(self, payload, n, slot=None, rank=0):
        return payload[0].float()


class _Half(Precision):
    dtype: ClassVar[torch.dtype]

    def nbytes(self, n: int) -> int:
        return 2 * n

    def encode(self, x, slot=None, rank=0):
        return [x.to(self.dtype)]

    def decode(self, payload, n, slot=None, rank=0):
        return payload[0].float()


class BF16(_Half):
    name = "bf16"
    description = ("bfloat16 values (2 bytes each), rounded to nearest; averaged by a quantised "
                   "reduce-scatter + all-gather")
    dtype = torch.bfloat16


class FP16(_Half):
    name = "fp16"
    description = ("float16 values (2 bytes each), rounded to nearest; averaged by a quantised "
                   "reduce-scatter + all-gather")
    dtype = torch.float16


class _Int(Precision):
    Options = BlockOptions
    qmax: ClassVar[int]

    @property
    def block(self) -> int:
        return self.options.block

    def nbytes(self, n: int) -> int:
        scales = 4 * math.ceil(n / self.block)
        return scales + (n if self.qmax == 127 else math.ceil(n / 2))

    def chunk_bounds(self, n: int, world: int) -> list[tuple[int, int]]:
        """Whole blocks per chunk (as evenly as possible), so a chunk carries its own scales."""
        blocks = math.ceil(n / self.block)
        return [(min(n, r * blocks // world * self.block), min(n, (r + 1) * blocks // world * self.block))
                for r in range(world)]

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as rows of ``block`` values (a view when ``block`` divides its length, else zero-padded)."""
        pad = (-x.numel()) % self.block
        return (torch.nn.functional.pad(x, (0, pad)) if pad else x.contiguous()).view(-1, self.block)

    def _quantise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.numel()
        blocks = self._blocks(x)
        lo, hi = torch.aminmax(blocks, dim=1)  # max |x| per block in one pass, without an |x| copy
        scale = torch.maximum(hi, lo.neg_()).div_(self.qmax)
        # an all-zero block gets scale 1; a block holding NaN keeps scale NaN (and one holding ±Inf scale Inf),
        # so that its decoded values are not finite either and the exchange's check sees them: integer codes
        # alone cannot carry NaN
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (blocks / scale[:, None]).round_().clamp_(-self.qmax, self.qmax).view(-1)[:n]
        return q, scale.float()

    def _dequantise(self, q: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
        return (self._blocks(q) * scale[:, None]).view(-1)[:n]


class INT8(_Int):
    name = "int8"
    description = "int8 with one float32 absmax scale per block of `block` values"
    qmax = 127

    def chunk(self, payload, start, end):
        data, scale = payload
        return [data[start:end], scale[start // self.block:math.ceil(end / self.block)]]

    def encode(self, x, slot=None, rank=0):
        q, scale = self._quantise(x)
        return [q.to(torch.int8), scale]

    def decode(self, payload, n, slot=None, rank=0):
        data, scale = payload
        return self._dequantise(data.float(), scale, n)


class INT4(_Int):
    name = "int4"
    description = "int4 (two values per byte) with one float32 absmax scale per block of `block` values"
    qmax = 7

    def chunk(self, payload, start, end):  # start is a multiple of the (even) block: whole bytes
        data, scale = payload
        return [data[start // 2:math.ceil(end / 2)], scale[start // self.block:math.ceil(end / self.block)]]

    def encode(self, x, slot=None, rank=0):
        q, scale = self._quantise(x)
        u = q.add_(8).to(torch.uint8)  # 1..15 (q is this call's own tensor)
        if x.numel() % 2:
            u = torch.cat([u, u.new_zeros(1)])
        return [u[0::2] | (u[1::2] << 4), scale]

    def decode(self, payload, n, slot=None, rank=0):
        data, scale = payload
        q = torch.stack([data & 0xF, data >> 4], dim=1).view(-1)[:n].float().sub_(8)
        return self._dequantise(q, scale, n)


PRECISION_COMPRESSORS = (FP32, BF16, FP16, INT8, INT4)
