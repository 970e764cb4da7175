"""``topk``: top-k sparsification — each worker sends the ``k = ceil(ratio · n)`` entries of largest
magnitude of its vector (Aji & Heafield, "Sparse Communication for Distributed Gradient Descent",
EMNLP 2017; Stich et al., "Sparsified SGD with Memory", NeurIPS 2018). The rule is

    C(x)_i = x_i  if i ∈ I,  else 0,      I = the k indices of largest |x_i|.

It is biased (a contraction, ‖C(x) − x‖² ≤ (1 − k/n)‖x‖²), so it is usually run with error feedback
(``--compress topk,ratio=0.01,feedback=ef``); ``ratio=1`` sends everything and is exact.

**Ties** are broken deterministically: among equal magnitudes the lower index is kept, so every backend
and every run selects the same set. **Encoding** (both sides count exactly these tensors): the k values
as float32, then the positions either as k int32 indices (``4k`` bytes) or as a bitmap of ``ceil(n / 8)``
bytes (bit ``i % 8`` of byte ``i // 8`` set when index i is kept), whichever is smaller (indices on a
tie); the values are in increasing index order. So a payload is ``4k + min(4k, ceil(n / 8))`` bytes.
Different workers keep different indices, so payloads do not add up: they are all-gathered and every
worker decodes and averages them in rank order (``(N − 1) ×`` payload per worker per round).

``k = ceil(ratio · n)`` is computed exactly from the decimal ratio as written (``ratio=0.07``, ``n=100``
gives ``k = 7``, not the 8 a float product would give), and ``k ≥ 1`` for every non-empty vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..errors import ConfigError
from ._quant import pack, packed_bytes, unpack
from .base import Compressor


@dataclass
class RatioOptions:
    ratio: float = 0.01   # the fraction of entries kept, in (0, 1]

    def validate(self) -> None:
        check_ratio(self.ratio)


def check_ratio(ratio: float, what: str = "ratio") -> None:
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= 1):
        raise ConfigError(f"{what}={ratio!r}: the fraction of entries kept must be in (0, 1] (0 < {what} <= 1)")


def num_kept(ratio: float, n: int) -> int:
    """``ceil(ratio · n)`` with the ratio read as the decimal it was written as."""
    return min(n, math.ceil(Fraction(repr(float(ratio))) * n))


def use_bitmap(n: int, k: int) -> bool:
    """Positions as a bitmap when it is strictly smaller than k int32 indices."""
    return packed_bytes(n, 1) < 4 * k


def top_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """The indices (increasing, int64) of the ``k`` largest entries of ``a`` (non-negative magnitudes),
    ties broken towards the lower index. Exact: on a large vector a strided sample gives a threshold t0
    below the k-th largest value, and the exact selection runs over the candidates ``a >= t0`` (all of the
    top k whenever there are at least k of them; otherwise over the whole vector)."""
    n = a.numel()
    if k >= n:
        return torch.arange(n, device=a.device)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=a.device)
    if n >= _SAMPLED_FROM and 8 * k < n:
        sample = a[:: n // _SAMPLE]
        m = sample.numel()
        ks = math.ceil(k * m / n)
        ks = min(m, ks + 4 * math.isqrt(ks) + 8)   # a margin of ~4 binomial deviations
        t0 = torch.topk(sample, ks, sorted=False).values.min()
        candidates = (a >= t0).nonzero().view(-1)
        if candidates.numel() >= k:
            return candidates[_exact_top(a[candidates], k)]
    return _exact_top(a, k)


_SAMPLE, _SAMPLED_FROM = 1 << 16, 1 << 18


def _exact_top(a: torch.Tensor, k: int) -> torch.Tensor:
    t = torch.topk(a, k, sorted=False).values.min()          # the k-th largest magnitude
    above = (a > t).nonzero().view(-1)                        # fewer than k
    ties = (a == t).nonzero().view(-1)[: k - above.numel()]  # lowest indices first
    if above.numel() + ties.numel() < k:   # NaN among the magnitudes: still k entries (the NaNs among them)
        return torch.topk(a, k, sorted=False).indices.sort().values
    return torch.cat([above, ties]).sort().values


def encode_sparse(x: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
    """Payload for the entries ``idx`` (increasing) of ``x``: [float32 values, int32 indices | uint8 bitmap]."""
    n, k = x.numel(), idx.numel()
    if use_bitmap(n, k):
        mask = torch.zeros(n, dtype=torch.uint8, device=idx.device)
        mask[idx] = 1
        where = pack(mask, 1)
    else:
        where = idx.to(torch.int32)
    return [x[idx].float(), where]


def decode_sparse(payload: list[torch.Tensor], n: int) -> torch.Tensor:
    values, where = payload
    idx = unpack(where, 1, n).nonzero().view(-1) if where.dtype == torch.uint8 else where.long()
    out = torch.zeros(n, dtype=torch.float32, device=values.device)
    out[idx] = values.float()
    return out


def sparse_bytes(n: int, k: int) -> int:
    """Analytic payload size of k of n entries (checks :meth:`Compressor.payload_bytes`)."""
    return 4 * k + min(4 * k, packed_bytes(n, 1))


class TopK(Compressor):
    name = "topk"
    description = "top-k sparsification: the ceil(ratio·n) largest magnitudes (float32) + int32 indices or a bitmap"
    Options = RatioOptions

    def nbytes(self, n: int) -> int:
        return sparse_bytes(n, num_kept(self.options.ratio, n))

    def encode(self, x, slot=None, rank=0):
        return encode_sparse(x, top_indices(x.abs(), num_kept(self.options.ratio, x.numel())))

    def decode(self, payload, n, slot=None, rank=0):
        return decode_sparse(payload, n)
