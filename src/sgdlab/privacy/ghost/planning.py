"""Memory planning: which uses keep their per-example gradients (within :data:`MATERIALISE_BUDGET`), and the
workspace that holds them from one micro-batch to the next."""

from __future__ import annotations

import math

import torch
from torch import nn

from .rule import Rule

#: elements of materialised per-example weight gradients kept at once (beyond it: Gram matrices, or the
#: per-example gradient computed for its norm only and the clipped sum recomputed as one matrix product)
MATERIALISE_BUDGET = 1 << 27
CHUNK = 1 << 24  # elements of a temporary per-example gradient block computed for norms only


class Planner:
    """Chooses each use's plan, in order, with :meth:`Rule.plan`; a parameter used more than once by rules
    that can add into one buffer (:meth:`Rule.tied_weight`) gets the plan ``"tied"`` and one (B, *shape)
    buffer. Rules ask :meth:`fits` and :meth:`keep` (regions counted against the budget) or :meth:`reserve`."""

    def __init__(self, params: dict[str, nn.Parameter], b: int, budget: int):
        self.params, self.b, self.budget = params, b, budget
        self.used = 0
        self.sizes: dict[tuple, int] = {}
        self.scratch: dict[tuple, int] = {}

    def numel(self, name: str) -> int:
        return self.params[name].numel()

    def fits(self, n: int, temporary: int = 0) -> bool:
        """Whether ``n`` more kept elements (and ``temporary`` scratch) stay within the budget."""
        return self.used + n + temporary <= self.budget

    def keep(self, like: torch.Tensor, n: int) -> None:
        """Count ``n`` elements of ``like``'s dtype and device against the budget and reserve them."""
        self.used += n
        self.reserve(like, n)

    def reserve(self, like: torch.Tensor, n: int, temporary: bool = False) -> None:
        """Room for :meth:`Workspace.take` (or, ``temporary``, :meth:`Workspace.scratch`) of ``n`` elements."""
        key = (like.dtype, like.device)
        if temporary:
            self.scratch[key] = max(self.scratch.get(key, 0), n)
        else:
            self.sizes[key] = self.sizes.get(key, 0) + n

    def plan(self, uses: list[Rule], workspace: Workspace) -> list[str]:
        count: dict[str, int] = {}
        for u in uses:
            for name in u.names():
                count[name] = count.get(name, 0) + 1
        plans, tied_done = [], set()
        for u in uses:
            name = u.tied_weight()
            if name is not None and count[name] > 1:
                plans.append("tied")
                if name not in tied_done:
                    tied_done.add(name)
                    self.keep(u.g, self.b * self.numel(name))
                continue
            plans.append(u.plan(self))
        workspace.reserve(self.sizes, self.scratch)
        return plans


class Workspace:
    """Memory for materialised per-example gradients and the temporaries that produce them, kept from one
    micro-batch to the next: on the CPU, fresh allocations of this size cost page faults comparable to the
    matrix products that fill them. Regions handed out by :meth:`take` are valid until the next
    :meth:`reserve`; the scratch area is shared by all temporaries."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._offsets: dict[tuple, int] = {}
        self._scratch: dict[tuple, int] = {}

    def reserve(self, sizes: dict[tuple, int], scratch: dict[tuple, int]) -> None:
        """Room for ``sizes[(dtype, device)]`` elements of regions and ``scratch[…]`` of temporaries."""
        for key in sizes.keys() | scratch.keys():
            n = sizes.get(key, 0) + scratch.get(key, 0)
            buf = self._bufs.get(key)
            if buf is None or buf.numel() < n:
                self._bufs[key] = None  # free the old buffer before allocating the new one
                self._bufs[key] = torch.empty(n, dtype=key[0], device=key[1])
        self._offsets = {key: 0 for key in self._bufs}
        self._scratch = {key: sizes.get(key, 0) for key in self._bufs}

    def take(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        key, n = (like.dtype, like.device), math.prod(shape)
        start = self._offsets[key]
        self._offsets[key] = start + n
        return self._bufs[key][start:start + n].view(shape)

    def scratch(self, shape: tuple, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
        key = (like.dtype, like.device)
        start = self._scratch[key] + offset
        return self._bufs[key][start:start + math.prod(shape)].view(shape)
