"""A parameter (or a view of one) broadcast over the batch: ``x + P``, ``x - P``, ``P - x``, ``x * P``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..grads import ParamGrads
from ..planning import Planner, Workspace
from ..recorder import Recorder, View
from ..rule import Rule, Unsupported, bind, register

_T = torch.Tensor


@register(torch.add, _T.add, _T.__add__, _T.__radd__, _T.__iadd__, _T.add_)
@dataclass
class Add(Rule):
    """``out = x + P`` with ``P`` broadcast over the batch: the per-example gradient is ``g_i`` summed over the
    dimensions ``P`` is broadcast along (``g_i ⊙ x_i`` for a product), mapped back through the view,
    materialised."""

    view: View | None = None
    view_shape: tuple = ()
    sign: float = 1.0
    other: torch.Tensor | None = None  # for products
    subtract: ClassVar[bool] = False
    product: ClassVar[bool] = False

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        a, b, alpha = bind(args, kwargs, ("input", "other", "alpha"), (1,))
        if alpha != 1:
            raise Unsupported("alpha != 1")
        ia, ib = rec.info(a), rec.info(b)
        if (ia is None) == (ib is None):
            raise Unsupported("both or neither operands are parameters")
        view, p, x = (ia, a, b) if ia is not None else (ib, b, a)
        out = func(*args, **kwargs)
        if not (rec.batched(x) and isinstance(out, torch.Tensor) and out.dim() >= 1
                and out.shape[0] == rec.batch):
            raise Unsupported("the other operand is not a batch")
        if p.dim() == out.dim() and p.shape[0] != 1:
            raise Unsupported("the parameter is not broadcast over the batch")
        use = cls(view=view, view_shape=tuple(p.shape), sign=-1.0 if (cls.subtract and ib is not None) else 1.0)
        if cls.product:
            use.other = use.keep(x)
        return rec.record(use, out)

    def names(self) -> list[str]:
        return [self.view.name]

    def plan(self, planner: Planner) -> str:
        planner.reserve(self.g, sum(step.workspace(planner.b) for step in self.view.chain))
        return "dense"

    def assemble(self, plan: str, grads: dict[str, ParamGrads], b: int, workspace: Workspace) -> None:
        g = self.g
        if self.other is not None:
            g = g * self.other
        g = _reduce_to(g, self.view_shape)
        g = g if self.sign == 1 else -g
        for step in reversed(self.view.chain):
            g = step.back(g, workspace)
        grads[self.view.name].add_dense(g)


@register(torch.sub, _T.sub, _T.__sub__, _T.__isub__, _T.sub_)
class Subtract(Add):
    subtract = True


@register(torch.mul, _T.mul, _T.__mul__, _T.__rmul__)  # not in place: g ⊙ x needs the x before the product
class Multiply(Add):
    product = True


def _reduce_to(g: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Sum ``g`` (B, *out) over the dimensions a tensor of ``shape`` was broadcast along → (B, *shape)."""
    b, out = g.shape[0], g.shape[1:]
    if len(shape) == len(out) + 1:  # shape includes a leading 1 aligned with the batch
        shape_tail = shape[1:]
    else:
        shape_tail = (1,) * (len(out) - len(shape)) + tuple(shape)
    dims = [i + 1 for i, (s, o) in enumerate(zip(shape_tail, out, strict=True)) if s == 1 and o != 1]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(b, *shape)
