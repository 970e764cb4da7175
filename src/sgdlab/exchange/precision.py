"""Low-precision exchange (SCOPE C1): ``fp32`` (lossless), ``bf16``, ``fp16``, and ``int8``/``int4`` with
per-block absmax scales.

Byte counts are the payload tensors' sizes: ``int8`` sends one byte per element plus one float32 scale
per block of ``block`` elements (default 128); ``int4`` packs two elements per byte (``ceil(n / 2)``
bytes) plus the same scales. Quantisation is symmetric and rounds to nearest: ``q = round(x / s)`` with
``s = max|x_block| / qmax`` (qmax = 127 for int8, 7 for int4), so the error per element is at most s/2.
``fp32`` payloads add up, so its collective is an all-reduce; the others are all-gathered and every
worker decodes and averages them in rank order (both backends compute the same numbers).
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


class FP32(Precision):
    name = "fp32"
    description = "lossless float32 (an all-reduce of the values)"
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
    description = "bfloat16 values (2 bytes each), rounded to nearest"
    dtype = torch.bfloat16


class FP16(_Half):
    name = "fp16"
    description = "float16 values (2 bytes each), rounded to nearest"
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

    def _quantise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.numel()
        blocks = torch.nn.functional.pad(x, (0, (-n) % self.block)).view(-1, self.block)
        scale = blocks.abs().amax(dim=1) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / scale[:, None]).clamp_(-self.qmax, self.qmax).view(-1)[:n]
        return q, scale.float()

    def _dequantise(self, q: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
        pad = (-n) % self.block
        return (torch.nn.functional.pad(q, (0, pad)).view(-1, self.block) * scale[:, None]).view(-1)[:n]


class INT8(_Int):
    name = "int8"
    description = "int8 with one float32 absmax scale per block of `block` values"
    qmax = 127

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

    def encode(self, x, slot=None, rank=0):
        q, scale = self._quantise(x)
        u = (q + 8).to(torch.uint8)  # 1..15
        if x.numel() % 2:
            u = torch.cat([u, u.new_zeros(1)])
        return [u[0::2] | (u[1::2] << 4), scale]

    def decode(self, payload, n, slot=None, rank=0):
        data, scale = payload
        q = torch.stack([data & 0xF, data >> 4], dim=1).view(-1)[:n].float() - 8
        return self._dequantise(q, scale, n)


PRECISION_COMPRESSORS = (FP32, BF16, FP16, INT8, INT4)
