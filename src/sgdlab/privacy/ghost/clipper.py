"""The clipper: record a forward, run one backward to the recorded outputs, plan, assemble."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .grads import ParamGrads
from .planning import MATERIALISE_BUDGET, Planner, Workspace
from .recorder import Recorder
from .rule import Rule, Unsupported


class GhostClipper:
    """Per-example gradient norms and clipped sums of ``loss_fn(model, batch)`` (a mean over the batch)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 params: dict[str, nn.Parameter], budget: int = MATERIALISE_BUDGET):
        self.model, self.loss_fn, self.params, self.budget = model, loss_fn, params, budget
        self._names = {id(p): n for n, p in params.items()}
        if len(self._names) != len(params):
            raise Unsupported("the same tensor is registered under two parameter names")
        self.workspace = Workspace()

    def run(self, batch: Any, b: int) -> tuple[dict[str, ParamGrads], torch.Tensor]:
        """One forward and one backward on a micro-batch of ``b`` ≥ 1 examples: ``({name: ParamGrads}, Σ_i ℓ_i)``.
        The result holds views of the workspace, valid until the next call."""
        if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
            raise Unsupported("autocast (mixed dtypes between activations and gradients)")
        rec = Recorder(self._names, b, self.model)
        with rec:
            loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise Unsupported("the loss is not a scalar tensor")
        total = loss * b  # Σ_i ℓ_i when the loss is the mean of per-example losses (checked by the engine)
        uses = rec.uses
        recorded = {n for u in uses for n in u.names()}
        for name in _reached_parameters(total, self._names):
            if name not in recorded:  # e.g. used inside a custom autograd.Function, where grad mode is off
                raise Unsupported(f"parameter {name!r} reaches the loss through an operation that is not recorded")
        if uses:
            grads = torch.autograd.grad(total, [u.edge for u in uses], allow_unused=True)
            for u, g in zip(uses, grads, strict=True):
                u.g, u.out, u.edge = g, None, None
                for t, version in u.saved:
                    if t._version != version:
                        raise Unsupported("an input of a recorded operation was modified in place")
        return self._assemble([u for u in uses if u.g is not None], b), total.detach()

    def _assemble(self, uses: list[Rule], b: int) -> dict[str, ParamGrads]:
        out = {n: ParamGrads(p) for n, p in self.params.items()}
        plans = Planner(self.params, b, self.budget).plan(uses, self.workspace)
        for u, plan in zip(uses, plans, strict=True):  # tied parameters: one accumulator each, before any use
            if plan == "tied" and out[name := u.tied_weight()].dense is None:
                out[name].accumulator(self.workspace.take((b, *self.params[name].shape), u.g))
        for u, plan in zip(uses, plans, strict=True):
            u.assemble(plan, out, b, self.workspace)
        return out


def _reached_parameters(loss: torch.Tensor, names: dict[int, str]) -> set[str]:
    """Names of the parameters whose gradient accumulators the autograd graph of ``loss`` reaches."""
    out: set[str] = set()
    if loss.grad_fn is None:
        return out
    seen, stack = {loss.grad_fn}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in names:
            out.add(names[id(variable)])
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return out
