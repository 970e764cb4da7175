"""The base of a per-operation rule, and the table the recorder looks rules up in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .grads import ParamGrads
    from .planning import Planner, Workspace
    from .recorder import Recorder


class Unsupported(Exception):
    """The fast path cannot compute per-example gradients of this model (or this batch)."""


#: torch function or module type → the rule that handles it (filled by :func:`register`)
RULES: dict[Any, type[Rule]] = {}


def register(*keys: Any):
    """Class decorator: the rule handles each of ``keys``, a torch function (``F.linear``, ``Tensor.__add__``)
    or an ``nn.Module`` subclass (its instances, and those of its subclasses, are then handled whole)."""
    def decorate(rule: type[Rule]) -> type[Rule]:
        for key in keys:
            RULES[key] = rule
        return rule
    return decorate


def module_rule(kind: type) -> type[Rule] | None:
    """The rule registered for module type ``kind`` or its nearest base class."""
    for base in kind.__mro__:
        if base is nn.Module:
            return None
        if base in RULES:
            return RULES[base]
    return None


@dataclass
class Rule:
    """One recorded use of trainable parameters by an operation, and how per-example gradients follow from
    its input ``a`` (kept at record time) and its output gradient ``g`` (set after the backward).

    A rule for a torch function implements :meth:`record`; one for a module type :meth:`from_module`. Both
    end with ``rec.record(use, output)``. Then :meth:`names`, and :meth:`assemble`, which adds the use's
    share of each parameter's per-example norms and clipped sum to ``grads[name]`` (a
    :class:`~.grads.ParamGrads`); a rule that materialises large per-example gradients also implements
    :meth:`plan` (and :meth:`tied_weight`, when they can be summed into one buffer for a shared parameter).
    """

    out: torch.Tensor | None = None  # the operation's output (its gradient edge is taken at once)
    edge: Any = None
    saved: list = field(default_factory=list)  # (tensor, version) pairs that must not change before backward
    g: torch.Tensor | None = None

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` detached, checked after the backward not to have been modified in place."""
        t = t.detach()
        self.saved.append((t, t._version))
        return t

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run ``func(*args, **kwargs)`` and record a use of its parameters (raise :class:`Unsupported`)."""
        raise Unsupported("no per-example rule for a function")

    @classmethod
    def from_module(cls, rec: Recorder, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Record a use of ``module``'s parameters after its forward returned ``output``."""
        raise Unsupported("no per-example rule for a module")

    def names(self) -> list[str]:
        """The parameters this use reaches."""
        raise NotImplementedError

    def tied_weight(self) -> str | None:
        """The parameter whose per-example gradients this rule can add into a shared (B, *shape) buffer (the
        plan ``"tied"``) when it is used more than once."""
        return None

    def plan(self, planner: Planner) -> str:
        """How this use computes its norms; reserves any workspace it will take."""
        return "dense"

    def assemble(self, plan: str, grads: dict[str, ParamGrads], b: int, workspace: Workspace) -> None:
        raise NotImplementedError


def bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
    """Positional and keyword arguments of a function with signature ``names`` (trailing ``defaults``)."""
    if len(args) > len(names):
        raise Unsupported("too many arguments")
    out = list(args) + [None] * (len(names) - len(args))
    first_default = len(names) - len(defaults)
    for i in range(len(args), len(names)):
        out[i] = kwargs.get(names[i], defaults[i - first_default] if i >= first_default else None)
    if set(kwargs) - set(names):
        raise Unsupported(f"unexpected arguments {sorted(set(kwargs) - set(names))}")
    return out
