"""The step protocol: what an optimizer needs from the training loop beyond ``backward(); step()``.

Most optimizers need nothing: the loop computes the loss, back-propagates it and calls ``step()``. An
optimizer that needs more declares it with these optional attributes, and every loop that drives
optimizers (sgdlab's runner, :class:`sgdlab.distributed.Distributed`, your own) asks :func:`needs`
instead of naming optimizers:

``before_backward(ctx)``
    called every step before the ordinary backward, with a :class:`StepContext`. Sophia-G uses it for
    its Gauss-Newton-Bartlett estimate (``ctx.sampled_loss()``); it must leave no gradient behind.
``step_closure = True``
    ``step()`` takes ``ctx.loss`` as its closure. The closure returns the loss with its graph and does
    not call ``backward`` (Sophia-H's Hessian-vector products; SAM's second pass; forward-only
    zeroth-order estimates).
``step_backward = False``
    the loop computes the loss without a graph and does not back-propagate it (forward-only methods).

Wrappers (Lookahead) forward these attributes of the optimizer they wrap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StepContext:
    """The current step's losses, as closures over the model and the batch."""

    loss: Callable[[], torch.Tensor]
    """The training loss on this step's batch (differentiable)."""
    sampled_loss: Callable[[], tuple[torch.Tensor, int]] | None = None
    """The loss against labels sampled from the model's own predictions, and the number of labels
    (``Task.sampled_loss``); ``None`` where the loop has no such loss."""


@dataclass(frozen=True)
class StepNeeds:
    """What one optimizer asks of the loop (see the module docstring)."""

    before_backward: Callable[[StepContext], None] | None = None
    closure: bool = False
    backward: bool = True

    @property
    def plain(self) -> bool:
        """True when ``backward(); step()`` is all the optimizer needs."""
        return self.before_backward is None and not self.closure and self.backward

    def describe(self) -> str:
        parts = []
        if self.before_backward is not None:
            parts.append("an extra loss before each backward")
        if self.closure:
            parts.append("step(closure)")
        if not self.backward:
            parts.append("forward-only steps")
        return ", ".join(parts) or "backward(); step()"


def needs(optimizer: Any) -> StepNeeds:
    """The :class:`StepNeeds` that ``optimizer`` declares (plain ``backward(); step()`` by default)."""
    hook = getattr(optimizer, "before_backward", None)
    return StepNeeds(before_backward=hook if callable(hook) else None,
                     closure=bool(getattr(optimizer, "step_closure", False)),
                     backward=bool(getattr(optimizer, "step_backward", True)))


def forward_backward(optimizer: Any, ctx: StepContext, need: StepNeeds | None = None) -> torch.Tensor:
    """This step's forward and backward as ``optimizer`` needs them; returns the (detached) loss."""
    need = need or needs(optimizer)
    if need.before_backward is not None:
        need.before_backward(ctx)
    if not need.backward:
        with torch.no_grad():
            return ctx.loss().detach()
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
