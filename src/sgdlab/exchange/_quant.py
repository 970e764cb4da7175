"""Shared pieces of the quantising and sign compressors (``qsgd``, ``terngrad``, ``signsgd``,
``scaled_sign``, ``onebit``): bit packing into uint8 tensors, per-tensor segments of the flat vector,
and the per-worker random streams of stochastic rounding.

* :func:`pack` stores ``n`` codes of ``bits`` bits each in ``ceil(n * bits / 8)`` bytes (code ``j``'s
  bit ``k`` is bit ``(j * bits + k) % 8`` of byte ``(j * bits + k) // 8``; the last byte is zero-padded),
  so a payload's size is exactly the bits it carries, rounded up to whole bytes.
* :func:`segments`: the lengths of the tensors the flat vector holds (``Slot.shapes``), for compressors
  whose scales are per tensor ("layer-wise"); one segment when the shapes are unknown.
* :func:`uniform`: ``n`` uniforms in [0, 1) from a generator seeded by (stream name, run seed, slot key,
  step, rank). It draws on the CPU and moves the result to the vector's device, so the simulator, gloo
  and NCCL runs draw the same numbers for the same worker and round.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .base import Slot


def pack(codes: torch.Tensor, bits: int, numpy: bool = True) -> torch.Tensor:
    """Non-negative integer ``codes`` (< 2**bits) → uint8 tensor of ``ceil(len(codes) * bits / 8)`` bytes
    (``numpy``: on the CPU, let numpy pack the bits; the torch path is what CUDA tensors take)."""
    n = codes.numel()
    if 8 % bits == 0 and bits > 1:  # whole codes per byte: 2, 4 or 8 bits
        per = 8 // bits
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-n) % per)).view(-1, per)
        out = c[:, 0].clone()
        for j in range(1, per):
            out |= c[:, j] << (j * bits)
        return out
    if bits == 1:
        flat = codes.to(torch.uint8)
    else:
        shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
        flat = ((codes.to(torch.int32)[:, None] >> shifts) & 1).to(torch.uint8).view(-1)
    if numpy and flat.device.type == "cpu":  # numpy's packbits is the same layout (little bit order), ~10x faster
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    out = flat[:, 0].clone()
    for k in range(1, 8):
        out |= flat[:, k] << k
    return out


def unpack(packed: torch.Tensor, bits: int, n: int, numpy: bool = True) -> torch.Tensor:
    """The ``n`` codes (int64) that :func:`pack` stored in ``packed``."""
    if 8 % bits == 0 and bits > 1:
        mask = (1 << bits) - 1
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed[:, None] >> shifts) & mask).view(-1)[:n].long()
    if numpy and packed.device.type == "cpu":
        flat = torch.from_numpy(np.unpackbits(packed.numpy(), count=n * bits, bitorder="little"))
    else:
        shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
        flat = ((packed[:, None] >> shifts) & 1).view(-1)[:n * bits]
    if bits == 1:
        return flat.long()
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (flat.view(n, bits).to(torch.int32) * weights).sum(1)


def packed_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def segments(n: int, slot: Slot | None, layerwise: bool = True) -> list[int]:
    """Lengths of the tensors in the flat vector of ``n`` elements (one segment if not layer-wise or the
    slot's shapes do not add up to ``n``)."""
    if layerwise and slot is not None and slot.shapes:
        sizes = [int(torch.Size(s).numel()) for s in slot.shapes]
        if sum(sizes) == n and all(s > 0 for s in sizes):
            return sizes
    return [n]


def spread(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """One value per segment → one per element."""
    n = sum(sizes)
    if len(sizes) == 1:
        return values.expand(n)
    return torch.cat([v.expand(size) for v, size in zip(values.unbind(), sizes, strict=True)])


def per_segment(x: torch.Tensor, sizes: list[int], op: str) -> torch.Tensor:
    """``op`` (``"sum"`` or ``"amax"``) of each segment of ``x``: one value per segment (float32)."""
    parts = [x] if len(sizes) == 1 else torch.split(x, sizes)
    return torch.stack([p.sum() if op == "sum" else p.amax() for p in parts]).float()


def hashed_seed(text: str) -> int:
    """A 63-bit seed from ``text``, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def seed_of(name: str, slot: Slot | None, rank: int) -> int:
    slot = slot or Slot("", 0)
    return hashed_seed(f"{name}/{slot.seed}/{slot.key}/{slot.step}/{rank}")


def uniform(n: int, name: str, slot: Slot | None, rank: int, device: torch.device) -> torch.Tensor:
    """``n`` float32 uniforms in [0, 1), the same for this (stream, slot, rank) on every backend."""
    g = torch.Generator().manual_seed(seed_of(name, slot, rank))
    return torch.rand(n, generator=g).to(device)


def sign_bits(x: torch.Tensor) -> torch.Tensor:
    """1 bit per element: 1 where ``x >= 0``, 0 where ``x < 0`` (a zero is sent as +1), packed."""
    return pack(x >= 0, 1)


def signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """±1.0 (float32) from :func:`sign_bits`."""
    return unpack(packed, 1, n).float().mul_(2).sub_(1)
