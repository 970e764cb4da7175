"""``randk``: random-k sparsification with a shared seed — every worker sends the same ``k = ceil(ratio · n)``
coordinates, drawn afresh each round (Wangni et al., "Gradient Sparsification for Communication-Efficient
Distributed Optimization", NeurIPS 2018; Stich et al., "Sparsified SGD with Memory", NeurIPS 2018).
The rule, with I a uniformly random k-subset of {0, …, n−1}::

    C(x)_i = (n / k) · x_i  if i ∈ I,  else 0          (unbiased=true, the default: E[C(x)] = x)
    C(x)_i =           x_i  if i ∈ I,  else 0          (unbiased=false: a contraction, for error feedback)

The subset comes from a torch CPU generator seeded by a hash of (run seed, stream key, step), the fields of
:class:`~sgdlab.exchange.Slot`, so every worker and both backends draw the same subset without sending it:
the payload is the k float32 values alone (``4k`` bytes), and the payloads of all workers add up — under the
mean the collective is an all-reduce of the values, decoded once (``2(N − 1)/N × 4k`` bytes per worker).
Scaling by n/k happens at decode (the values sent are the raw x_i). With ``ratio=1`` the subset is every
index and the factor is exactly 1, so the exchange equals the uncompressed one. The variance added per
coordinate is ``(n/k − 1) x_i²`` (unbiased) — the price of sending no indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._quant import hashed_seed
from .base import Compressor
from .topk import check_ratio, num_kept


@dataclass
class RandKOptions:
    ratio: float = 0.01     # the fraction of coordinates sent, in (0, 1]
    unbiased: bool = True   # scale the kept values by n/k (E[C(x)] = x); false: plain random-k

    def validate(self) -> None:
        check_ratio(self.ratio)


def shared_seed(seed: int, key: str, step: int) -> int:
    """A 63-bit seed from (run seed, stream, step), the same in every process."""
    return hashed_seed(f"randk/{seed}/{key}/{step}")


DRAW_MARGIN = 1.2  # draws per expected draw for k distinct values


def shared_indices(n: int, k: int, seed: int, key: str, step: int) -> torch.Tensor:
    """The round's k indices (increasing), a uniformly random k-subset drawn on the CPU from the shared
    seed: for k <= n/4 the first k distinct values of a stream of uniform integers (O(k log k)), else a
    random permutation's first k."""
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(shared_seed(seed, key, step))
    if 4 * k > n:
        return torch.randperm(n, generator=g)[:k].sort().values
    stream = torch.zeros(0, dtype=torch.long)
    while True:  # expected n·ln(n / (n − k)) <= 1.16 k draws; a short stream is doubled (same prefix, same set)
        more = stream.numel() or math.ceil(DRAW_MARGIN * n * math.log(n / (n - k))) + 64
        stream = torch.cat([stream, torch.randint(0, n, (more,), generator=g)])
        values, inverse = torch.unique(stream, return_inverse=True)
        if values.numel() >= k:
            first = torch.full((values.numel(),), stream.numel()).scatter_reduce_(
                0, inverse, torch.arange(stream.numel()), "amin")   # where each value first appears
            return values[first.argsort()[:k]].sort().values


class RandK(Compressor):
    name = "randk"
    description = "random-k with a seed shared by all workers: the ceil(ratio·n) values only, all-reduced; n/k-scaled"
    Options = RandKOptions
    summable = True

    def nbytes(self, n: int) -> int:
        return 4 * num_kept(self.options.ratio, n)

    def refuses_feedback(self) -> str | None:
        if self.options.unbiased and self.options.ratio < 1:
            return ("unbiased=true scales the kept values by n/k, so the residual can exceed the input and error "
                    "feedback amplifies it (training diverges); use randk,unbiased=false with feedback")
        return None

    def _indices(self, n: int, slot, device) -> torch.Tensor:
        s = slot if slot is not None else _NO_SLOT
        tag = (n, self.options.ratio, s.seed, s.key, s.step)
        if getattr(self, "_last", (None,))[0] != tag:  # every local worker and the decode share one draw
            self._last = (tag, shared_indices(n, num_kept(self.options.ratio, n), s.seed, s.key, s.step))
        return self._last[1].to(device)

    def encode(self, x, slot=None, rank=0):
        return [x[self._indices(x.numel(), slot, x.device)].float()]

    def decode(self, payload, n, slot=None, rank=0):
        (values,) = payload
        idx = self._indices(n, slot, values.device)
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        out[idx] = values.float()
        if self.options.unbiased and idx.numel() < n:
            out.mul_(n / idx.numel())
        return out


class _Default:
    seed, key, step = 0, "", 0


_NO_SLOT = _Default()
