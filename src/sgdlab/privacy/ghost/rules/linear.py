"""Linear layers: ``F.linear`` and matrix products ``x @ W``, ``x @ W.t()``, ``x @ p``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..grads import ParamGrads
from ..planning import CHUNK, Planner, Workspace
from ..recorder import Recorder
from ..rule import Rule, Unsupported, bind, register
from .views import Transposed

_T = torch.Tensor


@register(F.linear)
@dataclass
class Linear(Rule):
    """``out[..., o] = Σ_k a[..., k] W[o, k] + bias[o]`` over an example's ``T`` positions.

    Per-example weight gradient ``G_i = g_iᵀ a_i`` (``a_i`` is T×d_in, ``g_i`` T×d_out), squared norm
    ``‖G_i‖_F²``, by the plan (Li, Tramèr, Liang & Hashimoto 2021, "ghost norm"): ``"outer"`` (``T = 1``:
    ``‖a_i‖² ‖g_i‖²``), ``"keep"`` (``G_i`` materialised by one batched product while the budget lasts),
    ``"ghost"`` (``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` from two T×T Gram matrices) or ``"norm"`` (``G_i`` a few
    examples at a time, for its norm only), whichever of the last two takes fewer multiply-adds. Clipped sum
    (Bu, Wang, Zha & Karypis 2022, "book-keeping"): ``Σ_i c_i G_i`` of the kept ``G_i``, else
    ``(c ⊙ g)ᵀ a``. Bias: ``Σ_t g_{i,t}``, materialised.

    ``layout`` maps ``W`` (d_out × d_in) to the parameter: "W" (nn.Linear), "WT" (``x @ P``, P is
    d_in × d_out), "vec" (``x @ p``, p of d_in)."""

    weight: str | None = None
    bias: str | None = None
    layout: str = "W"
    x: torch.Tensor | None = None

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        x, w, b = bind(args, kwargs, ("input", "weight", "bias"), (None,))
        use = cls(weight=rec.param(w, "the weight"), bias=rec.param(b, "the bias"), layout="W")
        use.x = use.keep(rec.input(x))
        return rec.record(use, func(*args, **kwargs))

    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]

    def tied_weight(self) -> str | None:
        return self.weight

    def activations(self, b: int) -> torch.Tensor:
        """``a`` as (B, T, d_in)."""
        return self.x.reshape(b, -1, self.x.shape[-1])

    def out_grads(self, b: int) -> torch.Tensor:
        """``g`` as (B, T, d_out)."""
        if self.layout == "vec":
            return self.g.reshape(b, -1, 1)
        return self.g.reshape(b, -1, self.g.shape[-1])

    def plan(self, planner: Planner) -> str:
        if self.weight is None:
            return "dense"
        b, numel = planner.b, planner.numel(self.weight)
        t = self.g.numel() // (b * (1 if self.layout == "vec" else self.g.shape[-1]))
        d_in, d_out = self.x.shape[-1], numel // self.x.shape[-1]
        plan = ("outer" if t == 1 else "keep" if planner.fits(b * numel) else
                "ghost" if t * (d_in + d_out) < d_in * d_out else "norm")
        if plan == "keep":
            planner.keep(self.g, b * numel)
        return plan

    def assemble(self, plan: str, grads: dict[str, ParamGrads], b: int, workspace: Workspace) -> None:
        g = self.out_grads(b)
        if self.bias is not None:
            grads[self.bias].add_dense(g.sum(1))
        if self.weight is None:
            return
        p = grads[self.weight]
        a = self.activations(b)
        # (B, d_out, d_in) for nn.Linear's layout, (B, d_in, d_out) for x @ P
        left, right = (g.transpose(1, 2), a) if self.layout == "W" else (a.transpose(1, 2), g)
        if plan == "tied":
            p.dense.view(b, left.shape[1], right.shape[2]).baddbmm_(left, right)
        elif plan == "keep":
            region = workspace.take((b, left.shape[1], right.shape[2]), g)
            p.add_dense(torch.bmm(left, right, out=region).view(b, *p.param.shape))
        else:
            self._a, self._g, self._shape = a, g, p.param.shape
            p.parts.append(self.clipped_sum)
            if plan == "outer":
                p.sq = (torch.linalg.vector_norm(a.flatten(1), dim=1)
                        * torch.linalg.vector_norm(g.flatten(1), dim=1)).square()
            elif plan == "ghost":
                p.sq = _ghost_sq(a, g)
            else:
                step = max(1, CHUNK // p.param.numel())
                p.sq = torch.cat([torch.linalg.vector_norm(torch.bmm(ll, rr).flatten(1), dim=1).square()
                                  for ll, rr in zip(left.split(step), right.split(step), strict=True)])

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """``(c ⊙ g)ᵀ a`` in the parameter's layout."""
        cg = self._g * c.to(self._g.dtype).view(-1, 1, 1)
        w = cg.flatten(0, 1).t() @ self._a.flatten(0, 1)
        return (w.t() if self.layout == "WT" else w).reshape(self._shape)


@register(torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm)
class MatMul(Linear):
    """``x @ P`` (``layout`` "WT"), ``x @ P.t()`` ("W") and ``x @ p`` ("vec"): :class:`Linear` without bias."""

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        x, p = bind(args, kwargs, ("input", "other"), ())
        if rec.info(x) is not None:
            raise Unsupported("a parameter on the left of a matrix product")
        info = rec.info(p)
        if info.chain == ():
            layout = "vec" if p.dim() == 1 else "WT"
        elif len(info.chain) == 1 and isinstance(info.chain[0], Transposed):
            layout = "W"
        else:
            raise Unsupported("a view of a parameter other than its transpose")
        if p.dim() not in (1, 2):
            raise Unsupported("a parameter of more than two dimensions")
        use = cls(weight=info.name, layout=layout)
        use.x = use.keep(rec.input(x))
        return rec.record(use, func(*args, **kwargs))


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` per example, a few examples at a time."""
    t = a.shape[1]
    step = max(1, CHUNK // (t * t))
    return torch.cat([(torch.bmm(aa, aa.transpose(1, 2)) * torch.bmm(gg, gg.transpose(1, 2))).sum((1, 2))
                      for aa, gg in zip(a.split(step), g.split(step), strict=True)])
