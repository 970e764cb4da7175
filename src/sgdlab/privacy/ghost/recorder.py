"""The recorder: a ``TorchFunctionMode`` active during the forward that hands each torch function applied to
a trainable parameter (or a view of one) to its rule in :data:`~.rule.RULES`, and forward hooks that hand
each call of a module whose type has a rule there to that rule, whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .rule import RULES, Rule, Unsupported, module_rule

_T = torch.Tensor
_SAFE_GETTERS = {"shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "layout", "is_cuda", "names",
                 "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes"}
_SAFE_METHODS = {_T.size, _T.dim, _T.numel, _T.stride, _T.is_floating_point, _T.is_complex, _T.element_size,
                 _T.is_contiguous, _T.data_ptr, _T.__len__, _T.detach, _T.get_device, _T.nelement, _T.ndimension}


@dataclass
class View:
    """A tensor derived from parameter ``name`` by ``chain``, a tuple of steps (see :mod:`.rules.views`)."""

    name: str
    chain: tuple = ()


class Recorder(TorchFunctionMode):
    """Records the uses (:class:`~.rule.Rule` instances) of the parameters ``names`` (``id`` → name) in a
    forward on a batch of ``batch`` examples, in ``uses``."""

    def __init__(self, names: dict[int, str], batch: int, model: nn.Module | None = None):
        super().__init__()
        self.names, self.batch, self.model = names, batch, model
        self.views: dict[int, View] = {}
        self._alive: list[torch.Tensor] = []  # keeps the views' ids unique while recording
        self.uses: list[Rule] = []
        self._hooks: list = []
        self._depth = 0  # nesting of modules handled whole
        self._outer: dict[int, str] = names

    def __enter__(self):
        if self.model is not None and any(isinstance(key, type) for key in RULES):
            for m in self.model.modules():
                rule = module_rule(type(m))
                if rule is not None:
                    self._hooks.append(m.register_forward_pre_hook(self._enter_module))
                    self._hooks.append(m.register_forward_hook(self._module_hook(rule), with_kwargs=True))
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.views.clear()
        self._alive.clear()
        return out

    # -- what rules call
    def info(self, t: Any) -> str | View | None:
        """The parameter (or view of one) ``t`` is, or None."""
        if not isinstance(t, torch.Tensor):
            return None
        i = id(t)
        if i in self.names:
            return View(self.names[i])
        return self.views.get(i)

    def batched(self, t: Any, min_dim: int = 1) -> bool:
        return (isinstance(t, torch.Tensor) and t.dim() >= min_dim and t.shape[0] == self.batch
                and self.info(t) is None)

    def param(self, t: Any, what: str) -> str | None:
        """The trainable parameter ``t`` is (None for a constant); a view of one is not accepted here."""
        info = self.info(t)
        if info is None:
            return None
        if info.chain:
            raise Unsupported(f"{what} is a view of a parameter")
        return info.name

    def input(self, x: Any, min_dim: int = 2) -> torch.Tensor:
        """``x``, which must be a batch along its first dimension."""
        if not self.batched(x, min_dim):
            raise Unsupported(f"the input is not a batch of {self.batch} examples along its first dimension")
        return x

    def view(self, out: torch.Tensor, of: View, step: Any) -> torch.Tensor:
        """Follow ``out``, ``step`` applied to ``of`` (a parameter or a view of one); returns ``out``."""
        self._alive.append(out)
        self.views[id(out)] = View(of.name, of.chain + (step,))
        return out

    def record(self, use: Rule, out: Any) -> Any:
        """Record ``use`` with output ``out`` (when it carries a gradient); returns ``out``."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            if out.shape[:1] != (self.batch,):
                raise Unsupported("its output's first dimension is not the batch")
            use.out, use.edge = out, get_gradient_edge(out)
            self.uses.append(use)
        return out

    # -- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():  # nothing computed here carries a gradient
            return func(*args, **kwargs)
        hits = [(a, info) for a in _tensors(args, kwargs) if (info := self.info(a)) is not None]
        if not hits:
            return func(*args, **kwargs)
        owner = getattr(func, "__self__", None)
        if func in _SAFE_METHODS or (getattr(func, "__name__", "") == "__get__"
                                     and getattr(owner, "__name__", None) in _SAFE_GETTERS):
            return func(*args, **kwargs)
        try:
            rule = RULES.get(func)
            if rule is None:
                raise Unsupported("no per-example rule")
            return rule.record(self, func, args, kwargs)
        except Unsupported as e:
            raise Unsupported(f"parameter {hits[0][1].name!r} is used by {_describe(func)} ({e})") from None

    # -- modules handled whole: their own parameters are not followed inside them
    def _enter_module(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth == 1:
            own = {id(p) for p in module.parameters()}
            self._outer, self.names = self.names, {i: n for i, n in self.names.items() if i not in own}

    def _module_hook(self, rule: type[Rule]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._depth -= 1
            if self._depth:
                return
            self.names = self._outer
            if torch.is_grad_enabled():
                try:
                    rule.from_module(self, module, args, kwargs, output)
                except Unsupported as e:
                    raise Unsupported(f"module {type(module).__name__} ({e})") from None
        return hook


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among a call's arguments (one level of lists and tuples, nested containers flattened)."""
    out = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)) and not all(isinstance(v, (int, float, bool)) for v in a):
            out.extend(t for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor))
        elif isinstance(a, dict):
            out.extend(t for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor))
    return out


def _describe(func: Any) -> str:
    """``Tensor.flatten``, ``torch.prelu``, ``F.linear``, … for error messages."""
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    if name == "__get__" and hasattr(owner, "__name__"):
        return f"Tensor.{owner.__name__}"
    if getattr(func, "__module__", None) in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{name}"
    qualname = getattr(func, "__qualname__", None) or name or repr(func)
    for prefix, spelled in (("TensorBase.", "Tensor."), ("_VariableFunctionsClass.", "torch.")):
        if qualname.startswith(prefix):
            return spelled + qualname[len(prefix):]
    return qualname

