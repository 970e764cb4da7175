"""Precision codecs for exchanged tensors (SCOPE C1): fp32, bf16, fp16, and int8/int4 with per-block
absmax scales.

A codec turns a flat float32 vector into the payload tensors that are actually sent, and back. Byte
counts are the payload tensors' sizes: ``int8`` sends one byte per element plus one float32 scale per
block of ``block`` elements; ``int4`` packs two elements per byte (``ceil(n / 2)`` bytes) plus the same
scales. Quantisation is symmetric and rounds to nearest: ``q = round(x / s)`` with
``s = max|x_block| / qmax`` (qmax = 127 for int8, 7 for int4), so the error per element is at most s/2.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, UnknownNameError

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
DEFAULT_BLOCK = 128


class Codec:
    def __init__(self, precision: str = "fp32", block: int = DEFAULT_BLOCK):
        if precision not in PRECISIONS:
            raise UnknownNameError("precision", precision, PRECISIONS)
        if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block % 2:
            raise ConfigError(f"block={block!r}: the quantisation block must be an even integer >= 2")
        self.precision, self.block = precision, block

    @property
    def lossless(self) -> bool:
        return self.precision == "fp32"

    def nbytes(self, n: int) -> int:
        """Analytic payload size in bytes for ``n`` elements."""
        if self.precision == "fp32":
            return 4 * n
        if self.precision in ("bf16", "fp16"):
            return 2 * n
        scales = 4 * math.ceil(n / self.block)
        return scales + (n if self.precision == "int8" else math.ceil(n / 2))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Payload tensors for the flat float32 vector ``x``."""
        if self.precision == "fp32":
            return [x]
        if self.precision == "bf16":
            return [x.to(torch.bfloat16)]
        if self.precision == "fp16":
            return [x.to(torch.float16)]
        qmax = 127 if self.precision == "int8" else 7
        n = x.numel()
        pad = (-n) % self.block
        blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, self.block)
        scale = blocks.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / scale[:, None]).clamp_(-qmax, qmax).view(-1)[:n]
        if self.precision == "int8":
            return [q.to(torch.int8), scale.float()]
        u = (q + 8).to(torch.uint8)  # 1..15
        if n % 2:
            u = torch.cat([u, u.new_zeros(1)])
        packed = u[0::2] | (u[1::2] << 4)
        return [packed, scale.float()]

    def decode(self, payload: list[torch.Tensor], n: int) -> torch.Tensor:
        if self.precision in ("fp32", "bf16", "fp16"):
            return payload[0].float()
        data, scale = payload
        if self.precision == "int8":
            q = data.float()
        else:
            q = torch.stack([data & 0xF, data >> 4], dim=1).view(-1)[:n].float() - 8
        pad = (-n) % self.block
        return (torch.nn.functional.pad(q, (0, pad)).view(-1, self.block) * scale[:, None]).view(-1)[:n]

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.numel())

    @staticmethod
    def payload_bytes(payload: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in payload)
