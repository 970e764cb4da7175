"""Embeddings: ``F.embedding`` (``padding_idx`` allowed; not ``max_norm``, ``scale_grad_by_freq``, ``sparse``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..grads import ParamGrads
from ..planning import Planner, Workspace
from ..recorder import Recorder
from ..rule import Rule, Unsupported, bind, register


@register(F.embedding)
@dataclass
class Embedding(Rule):
    """``out[t] = W[x_t]``: the per-example gradient ``G_i`` has row ``v`` equal to ``Σ_{t: x_t = v} g_t``
    (positions at ``padding_idx`` left out). Plan ``"keep"`` (when the budget allows and the table has fewer
    rows than ``T²``): ``G_i`` materialised by scatter, the clipped sum ``Σ_i c_i G_i``; ``"ghost"``:
    ``‖G_i‖² = Σ_{t,t'} [x_t = x_t'] (g_t·g_t')`` (Li et al. 2021) and the clipped sum as one scatter of
    ``c ⊙ g`` (Bu et al. 2022)."""

    weight: str = ""
    idx: torch.Tensor | None = None
    padding_idx: int | None = None
    num: int = 0

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        idx, w, padding_idx, max_norm, _, scale_grad_by_freq, sparse = bind(
            args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                           "sparse"), (None, None, 2.0, False, False))
        if max_norm is not None or scale_grad_by_freq or sparse:
            raise Unsupported("max_norm, scale_grad_by_freq and sparse are not supported")
        name = rec.param(w, "the weight")
        if name is None or rec.info(idx) is not None:
            raise Unsupported("a parameter as indices")
        num = w.shape[0]
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num
        use = cls(weight=name, padding_idx=padding_idx, num=num)
        use.idx = use.keep(rec.input(idx, 1))
        return rec.record(use, func(*args, **kwargs))

    def names(self) -> list[str]:
        return [self.weight]

    def tied_weight(self) -> str | None:
        return self.weight

    def plan(self, planner: Planner) -> str:
        n = planner.b * planner.numel(self.weight)
        t = self.idx.numel() // planner.b
        if planner.fits(n) and self.num < t * t:  # scatter into (B, V, d), else T×T token-equality matrices
            planner.keep(self.g, n)
            return "keep"
        return "ghost"

    def assemble(self, plan: str, grads: dict[str, ParamGrads], b: int, workspace: Workspace) -> None:
        p = grads[self.weight]
        d = self.g.shape[-1]
        g = self.g.reshape(b, -1, d)
        idx = self.idx.reshape(b, -1)
        if self.padding_idx is not None:
            g = g * (idx != self.padding_idx).unsqueeze(-1).to(g.dtype)
        if plan in ("keep", "tied"):
            if plan == "keep":
                p.accumulator(workspace.take((b, self.num, d), g))
            rows = (torch.arange(b, device=idx.device).unsqueeze(1) * self.num + idx).reshape(-1)
            p.dense.view(b * self.num, d).index_add_(0, rows, g.reshape(-1, d))
            return
        p.updates.append(self.scatter)
        if idx.shape[1] == 1:
            p.sq = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
        else:
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)
            p.sq = (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))

    def scatter(self, c: torch.Tensor, total: torch.Tensor) -> None:
        """``total += Σ_i c_i G_i`` by one scatter of ``c ⊙ g``."""
        d = self.g.shape[-1]
        g = (self.g.reshape(c.shape[0], -1, d) * c.to(self.g.dtype).view(-1, 1, 1)).reshape(-1, d)
        idx = self.idx.reshape(-1)
        if self.padding_idx is not None:
            g = g * (idx != self.padding_idx).unsqueeze(1).to(g.dtype)
        total.index_add_(0, idx, g)
