"""Views of a parameter (``P.t()``, ``P.T``, ``P[ints, slices]``): followed back to the parameter, so that the
rule of the operation that uses the view can map per-example gradients with respect to it back to the
parameter (:meth:`Step.back`). A view records no use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..planning import Workspace
from ..recorder import Recorder
from ..rule import Rule, Unsupported, bind, register

_T = torch.Tensor


class Step:
    """One view step."""

    def workspace(self, b: int) -> int:
        """Elements of workspace :meth:`back` takes for ``b`` examples."""
        return 0

    def back(self, g: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        """Per-example gradients (B, *view shape) with respect to the view → with respect to its source."""
        raise NotImplementedError


class Transposed(Step):
    def back(self, g: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        return g.transpose(-1, -2)


@dataclass
class Indexed(Step):
    index: Any
    shape: tuple  # the source's

    def workspace(self, b: int) -> int:
        return b * math.prod(self.shape)

    def back(self, g: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        full = workspace.take(g.shape[:1] + self.shape, g).zero_()
        full[(slice(None),) + (self.index if isinstance(self.index, tuple) else (self.index,))] = g
        return full


@register(_T.t, torch.t, _T.transpose, torch.transpose, _T.T.__get__, _T.mT.__get__)
class Transpose(Rule):
    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        p = args[0]
        if p.dim() != 2:
            raise Unsupported("transpose of a parameter that is not a matrix")
        if func in (_T.transpose, torch.transpose):
            dims = bind(args[1:], kwargs, ("dim0", "dim1"), ())
            if {d % 2 for d in dims} != {0, 1}:
                raise Unsupported("transpose of a dimension with itself")
        return rec.view(func(*args, **kwargs), rec.info(p), Transposed())


@register(_T.__getitem__)
class Index(Rule):
    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        p = args[0]
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        parts = index if isinstance(index, tuple) else (index,)

        def basic(i: Any) -> bool:
            if isinstance(i, slice):
                return not any(isinstance(v, torch.Tensor) for v in (i.start, i.stop, i.step))
            return i is Ellipsis or (isinstance(i, int) and not isinstance(i, bool))

        if rec.info(p) is None:
            raise Unsupported("a parameter as an index")
        if not all(basic(i) for i in parts):
            raise Unsupported("only integer and slice indexing is followed")
        return rec.view(func(*args, **kwargs), rec.info(p), Indexed(index, tuple(p.shape)))
