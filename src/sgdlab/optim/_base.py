"""The base of sgdlab's optimizers: ``step()``, lazy state, one dispatch policy, one validation.

:class:`Optimizer` owns ``step(closure)``: it evaluates the closure (its loss is returned), skips the
parameters whose gradient is ``None``, rejects sparse gradients with :class:`SparseGradientError` and
hands each parameter group to :meth:`Optimizer._step_group`. Hyperparameters are checked by
:meth:`Optimizer._validate` in the constructor and in ``add_param_group`` alike: a bad value is a
:class:`~sgdlab.errors.ConfigError` (a ``ValueError``) naming it.

:class:`ElementwiseOptimizer` is the base of the elementwise methods. An optimizer declares

* ``state_names``: its per-parameter state tensors, created as zeros at a parameter's first step (with
  a 0-d step counter ``state["step"]`` when ``counted``);
* ``_update(group, t, params, grads, *states, ops)``: its update written once with the ops of
  :mod:`sgdlab.optim._ops`, for lists of tensors that share device, dtype and step count ``t``
  (``ops=FOREACH``) or for one parameter's tensors (``ops=SINGLE``);
* ``kernel``: the same update for one parameter as a :class:`~sgdlab.optim._compiled.Kernel`, with
  ``_coefficients(group, t)`` (the per-step scalars it takes) and ``_constants(group)``.

Dispatch, one policy for every optimizer and parameter group: the compiled kernel where
:func:`~sgdlab.optim._compiled.compiled_mode` picks it (hyperparameter ``compiled``; with ``compiled=None``
and a run-length hint, :meth:`Optimizer.expect_steps`, :func:`~sgdlab.optim._compiled.planned_mode`
decides instead); otherwise ``_update``
on :func:`buckets` of tensors, all of a device and dtype at once (the multi-tensor path, ``torch._foreach_*``
ops) where :func:`use_foreach` says so, else one parameter at a time (the per-parameter path, plain tensor
ops). On the CPU ``torch._foreach_*`` ops run the per-tensor ops one tensor after the other, so the two
eager paths give the same numbers. The kernels use a fused form (one division per element, see
:class:`AdamFamily`) that differs from the eager update in the last bits, so the eager update is written
separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any

import torch
from torch.optim.optimizer import _get_scalar_dtype

from ..errors import ConfigError, check_range
from ._compiled import Kernel, check_compiled, check_steps, compiled_mode, planned_mode
from ._ops import FOREACH, SINGLE

__all__ = ["AdamFamily", "ElementwiseOptimizer", "Optimizer", "SparseGradientError", "adam_denominator", "buckets",
           "check_adam", "check_betas",
           "check_flag", "defaults_from", "expect_steps", "use_foreach"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class SparseGradientError(ConfigError, RuntimeError):
    """A parameter has a sparse gradient, which no sgdlab optimizer supports (also a ``RuntimeError``, as
    torch.optim's optimizers raise)."""

    def __init__(self, optimizer: str, shape: Sequence[int]):
        super().__init__(f"{optimizer} does not support sparse gradients (got one for a parameter of shape "
                         f"{tuple(shape)}); use dense gradients, e.g. torch.nn.Embedding(..., sparse=False)")


def check_flag(name: str, value: Any, none: bool = False) -> bool | None:
    """``value`` if it is True or False (or None where ``none``), else a ConfigError naming ``name``."""
    if not isinstance(value, bool) and not (none and value is None):
        raise ConfigError(f"{name} must be True{', False or None' if none else ' or False'}, got {value!r}")
    return value


def check_betas(betas: Any, name: str = "betas", n: int = 2) -> tuple[float, ...]:
    """``n`` decay rates, each in [0, 1), as a tuple of floats."""
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        names = ", ".join(f"beta{i + 1}" for i in range(n))
        raise ConfigError(f"{name} must be a tuple of {n} decay rates ({names}), got {betas!r}")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, low=0.0, high=1.0, high_open=True)
    return tuple(float(b) for b in betas)


def defaults_from(arguments: dict[str, Any]) -> dict[str, Any]:
    """A constructor's hyperparameters from its ``locals()``: everything but ``self`` and ``params``, so that
    the signature states each default once."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}


def use_foreach(flag: bool | None, params: Iterable[torch.Tensor], devices: tuple[str, ...] | None = None) -> bool:
    """The ``foreach=None`` rule of every sgdlab optimizer: the multi-tensor path when all ``params`` are plain
    tensors on one device type (one of ``devices``, for an optimizer whose multi-tensor path pays only there).
    """
    if flag is not None:
        return bool(flag)
    params = list(params)
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and (devices is None or kinds <= set(devices)) and all(type(p) in _PLAIN for p in params)


def buckets(tensors: Sequence[torch.Tensor], batched: bool, keys: Sequence[Any] | None = None) -> list[list[int]]:
    """Indices of ``tensors`` to update together: per (device, dtype, key) when ``batched``, else one by one."""
    if not batched:
        return [[i] for i in range(len(tensors))]
    out: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype, None if keys is None else keys[i]), []).append(i)
    return list(out.values())


def adam_denominator(ms: Any, vs: Any, grads: Any, t: float, beta1: float, beta2: float, eps: float,
                     ops: Any = FOREACH) -> Any:
    """Adam's moments ``m <- lerp(m, g, 1 - beta1)``, ``v <- beta2 v + (1 - beta2) g^2`` in place, and the
    denominators ``sqrt(v / (1 - beta2^t)) + eps`` (lists of tensors of one device, dtype and step count ``t``;
    one tensor each with ``ops=SINGLE``, :mod:`sgdlab.optim._ops`)."""
    ops.lerp_(ms, grads, 1 - beta1)
    ops.mul_(vs, beta2)
    ops.addcmul_(vs, grads, grads, value=1 - beta2)
    denom = ops.sqrt(vs)
    ops.div_(denom, math.sqrt(1 - beta2 ** t))
    ops.add_(denom, eps)
    return denom


def check_adam(group: dict[str, Any]) -> None:
    """Adam's hyperparameters ``betas`` (normalised to a tuple of floats), ``eps`` and ``weight_decay``."""
    group["betas"] = check_betas(group["betas"])
    check_range("eps", group["eps"], low=0.0)
    check_range("weight_decay", group["weight_decay"], low=0.0)


def expect_steps(opt: torch.optim.Optimizer, steps: int | None) -> torch.optim.Optimizer:
    """:meth:`Optimizer.expect_steps` for any optimizer: sets the hint on ``opt`` and, through wrappers
    (``base_optimizer``: Lookahead, SAM, SWA, ...), on every sgdlab optimizer inside; others (torch.optim's)
    have no use for it. ``steps`` is checked either way. Returns ``opt``."""
    steps = check_steps(steps)
    inner: Any = opt
    for _ in range(16):  # wrappers of wrappers, without looping on a cycle
        if isinstance(inner, Optimizer):
            inner.expect_steps(steps)
        inner = getattr(inner, "base_optimizer", None)
        if inner is None:
            break
    return opt


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step`` calls :meth:`_step_group` for each group's parameters with a
    gradient, and whose hyperparameters are checked by :meth:`_validate` (added groups included)."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        self._validate(defaults)
        super().__init__(params, defaults)

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        """Check one group's hyperparameters (normalising them in place); extended by each optimizer."""
        check_range("lr", group["lr"], low=0.0)
        if "foreach" in group:
            check_flag("foreach", group["foreach"], none=True)
        if "compiled" in group:
            check_compiled(group["compiled"])
        if "maximize" in group:
            check_flag("maximize", group["maximize"])

    #: the run-length hint (:meth:`expect_steps`): about how many steps this optimizer will take; None: unknown
    expected_steps: int | None = None

    def expect_steps(self, steps: int | None) -> Optimizer:
        """Tell the optimizer about how many ``step()`` calls it will make from now on (None: unknown), so that
        ``compiled=None`` compiles only where the run repays the compile time (:mod:`sgdlab.optim._compiled`,
        "the run-length hint"). Speed only: the paths compute the same update (to rounding, see there).
        Returns the optimizer. sgdlab's runner calls it with ``--steps`` right after creating the optimizer."""
        self.expected_steps = check_steps(steps)
        self.__dict__.pop("_plans", None)  # decide again with the new hint
        return self

    #: the key of the optimizer's own entry in ``state_dict()``, for state outside ``state`` and
    #: ``param_groups`` (generator states, global counters): :meth:`_extra_state` writes it and
    #: :meth:`_load_extra_state` reads it back; ``None``: no such entry
    extra_state_key: str | None = None

    def _extra_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.extra_state_key is not None:
            sd[self.extra_state_key] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = self.extra_state_key
        extra = None if key is None else state_dict.get(key)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != key})
        if extra is not None:
            self._load_extra_state(extra)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate(merged)  # an added group's values are checked like the constructor's
        param_group.update({k: merged[k] for k in param_group if k != "params"})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved before a hyperparameter existed get its default
            for k, v in self.defaults.items():
                if k != "differentiable":  # torch.optim's bookkeeping, not ours
                    group.setdefault(k, v)

    def _with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The parameters of ``group`` that have a gradient (a sparse one is an error)."""
        params = []
        for p in group["params"]:  # one pass: this runs for every parameter at every step
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise SparseGradientError(type(self).__name__, p.shape)
            if p.is_complex():
                raise ConfigError(f"{type(self).__name__} does not support complex parameters")
            params.append(p)
        return params

    def _evaluate(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; returns the closure's loss (None without a closure)."""
        loss = self._evaluate(closure)
        groups = [(group, self._with_grad(group)) for group in self.param_groups]
        self._prepare(groups)
        for group, params in groups:
            if params:
                self._step_group(group, params)
        return loss

    def _prepare(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """Called once per step before the groups are updated (SGD-SaI initialises new blocks here)."""

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError


class ElementwiseOptimizer(Optimizer):
    """An elementwise update (module docstring): declared state, an eager ``_update`` and a compiled kernel.

    Hyperparameters every elementwise optimizer takes:

    * ``foreach``: True: the multi-tensor path, False: one parameter at a time; None: :func:`use_foreach`
      (the multi-tensor path when all parameters share one device type, for AdamP/SGDP on CUDA only).
    * ``compiled``: the ``torch.compile``d kernel (one fused loop per tensor); None picks it for groups of at
      least 4M elements, or, given the run's length (:meth:`Optimizer.expect_steps`), where the run repays the
      compile time (:mod:`sgdlab.optim._compiled`), else ``foreach`` decides.
    * ``maximize``: ascend the objective (the gradient is negated; ``p.grad`` is left as it is).
    """

    state_names: tuple[str, ...] = ()
    counted = True
    #: whether ``_update`` uses the step count ``t`` (else it gets None and no counter is read back)
    uses_step = True
    kernel: Kernel | None = None
    #: device types where ``foreach=None`` takes the multi-tensor path (None: any, see :func:`use_foreach`)
    foreach_devices: tuple[str, ...] | None = None

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            if self.counted:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            for name in self.state_names:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _mode(self, group: dict[str, Any], params: list, grads: list, columns: list[list]) -> str | None:
        """The compiled mode for the group, judged on its parameters, gradients and state tensors."""
        if self.kernel is None:
            return None
        return compiled_mode(group["compiled"], [*params, *grads, *chain.from_iterable(columns)])

    def _planned(self, group: dict[str, Any], params: list[torch.Tensor], default: str | None) -> str | None:
        """``compiled=None``'s mode with the run-length hint (:func:`~sgdlab.optim._compiled.planned_mode`),
        decided once per group and set of parameters with a gradient; the eager path (``foreach`` decides) once
        the kernel failed to compile."""
        if self.kernel.error is not None:
            return None
        plans = self.__dict__.setdefault("_plans", {})
        key = (id(group), len(params))
        mode = plans.get(key, False)
        if mode is False:
            devices = {p.device for p in params}
            mode = plans[key] = planned_mode(default, self.expected_steps, len(params),
                                             sum(p.numel() for p in params), params[0].device.type,
                                             len(devices) == 1)
        return mode

    def planned_modes(self) -> set[str | None]:
        """The modes the run-length hint picked so far (one per group and set of parameters; empty without
        a hint or before the first step)."""
        return set(self.__dict__.get("_plans", {}).values())

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = [self.state.get(p) or self._state(p) for p in params]  # a known state without a call
        columns = [[st[name] for st in states] for name in self.state_names]
        grads = [p.grad for p in params]
        mode = self._mode(group, params, grads, columns)
        if self.expected_steps is not None and self.kernel is not None and group.get("compiled") is None:
            mode = self._planned(group, params, mode)
        if group.get("maximize"):
            grads = torch._foreach_neg(grads)
        if mode:
            self._compiled(mode, group, params, grads, states, columns)
            return
        ts: list[Any] = [None] * len(params)
        if self.counted:
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            if self.uses_step:
                ts = [s.item() for s in steps]
        if not use_foreach(group["foreach"], params, self.foreach_devices):  # one parameter at a time
            update = self._update
            for t, tensors in zip(ts, zip(params, grads, *columns, strict=True), strict=True):
                update(group, t, *tensors, ops=SINGLE)
            return
        for idx in buckets(params, True, ts):
            self._update(group, ts[idx[0]], [params[i] for i in idx], [grads[i] for i in idx],
                         *([col[i] for i in idx] for col in columns), ops=FOREACH)

    def _update(self, group: dict[str, Any], t: Any, params: Any, grads: Any, *states: Any, ops: Any) -> None:
        """The eager update of tensors that share device, dtype and step count ``t`` (None if not counted):
        lists of them with ``ops=FOREACH``, one parameter's tensors with ``ops=SINGLE`` (:mod:`sgdlab.optim._ops`)."""
        raise NotImplementedError

    def _coefficients(self, group: dict[str, Any], t: float) -> list[float]:
        """The kernel's per-step scalars at step ``t``."""
        raise NotImplementedError

    def _constants(self, group: dict[str, Any]) -> tuple:
        """The kernel's constant hyperparameters."""
        return ()

    def _compiled(self, mode: str, group: dict[str, Any], params: list, grads: list, states: list[dict],
                  columns: list[list]) -> None:
        """The group's step with the compiled kernel (step counters advanced by :meth:`Kernel.run_stepped`)."""
        self.kernel.run_stepped(mode, list(zip(params, grads, *columns, strict=True)), [st["step"] for st in states],
                                lambda t: self._coefficients(group, t), self._constants(group))


class AdamFamily(ElementwiseOptimizer):
    """Hyperparameters, state (``exp_avg``, ``exp_avg_sq``) and kernel coefficients of the Adam-family optimizers.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        betas: decay rates (beta1, beta2) of the first and second moments, each in [0, 1).
        eps: added to the square root of the bias-corrected second moment.
        weight_decay: decoupled weight decay coefficient; theta <- theta (1 - lr * weight_decay) each step.
        foreach, compiled, maximize: as for every :class:`ElementwiseOptimizer`.

    A kernel ``kernel(p, g, *states, step_size, bc2, eps_bc2, decay, beta1, beta2)`` gets ``step_size = lr /
    (1 - beta1^t)``, ``bc2 = sqrt(1 - beta2^t)``, ``eps_bc2 = eps * bc2`` and ``decay = 1 - lr * weight_decay``,
    and uses ``m / (sqrt(v) / bc2 + eps) = bc2 * m / (sqrt(v) + eps_bc2)``: one division per element instead
    of two."""

    state_names = ("exp_avg", "exp_avg_sq")

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_adam(group)

    def _coefficients(self, group: dict[str, Any], t: float) -> list[float]:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bc2 = math.sqrt(1 - beta2 ** t)
        return [lr / (1 - beta1 ** t), bc2, eps * bc2, 1 - lr * wd]

    def _constants(self, group: dict[str, Any]) -> tuple:
        return group["betas"]
