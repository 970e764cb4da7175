"""What the rules leave for one parameter: its per-example norms and how to form its clipped sum."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ParamGrads:
    """A parameter's per-example gradients, as materialised ones (``dense``), a squared norm (``sq``) and
    deferred contributions to the clipped sum: ``parts`` (``c`` → a tensor of the parameter's shape) and
    ``updates`` (``(c, total)`` → added to ``total`` in place, after the parts)."""

    def __init__(self, param: nn.Parameter):
        self.param = param
        self.dense: torch.Tensor | None = None  # Σ over materialised uses, (B, *shape)
        self._owned = False  # ``dense`` may be added to in place
        # ``dense`` in another layout (a convolution's): (B, *shape) with ``shape[perm]`` the parameter's
        self.stored: tuple[tuple, tuple] | None = None
        self.sq: torch.Tensor | None = None  # per-example squared norm when not materialised
        self.parts: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.updates: list[Callable[[torch.Tensor, torch.Tensor], None]] = []

    def accumulator(self, region: torch.Tensor) -> torch.Tensor:
        """Use ``region`` (zeroed) as ``dense``, for contributions added in place."""
        self.dense, self._owned = region.zero_(), True
        return region

    def set_stored(self, g: torch.Tensor, shape: tuple, perm: tuple) -> None:
        """``dense`` = ``g`` of shape (B, *shape), whose examples become the parameter's layout by ``perm``
        (the parameter's only materialised use)."""
        assert self.dense is None, "a permuted layout is only kept for a parameter's only use"
        self.dense, self._owned, self.stored = g, True, (shape, perm)

    def add_dense(self, g: torch.Tensor) -> None:
        """Add per-example gradients ``g`` (B, *shape)."""
        assert self.stored is None
        if self.dense is None:
            self.dense, self._owned = g, False  # g may be autograd's: never written to
        elif self._owned:
            self.dense += g
        else:
            self.dense, self._owned = self.dense + g, True

    def norms(self, b: int) -> torch.Tensor:
        if self.dense is None:
            return self.sq.sqrt() if self.sq is not None else self.param.new_zeros(b)
        norm = torch.linalg.vector_norm(self.dense.reshape(b, -1), dim=1)
        return norm if self.sq is None else (self.sq + norm.square()).sqrt()

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """``Σ_b c_b G_b`` as a new contiguous tensor of the parameter's shape."""
        parts = []
        if self.dense is not None:  # one matrix-vector product
            s = c.to(self.dense.dtype) @ self.dense.reshape(c.shape[0], -1)
            if self.stored is not None:
                shape, perm = self.stored
                s = s.view(shape).permute(perm)
            parts.append(s.reshape(self.param.shape))
        parts.extend(part(c) for part in self.parts)
        total = parts[0].contiguous() if parts else torch.zeros_like(self.param)
        for part in parts[1:]:
            total += part
        for update in self.updates:
            update(c, total)
        return total
