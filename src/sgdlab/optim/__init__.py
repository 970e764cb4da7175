"""Optimizers by name.

``create(name, params, **hyperparameters)`` returns a ``torch.optim.Optimizer``. Every registered
optimizer follows torch.optim conventions (param groups, ``state_dict``, LR schedulers). An unknown
hyperparameter is a ``TypeError``; an out-of-range one is a ``ValueError`` naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["create", "registry", "hyperparameters", "state_bytes"]

registry: Registry[type[torch.optim.Optimizer]] = Registry("optimizer")

registry.register("sgd", torch.optim.SGD, "torch.optim.SGD: plain SGD, heavy-ball or Nesterov momentum",
                  default_lr=0.1)
registry.register("adam", torch.optim.Adam, "torch.optim.Adam (Kingma & Ba, 2015)", default_lr=1e-3)
registry.register("adamw", torch.optim.AdamW, "torch.optim.AdamW: Adam with decoupled weight decay "
                  "(Loshchilov & Hutter, 2019)", default_lr=1e-3)

# Keyword arguments of torch.optim classes that are not hyperparameters of the update rule.
_NOT_HYPER = {"self", "params", "differentiable", "capturable"}


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of optimizer ``name`` with their defaults (``lr`` included)."""
    cls = registry.get(name)
    sig = inspect.signature(cls.__init__)
    out = {}
    for p in sig.parameters.values():
        if p.name in _NOT_HYPER or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = None if p.default is inspect.Parameter.empty else p.default
    out["lr"] = registry.entry(name).extra.get("default_lr", out.get("lr"))
    return out


def create(name: str, params: Iterable[Any], **hp: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` with hyperparameters ``hp``.

    >>> model = torch.nn.Linear(4, 2)
    >>> opt = create("sgd", model.parameters(), lr=0.1, momentum=0.9)
    """
    cls = registry.get(name)
    valid = hyperparameters(name)
    unknown = sorted(set(hp) - set(valid))
    if unknown:
        raise TypeError(f"optimizer {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(sorted(valid))}")
    kwargs = {"lr": valid["lr"], **hp}
    lr = kwargs["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ConfigError(f"lr={lr!r} is out of range for optimizer {name!r}; allowed: lr >= 0")
    try:
        return cls(params, **kwargs)
    except ValueError as e:  # torch's own range checks, e.g. "Invalid momentum value: -1"
        raise ConfigError(f"optimizer {name!r}: {e}") from None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in tensors of the optimizer's per-parameter state (moments, buffers, ...)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
