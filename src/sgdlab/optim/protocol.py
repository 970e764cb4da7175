"""The step protocol: what an optimizer needs from the training loop beyond ``backward(); step()``.

Most optimizers need nothing: the loop computes the loss, back-propagates it and calls ``step()``. An
optimizer that needs more declares it with these optional attributes, and every loop that drives
optimizers (sgdlab's runner, :class:`sgdlab.distributed.Distributed`, your own) asks :func:`needs`
instead of naming optimizers:

``before_forward(ctx)``
    called every step first, before the step's forward: an optimizer that takes the gradient at other
    weights moves the parameters here and moves them back in ``step()`` (XGrad's weight prediction).
``before_backward(ctx)``
    called every step before the ordinary backward, with a :class:`StepContext`. Sophia-G uses it for
    its Gauss-Newton-Bartlett estimate (``ctx.sampled_loss()``); it must leave no gradient behind.
``step_closure = True``
    ``step()`` takes ``ctx.loss`` as its closure. The closure returns the loss with its graph and does
    not call ``backward`` (Sophia-H's Hessian-vector products; SAM's second pass; forward-only
    zeroth-order estimates).
``step_backward = False``
    the loop computes the loss without a graph and does not back-propagate it (forward-only methods:
    zeroth-order SGD estimates in ``step(closure)``; forward gradients write their estimate into ``p.grad``
    in ``before_backward``, so strategies and gradient clipping see it).
``training_loss(ctx) -> (objective, loss)``
    the loop back-propagates ``objective`` instead of ``ctx.loss()`` and reports ``loss`` (SAF/MESA add a
    KL term on the model's outputs, read through ``ctx.model``).
``after_evaluate(metrics)``
    called with the metrics of each evaluation of the current weights (SWAD's loss valley).
``averaged_parameters() -> {param: tensor} | None``
    weights to evaluate instead of the current ones (SWA/SWAD); :func:`averaged_weights` swaps them in.

Wrappers (Lookahead) forward these attributes of the optimizer they wrap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StepContext:
    """The current step's losses, as closures over the model and the batch."""

    loss: Callable[[], torch.Tensor]
    """The training loss on this step's batch (differentiable)."""
    sampled_loss: Callable[[], tuple[torch.Tensor, int]] | None = None
    """The loss against labels sampled from the model's own predictions, and the number of labels
    (``Task.sampled_loss``); ``None`` where the loop has no such loss."""
    model: nn.Module | None = None
    """The module whose forward ``loss`` runs (SAF/MESA read its outputs); ``None`` where there is none."""
    example_ids: torch.Tensor | None = None
    """Indices of this step's training examples (SAF's per-example logit bank); ``None`` where unknown."""


@dataclass(frozen=True)
class StepNeeds:
    """What one optimizer asks of the loop (see the module docstring)."""

    before_backward: Callable[[StepContext], None] | None = None
    closure: bool = False
    backward: bool = True
    training_loss: Callable[[StepContext], tuple[torch.Tensor, torch.Tensor]] | None = None
    before_forward: Callable[[StepContext], None] | None = None

    @property
    def plain(self) -> bool:
        """True when ``backward(); step()`` is all the optimizer needs."""
        return self.before_backward is None and not self.closure and self.backward and self.training_loss is None \
            and self.before_forward is None

    def describe(self) -> str:
        parts = []
        if self.before_forward is not None:
            parts.append("other weights for the forward")
        if self.before_backward is not None:
            parts.append("an extra loss before each backward")
        if self.closure:
            parts.append("step(closure)")
        if not self.backward:
            parts.append("forward-only steps")
        if self.training_loss is not None:
            parts.append("its own training loss")
        return ", ".join(parts) or "backward(); step()"


def needs(optimizer: Any) -> StepNeeds:
    """The :class:`StepNeeds` that ``optimizer`` declares (plain ``backward(); step()`` by default)."""
    hook = getattr(optimizer, "before_backward", None)
    objective = getattr(optimizer, "training_loss", None)
    first = getattr(optimizer, "before_forward", None)
    return StepNeeds(before_backward=hook if callable(hook) else None,
                     closure=bool(getattr(optimizer, "step_closure", False)),
                     backward=bool(getattr(optimizer, "step_backward", True)),
                     training_loss=objective if callable(objective) else None,
                     before_forward=first if callable(first) else None)


def forward_backward(optimizer: Any, ctx: StepContext, need: StepNeeds | None = None) -> torch.Tensor:
    """This step's forward and backward as ``optimizer`` needs them; returns the (detached) loss."""
    need = need or needs(optimizer)
    if need.before_forward is not None:
        need.before_forward(ctx)
    if need.before_backward is not None:
        need.before_backward(ctx)
    if not need.backward:
        with torch.no_grad():
            return ctx.loss().detach()
    if need.training_loss is not None:
        objective, loss = need.training_loss(ctx)
        objective.backward()
        return loss.detach()
    loss = ctx.loss()
    loss.backward()
    return loss.detach()


def step(optimizer: Any, ctx: StepContext | None, need: StepNeeds | None = None) -> Any:
    """``optimizer.step()``, with ``ctx.loss`` as the closure where the optimizer asks for one."""
    need = need or needs(optimizer)
    if need.closure:
        if ctx is None:
            raise TypeError(f"{type(optimizer).__name__}.step needs a closure that returns the loss "
                            "(pass closure=... to step)")
        return optimizer.step(ctx.loss)
    return optimizer.step()


def after_evaluate(optimizer: Any, metrics: dict[str, float]) -> None:
    """Hand an evaluation's ``metrics`` (of the current weights) to ``optimizer`` where it asks for them."""
    hook = getattr(optimizer, "after_evaluate", None)
    if callable(hook):
        hook(metrics)


@contextmanager
def averaged_weights(optimizer: Any, source: nn.Module, target: nn.Module | None = None,
                     bn_batches: Callable[[], Iterable[Any]] | None = None) -> Iterator[bool]:
    """Within the block, ``target``'s parameters hold ``optimizer.averaged_parameters()`` (SWA, SWAD); yields
    whether they do (False: the optimizer averages nothing, or nothing yet).

    ``source`` is the model whose parameters the optimizer updates; ``target`` (default ``source``) the model
    to evaluate, parameter ``i`` of one matching parameter ``i`` of the other (the strategy's evaluation copy).
    Where ``target`` has BatchNorm layers and ``bn_batches`` is given, their running statistics are recomputed
    for the averaged weights with ``torch.optim.swa_utils.update_bn`` over ``bn_batches()`` (batches whose first
    element is the model's input). Parameters and buffers are restored on exit.
    """
    get = getattr(optimizer, "averaged_parameters", None)
    avg = get() if callable(get) else None
    if not avg:
        yield False
        return
    target = source if target is None else target
    pairs = [(q, avg[p]) for p, q in zip(source.parameters(), target.parameters(), strict=True) if p in avg]
    bns = [m for m in target.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        saved = [q.detach().clone() for q, _ in pairs]
        buffers = [b.detach().clone() for m in bns for b in m.buffers()]
        for q, a in pairs:
            q.copy_(a)
    try:
        if bns and bn_batches is not None:
            torch.optim.swa_utils.update_bn(bn_batches(), target)
        yield True
    finally:
        with torch.no_grad():
            for (q, _), w in zip(pairs, saved, strict=True):
                q.copy_(w)
            for b, v in zip([b for m in bns for b in m.buffers()], buffers, strict=True):
                b.copy_(v)
