"""The shared surface of sgdlab's optimizer wrappers (SAM, SAF/MESA, SWA, SWAD) around a base optimizer.

A :class:`Wrapper` *is* a ``torch.optim.Optimizer`` whose ``param_groups`` are the base optimizer's (LR
schedulers and per-group hyperparameters act on the base), whose ``zero_grad`` and ``add_param_group``
delegate, whose ``state`` is a read-only merged view (the base's per-parameter state plus the wrapper's own
tensors, so memory accounting and :class:`sgdlab.distributed.Distributed`'s broadcast see both), and whose
``state_dict()`` is the base's plus one entry, :attr:`Wrapper.key`, holding the wrapper's own state by
parameter index. Subclasses implement ``step`` and the two ``_own_state`` methods.

:class:`ForwardingWrapper` is a Wrapper around *any* base optimizer (Lookahead, SWA, SWAD): the step
protocol's attributes (:mod:`sgdlab.optim.protocol`) are the base's, so the wrapper asks the loop for
whatever its base needs.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from . import protocol

__all__ = ["ForwardingWrapper", "Wrapper", "check_plain_base"]


def check_plain_base(name: str, base_optimizer: torch.optim.Optimizer) -> None:
    """A ConfigError unless ``base_optimizer`` takes a plain ``backward(); step()`` (the wrapper drives the
    gradient itself, so a base that needs its own closure or hook cannot be served)."""
    need = protocol.needs(base_optimizer)
    if not need.plain:
        raise ConfigError(f"{name}'s base optimizer must take a plain backward(); step(), but "
                          f"{type(base_optimizer).__name__} needs {need.describe()}")


class Wrapper(torch.optim.Optimizer):
    """A base optimizer plus per-parameter tensors of the wrapper's own (``self.own[p][name]``)."""

    key = "wrapper"
    own_key = "own"
    """The name of ``self.own`` (by parameter index) inside the :attr:`key` entry of ``state_dict()``."""

    def __init__(self, base_optimizer: torch.optim.Optimizer):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        self.base_optimizer = base_optimizer
        self.own: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        # torch.optim.Optimizer.__init__ would build param groups of its own; the base's are shared instead
        self.defaults = base_optimizer.defaults
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @property
    def state(self) -> defaultdict[torch.Tensor, dict[str, Any]]:  # type: ignore[override]
        merged: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for p in self._params():
            st = {**self.base_optimizer.state.get(p, {}), **self.own.get(p, {})}
            if st:
                merged[p] = st
        return merged

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # --- checkpointing -----------------------------------------------------------------------------
    def _own_state(self) -> dict[str, Any]:
        """The wrapper's own state besides ``self.own`` (counters, flags); plain values or tensors."""
        return {}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_own_state` returned."""

    def _check_own(self, own: dict[int, Any], params: list[torch.Tensor]) -> None:
        """A ConfigError unless ``own`` (a state_dict's per-parameter entries) fits ``params``."""
        if own and max(own) >= len(params):
            raise ConfigError(f"{type(self).__name__} state_dict has state for parameter {max(own)}, the optimizer "
                              f"has {len(params)} parameters")

    def state_dict(self) -> dict[str, Any]:
        out = dict(self.base_optimizer.state_dict())
        out[self.key] = {**self._own_state(),
                         self.own_key: {i: dict(self.own[p]) for i, p in enumerate(self._params()) if p in self.own}}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if self.key not in state_dict:
            raise ConfigError(f"not a {type(self).__name__} state_dict: the {self.key!r} entry is missing")
        mine = dict(state_dict.pop(self.key))
        params = self._params()
        own = mine.pop(self.own_key)
        self._check_own(own, params)
        self.base_optimizer.load_state_dict(state_dict)
        self.own = {params[i]: {k: v.detach().to(device=params[i].device, dtype=params[i].dtype).clone()
                                for k, v in st.items()} for i, st in own.items()}
        self._load_own_state(mine)


class ForwardingWrapper(Wrapper):
    """A :class:`Wrapper` whose step-protocol attributes are the base optimizer's (it serves any base)."""

    @property
    def before_forward(self) -> Callable[[protocol.StepContext], None] | None:
        return protocol.needs(self.base_optimizer).before_forward

    @property
    def before_backward(self) -> Callable[[protocol.StepContext], None] | None:
        return protocol.needs(self.base_optimizer).before_backward

    @property
    def step_closure(self) -> bool:
        return protocol.needs(self.base_optimizer).closure

    @property
    def step_backward(self) -> bool:
        return protocol.needs(self.base_optimizer).backward

    @property
    def training_loss(self) -> Callable[[protocol.StepContext], tuple[torch.Tensor, torch.Tensor]] | None:
        return protocol.needs(self.base_optimizer).training_loss
