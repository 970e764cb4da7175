"""Per-example gradient norms and clipped gradient sums without per-example gradients of the whole model.

DP-SGD needs, for a micro-batch of ``B`` examples, every example's gradient norm ``‖g_i‖`` and the clipped
sum ``Σ_i c_i g_i``. Most parameters enter the model through an operation whose weight gradient is a sum over
the example's positions of outer products, ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (``a`` the operation's input,
``g`` the loss gradient with respect to its output). One ordinary forward and one backward that stops at the
operations' outputs (so no weight gradient is formed) give ``a`` and ``g`` for every example at once; then:

* **norms** (Lee & Kifer 2021; Li, Tramèr, Liang & Hashimoto 2021, "ghost norm"):
  ``‖G_i‖ = ‖a_i‖ ‖g_i‖`` when the example has one position (``T = 1``); otherwise ``G_i`` itself by one
  batched matrix product (as many multiply-adds as the non-private weight gradient) while the memory budget
  lasts, and beyond it ``Σ_{t,t'} (a_t·a_{t'})(g_t·g_{t'})`` from two ``T×T`` Gram matrices or ``G_i`` a few
  examples at a time, whichever takes fewer multiply-adds;
* **clipped sum** (Bu, Wang, Zha & Karypis 2022, "book-keeping"): ``Σ_i c_i G_i`` of the kept ``G_i`` (one
  matrix-vector product), else ``(c ⊙ g)ᵀ a``, one matrix product the size of the non-private weight
  gradient. No second backward pass is needed (ghost clipping proper, Li et al., runs the backward again on
  the reweighted loss: about a non-private backward more).

The operations are recognised at the level of torch functions (a ``TorchFunctionMode`` active during the
forward), not of modules, so a parameter used outside its module (a tied output embedding ``h @ E.t()``,
a sliced position table ``P[:t]``) is seen and handled:

=========================================  =============================================================
``F.linear``, ``x @ W``, ``x @ W.t()``     the outer-product rule (``T`` = an example's positions)
``F.conv1d``, ``F.conv2d`` (any groups)    the same with the input's patches (``T`` = output pixels)
``F.embedding``                            ``G_i`` by scatter, or ``Σ_{t,t'} [x_t = x_{t'}] (g_t·g_{t'})``
``F.layer_norm``, ``F.group_norm``         per-example ``Σ g ⊙ x̂`` and ``Σ g``, materialised
``x + P``, ``x - P``, ``x * P``            ``P`` broadcast over the batch: ``g`` (``g ⊙ x``) reduced
``P.t()``, ``P.T``, ``P[ints, slices]``    views of a parameter, followed back to the parameter
=========================================  =============================================================

A parameter reached through several of them (tied weights) has its per-example gradients materialised
and summed. Any other operation on a trainable parameter, an input whose first dimension is not the
micro-batch, ``Embedding(max_norm=…, scale_grad_by_freq=True, sparse=True)``, an input modified in place
after use, or a parameter that the loss's autograd graph reaches without a recorded operation (a custom
``autograd.Function``) raise :class:`Unsupported`; the caller then uses ``torch.func``.

Materialised per-example gradients and the temporaries that produce them live in a workspace kept from one
micro-batch to the next (at most :data:`MATERIALISE_BUDGET` elements): on the CPU, fresh allocations of
that size cost page faults comparable to the matrix products that fill them.

The per-example loss is the one :class:`~sgdlab.privacy.dpsgd.DPSGD` defines, ``ℓ_i`` = the loss function
on a batch of that one example; for a loss that is the mean over the batch of per-example means (every
sgdlab task), ``Σ_i ℓ_i = B · loss(batch)``, which is what is differentiated here. The engine checks this
(and the batch-first layout assumed above) once against ``torch.func`` before trusting the fast path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

#: elements of materialised per-example weight gradients kept at once (beyond it: Gram matrices, or the
#: per-example gradient computed for its norm only and the clipped sum recomputed as one matrix product)
MATERIALISE_BUDGET = 1 << 27
_CHUNK = 1 << 24  # elements of a temporary per-example gradient block computed for norms only

_T = torch.Tensor
_SAFE_GETTERS = {"shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "layout", "is_cuda", "names",
                 "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes"}
_SAFE_METHODS = {_T.size, _T.dim, _T.numel, _T.stride, _T.is_floating_point, _T.is_complex, _T.element_size,
                 _T.is_contiguous, _T.data_ptr, _T.__len__, _T.detach, _T.get_device, _T.nelement, _T.ndimension}
_ADD = {torch.add, _T.add, _T.__add__, _T.__radd__, _T.__iadd__, _T.add_}
_SUB = {torch.sub, _T.sub, _T.__sub__, _T.__isub__, _T.sub_}
_MUL = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}  # not in place: g ⊙ x needs the x before the product
_MATMUL = {torch.matmul, _T.matmul, _T.__matmul__, torch.mm, _T.mm}
_TRANSPOSE = {_T.t, torch.t, _T.transpose, torch.transpose}


class Unsupported(Exception):
    """The fast path cannot compute per-example gradients of this model (or this batch)."""


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


@dataclass
class _View:
    """A tensor derived from parameter ``name`` by ``chain``: ("t",) or ("index", index, parent_shape)."""

    name: str
    chain: tuple = ()


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
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


# ---- recorded uses ------------------------------------------------------------------------------------

@dataclass
class _Use:
    out: torch.Tensor | None = None  # the operation's output (its gradient edge is taken at once)
    edge: Any = None
    saved: list = field(default_factory=list)  # (tensor, version) pairs that must not change before backward
    g: torch.Tensor | None = None

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        self.saved.append((t, t._version))
        return t


@dataclass
class _Linear(_Use):
    """``out[..., o] = Σ_k a[..., k] W[o, k] + bias[o]``; ``layout`` maps ``W`` (d_out × d_in) to the parameter:
    "W" (nn.Linear), "WT" (``x @ P``, P is d_in × d_out), "vec" (``x @ p``, p of d_in)."""

    weight: str | None = None
    bias: str | None = None
    layout: str = "W"
    x: torch.Tensor | None = None

    def activations(self, b: int) -> torch.Tensor:
        """``a`` as (B, T, d_in)."""
        return self.x.reshape(b, -1, self.x.shape[-1])

    def out_grads(self, b: int) -> torch.Tensor:
        """``g`` as (B, T, d_out)."""
        if self.layout == "vec":
            return self.g.reshape(b, -1, 1)
        return self.g.reshape(b, -1, self.g.shape[-1])


@dataclass
class _Conv(_Use):
    """``F.conv1d`` / ``F.conv2d``: per-example weight gradients from the input's patches (kept in the workspace)
    and the output gradients, or as one grouped convolution weight gradient with the batch folded into the
    channels (``groups · B`` groups; fresh memory, for chunks beyond the budget and tied weights)."""

    weight: str | None = None
    bias: str | None = None
    x: torch.Tensor | None = None
    weight_shape: tuple = ()
    stride: tuple = ()
    padding: list = field(default_factory=list)
    dilation: tuple = ()
    groups: int = 1

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The weight gradient of a convolution of ``x`` with output gradient ``g`` (``groups`` times the
        layer's groups, each of the layer's weight shape)."""
        shape = (groups * self.weight_shape[0], *self.weight_shape[1:])
        # an uninitialised weight of the right shape: only its shape is read (torch.nn.grad's expanded one
        # is copied to a contiguous tensor first)
        weight = g.new_empty(shape)
        return torch.ops.aten.convolution_backward(
            g, x, weight, None, self.stride, [lo for lo, _ in self.padding], self.dilation, False,
            [0] * len(self.stride), self.groups * groups, [False, True, False])[1]

    def _as_2d(self) -> tuple:
        """Input, kernel, stride, dilation and padding as for a 2-d convolution (conv1d: height 1)."""
        x, kernel, stride, dilation, padding = self.x, self.weight_shape[2:], self.stride, self.dilation, self.padding
        if x.dim() == 3:
            x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
            padding = [(0, 0), *padding]
        return x, kernel, stride, dilation, padding

    def scratch_size(self) -> int:
        """Elements of scratch :meth:`per_example_into` uses, at most: a padded or channels-last copy of the
        input, and the patches."""
        x, kernel, _, _, padding = self._as_2d()
        b, c = x.shape[:2]
        padded = b * c * math.prod(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], padding, strict=True))
        patches = b * c * math.prod(kernel) * math.prod(self.g.shape[2:])
        return padded + patches

    def per_example_into(self, workspace: _Workspace) -> tuple[torch.Tensor, tuple, tuple]:
        """Per-example weight gradients ``G_i = g_i P_iᵀ`` (``P_i`` the patches) as ``(grads, shape, perm)``:
        ``grads`` is (B, *shape) and ``perm`` takes one example's ``shape`` to the weight's (c_out, c_in/groups,
        kh, kw). The patches are gathered by one copy whose innermost runs are as long as possible: runs of
        channels from a channels-last copy of the input when a group has at least as many channels as the
        output has columns (then ``shape`` is (c_out, kh, kw, c_in/groups)), else runs of output columns."""
        x, kernel, stride, dilation, padding = self._as_2d()
        b, c, h, w = x.shape
        groups, c_out = self.groups, self.weight_shape[0]
        cg, (oh, ow) = c // groups, self.g.shape[-2:] if self.g.dim() == 4 else (1, self.g.shape[-1])
        last = cg >= ow  # channels-last patches
        padded = any(lo or hi for lo, hi in padding)
        if last or padded:
            xp = workspace.scratch((b, h + sum(padding[0]), w + sum(padding[1]), c) if last else
                                   (b, c, h + sum(padding[0]), w + sum(padding[1])), x)
            if padded:
                xp.zero_()
            inner = (slice(padding[0][0], padding[0][0] + h), slice(padding[1][0], padding[1][0] + w))
            if last:
                xp[:, inner[0], inner[1], :] = x.permute(0, 2, 3, 1)
            else:
                xp[:, :, inner[0], inner[1]] = x
        else:
            xp = x
        spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
        hw = (1, 2) if last else (2, 3)
        windows = xp.unfold(hw[0], spans[0], stride[0]).unfold(hw[1], spans[1], stride[1])
        windows = windows[..., ::dilation[0], ::dilation[1]]  # (b, oh, ow, c, kh, kw) or (b, c, oh, ow, kh, kw)
        k = math.prod(kernel) * cg
        if last:
            patches = workspace.scratch((b, groups, oh, ow, *kernel, cg), x, offset=xp.numel())
            patches.copy_(windows.unflatten(3, (groups, cg)).permute(0, 3, 1, 2, 5, 6, 4))
            right = patches.view(b, groups, oh * ow, k)
        else:
            patches = workspace.scratch((b, c, *kernel, oh, ow), x, offset=xp.numel() if padded else 0)
            patches.copy_(windows.permute(0, 1, 4, 5, 2, 3))
            right = patches.view(b, groups, k, oh * ow).transpose(-1, -2)
        out = workspace.take((b, groups, c_out // groups, k), x)
        torch.matmul(self.g.reshape(b, groups, c_out // groups, oh * ow), right, out=out)
        if last:
            return out.view(b, -1), (c_out, *kernel, cg), (0, 3, 1, 2)
        return out.view(b, -1), (c_out, cg, *kernel), (0, 1, 2, 3)

    def per_example(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(b, *weight shape) weight gradients of each of ``x``'s ``b`` examples: the batch folded into the
        channels, one group per example."""
        b = x.shape[0]
        out = self.weight_grad(x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:]), groups=b)
        return out.view(b, *self.weight_shape)


@dataclass
class _Embedding(_Use):
    weight: str = ""
    idx: torch.Tensor | None = None
    padding_idx: int | None = None
    num: int = 0


@dataclass
class _Norm(_Use):
    """``F.layer_norm`` (``groups`` None) or ``F.group_norm``."""

    weight: str | None = None
    bias: str | None = None
    x: torch.Tensor | None = None
    shape: tuple = ()
    groups: int | None = None
    eps: float = 1e-5


@dataclass
class _Elementwise(_Use):
    """``out = x ∘ P`` with ``P`` (a view of a parameter) broadcast over the batch."""

    view: _View | None = None
    view_shape: tuple = ()
    sign: float = 1.0
    other: torch.Tensor | None = None  # for products


# ---- the recording mode -------------------------------------------------------------------------------

class _Recorder(TorchFunctionMode):
    def __init__(self, names: dict[int, str], batch: int):
        super().__init__()
        self.names, self.batch = names, batch
        self.views: dict[int, _View] = {}
        self._alive: list[torch.Tensor] = []  # keeps the views' ids unique while recording
        self.uses: list[_Use] = []

    def _info(self, t: Any) -> str | _View | None:
        if not isinstance(t, torch.Tensor):
            return None
        i = id(t)
        if i in self.names:
            return _View(self.names[i])
        return self.views.get(i)

    def _batched(self, t: Any, min_dim: int = 1) -> bool:
        return (isinstance(t, torch.Tensor) and t.dim() >= min_dim and t.shape[0] == self.batch
                and self._info(t) is None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():  # nothing computed here carries a gradient
            return func(*args, **kwargs)
        hits = [(a, info) for a in _tensors(args, kwargs) if (info := self._info(a)) is not None]
        if not hits:
            return func(*args, **kwargs)
        owner = getattr(func, "__self__", None)
        if func in _SAFE_METHODS or (getattr(func, "__name__", "") == "__get__"
                                     and getattr(owner, "__name__", None) in _SAFE_GETTERS):
            return func(*args, **kwargs)
        try:
            rule = self._rule(func, owner)
            if rule is None:
                raise Unsupported("no per-example rule")
            return rule(func, args, kwargs)
        except Unsupported as e:
            raise Unsupported(f"parameter {hits[0][1].name!r} is used by {_describe(func)} ({e})") from None

    def _rule(self, func, owner) -> Callable | None:
        if func is F.linear:
            return self._linear
        if func in (F.conv1d, F.conv2d):
            return self._conv
        if func is F.embedding:
            return self._embedding
        if func in (F.layer_norm, F.group_norm):
            return self._norm
        if func in _MATMUL:
            return self._matmul
        if func in _ADD or func in _SUB or func in _MUL:
            return self._elementwise
        if func in _TRANSPOSE or func is _T.__getitem__ or (
                getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", None) in ("T", "mT")):
            return self._view
        return None

    # -- helpers
    def _param(self, t: Any, what: str) -> str | None:
        """The trainable parameter ``t`` is (None for a constant); a view of one is not accepted here."""
        info = self._info(t)
        if info is None:
            return None
        if info.chain:
            raise Unsupported(f"{what} is a view of a parameter")
        return info.name

    def _record(self, use: _Use, out: torch.Tensor) -> torch.Tensor:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            if out.shape[:1] != (self.batch,):
                raise Unsupported("its output's first dimension is not the batch")
            use.out, use.edge = out, get_gradient_edge(out)
            self.uses.append(use)
        return out

    def _input(self, x: Any, min_dim: int = 2) -> torch.Tensor:
        if not self._batched(x, min_dim):
            raise Unsupported(f"the input is not a batch of {self.batch} examples along its first dimension")
        return x

    # -- rules
    def _linear(self, func, args, kwargs):
        x, w, b = _bind(args, kwargs, ("input", "weight", "bias"), (None,))
        use = _Linear(weight=self._param(w, "the weight"), bias=self._param(b, "the bias"), layout="W")
        use.x = use.keep(self._input(x))
        return self._record(use, func(*args, **kwargs))

    def _conv(self, func, args, kwargs):
        x, w, b, stride, padding, dilation, groups = _bind(
            args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
        dims = 1 if func is F.conv1d else 2
        kernel, dilation = tuple(w.shape[2:]), _pairs(dilation, dims)
        use = _Conv(weight=self._param(w, "the weight"), bias=self._param(b, "the bias"),
                    weight_shape=tuple(w.shape), stride=_pairs(stride, dims), dilation=dilation, groups=groups,
                    padding=_conv_padding(padding, dims, kernel, dilation))
        x = self._input(x, dims + 2)
        if x.dim() != dims + 2:
            raise Unsupported("unbatched input")
        use.x = use.keep(x)
        out = func(*args, **kwargs)
        if any(lo != hi for lo, hi in use.padding):  # "same" with an even kernel: pad explicitly
            use.x = F.pad(use.x, [v for lo_hi in reversed(use.padding) for v in lo_hi])
            use.padding = [(0, 0)] * dims
        return self._record(use, out)

    def _embedding(self, func, args, kwargs):
        idx, w, padding_idx, max_norm, _, scale_grad_by_freq, sparse = _bind(
            args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                           "sparse"), (None, None, 2.0, False, False))
        if max_norm is not None or scale_grad_by_freq or sparse:
            raise Unsupported("max_norm, scale_grad_by_freq and sparse are not supported")
        name = self._param(w, "the weight")
        if name is None or self._info(idx) is not None:
            raise Unsupported("a parameter as indices")
        num = w.shape[0]
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num
        use = _Embedding(weight=name, padding_idx=padding_idx, num=num)
        use.idx = use.keep(self._input(idx, 1))
        return self._record(use, func(*args, **kwargs))

    def _norm(self, func, args, kwargs):
        if func is F.layer_norm:
            x, shape, w, b, eps = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                        (None, None, 1e-5))
            use = _Norm(shape=(shape,) if isinstance(shape, int) else tuple(shape), eps=eps)
        else:
            x, groups, w, b, eps = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
                                         (None, None, 1e-5))
            use = _Norm(groups=groups, eps=eps)
        use.weight, use.bias = self._param(w, "the weight"), self._param(b, "the bias")
        use.x = use.keep(self._input(x))
        if func is F.layer_norm and use.x.dim() <= len(use.shape):
            raise Unsupported("the normalised shape includes the batch dimension")
        return self._record(use, func(*args, **kwargs))

    def _matmul(self, func, args, kwargs):
        x, p = _bind(args, kwargs, ("input", "other"), ())
        if self._info(x) is not None:
            raise Unsupported("a parameter on the left of a matrix product")
        info = self._info(p)
        if info.chain == ():
            layout = "vec" if p.dim() == 1 else "WT"
        elif info.chain == (("t",),):
            layout = "W"
        else:
            raise Unsupported("a view of a parameter other than its transpose")
        if p.dim() not in (1, 2):
            raise Unsupported("a parameter of more than two dimensions")
        use = _Linear(weight=info.name, layout=layout)
        use.x = use.keep(self._input(x))
        return self._record(use, func(*args, **kwargs))

    def _elementwise(self, func, args, kwargs):
        a, b, *rest = _bind(args, kwargs, ("input", "other", "alpha"), (1,))
        if rest[0] != 1:
            raise Unsupported("alpha != 1")
        ia, ib = self._info(a), self._info(b)
        if (ia is None) == (ib is None):
            raise Unsupported("both or neither operands are parameters")
        view, p, x = (ia, a, b) if ia is not None else (ib, b, a)
        out = func(*args, **kwargs)
        if not (self._batched(x) and isinstance(out, torch.Tensor) and out.dim() >= 1
                and out.shape[0] == self.batch):
            raise Unsupported("the other operand is not a batch")
        if p.dim() == out.dim() and p.shape[0] != 1:
            raise Unsupported("the parameter is not broadcast over the batch")
        sign = -1.0 if (func in _SUB and ib is not None) else 1.0
        use = _Elementwise(view=view, view_shape=tuple(p.shape), sign=sign)
        if func in _MUL:
            use.other = use.keep(x)
        return self._record(use, out)

    def _view(self, func, args, kwargs):
        p = args[0]
        info = self._info(p)
        if func is _T.__getitem__:
            index = args[1] if len(args) > 1 else kwargs.get("indices")
            parts = index if isinstance(index, tuple) else (index,)
            def basic(i: Any) -> bool:
                if isinstance(i, slice):
                    return not any(isinstance(v, torch.Tensor) for v in (i.start, i.stop, i.step))
                return i is Ellipsis or (isinstance(i, int) and not isinstance(i, bool))

            if not all(basic(i) for i in parts):
                raise Unsupported("only integer and slice indexing is followed")
            step = ("index", index, tuple(p.shape))
        else:
            if p.dim() != 2:
                raise Unsupported("transpose of a parameter that is not a matrix")
            if func in (_T.transpose, torch.transpose):
                dims = _bind(args[1:], kwargs, ("dim0", "dim1"), ())
                if {d % 2 for d in dims} != {0, 1}:
                    raise Unsupported("transpose of a dimension with itself")
            step = ("t",)
        out = func(*args, **kwargs)
        self._alive.append(out)
        self.views[id(out)] = _View(info.name, info.chain + (step,))
        return out


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


# ---- per-example quantities ---------------------------------------------------------------------------

def _pairs(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _conv_padding(padding: Any, dims: int, kernel: tuple, dilation: tuple) -> list[tuple[int, int]]:
    """(before, after) padding of each spatial dimension."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * dims
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]  # "same": torch pads the extra after
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _pairs(padding, dims)]


def _to_param(g: torch.Tensor, chain: tuple, workspace: _Workspace) -> torch.Tensor:
    """Per-example gradients with respect to a view (``chain`` applied to the parameter) → with respect to
    the parameter."""
    for step in reversed(chain):
        if step[0] == "t":
            g = g.transpose(-1, -2)
        else:
            _, index, shape = step
            full = workspace.take(g.shape[:1] + shape, g).zero_()
            full[(slice(None),) + (index if isinstance(index, tuple) else (index,))] = g
            g = full
    return g


def _reduce_to(g: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Sum ``g`` (B, *out) over the dimensions a tensor of ``shape`` was broadcast along → (B, *shape)."""
    b, out = g.shape[0], g.shape[1:]
    if len(shape) == len(out) + 1:  # shape includes a leading 1 aligned with the batch
        shape_tail = shape[1:]
    else:
        shape_tail = (1,) * (len(out) - len(shape)) + tuple(shape)
    dims = [i + 1 for i, (s, o) in enumerate(zip(shape_tail, out, strict=True)) if s == 1 and o != 1]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(b, *shape)


def _layout(g: torch.Tensor, layout: str, shape: torch.Size) -> torch.Tensor:
    """A (d_out, d_in) weight gradient → the parameter's layout."""
    return (g.t() if layout == "WT" else g).reshape(shape)


class _Workspace:
    """Memory for materialised per-example gradients and the temporaries that produce them, kept from one
    micro-batch to the next: on the CPU, fresh allocations of this size cost page faults comparable to the
    matrix products that fill them. Regions handed out by :meth:`take` are valid until the next
    :meth:`reserve`; the scratch area is shared by all temporaries."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._offsets: dict[tuple, int] = {}
        self._scratch: dict[tuple, int] = {}

    def reserve(self, sizes: dict[tuple, int], scratch: dict[tuple, int]) -> None:
        """Room for ``sizes[(dtype, device)]`` elements of regions and ``scratch[…]`` of temporaries."""
        for key in sizes.keys() | scratch.keys():
            n = sizes.get(key, 0) + scratch.get(key, 0)
            buf = self._bufs.get(key)
            if buf is None or buf.numel() < n:
                self._bufs[key] = None  # free the old buffer before allocating the new one
                self._bufs[key] = torch.empty(n, dtype=key[0], device=key[1])
        self._offsets = {key: 0 for key in self._bufs}
        self._scratch = {key: sizes.get(key, 0) for key in self._bufs}

    def take(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        key, n = (like.dtype, like.device), math.prod(shape)
        start = self._offsets[key]
        self._offsets[key] = start + n
        return self._bufs[key][start:start + n].view(shape)

    def scratch(self, shape: tuple, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
        key = (like.dtype, like.device)
        start = self._scratch[key] + offset
        return self._bufs[key][start:start + math.prod(shape)].view(shape)


class _Param:
    """What the backward left for one parameter: its per-example norms and how to form its clipped sum."""

    def __init__(self, param: nn.Parameter):
        self.param = param
        self.dense: torch.Tensor | None = None  # Σ over materialised uses, (B, *shape)
        self._owned = False  # ``dense`` may be added to in place
        # ``dense`` in another layout (a convolution's): (B, *shape) with ``shape[perm]`` the parameter's
        self.stored: tuple[tuple, tuple] | None = None
        self.sq: torch.Tensor | None = None  # per-example squared norm when not materialised
        self.products: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # (a, g, layout) for (c ⊙ g)ᵀ a
        self.scatters: list[_Embedding] = []  # embeddings whose clipped sum is a scatter
        self.convs: list[_Conv] = []  # convolutions whose clipped sum is a weight gradient of c ⊙ g

    def accumulator(self, region: torch.Tensor) -> torch.Tensor:
        """Use ``region`` (zeroed) as ``dense``, for contributions added in place."""
        self.dense, self._owned = region.zero_(), True
        return region

    def set_stored(self, g: torch.Tensor, shape: tuple, perm: tuple) -> None:
        """``dense`` = ``g`` of shape (B, *shape), whose examples become the parameter's layout by ``perm``
        (the parameter's only materialised use)."""
        assert self.dense is None, "a permuted layout is only kept for a parameter's only use"
        self.dense, self._owned, self.stored = g, True, (shape, perm)

    def add_dense(self, g: torch.Tensor) -> None:
        assert self.stored is None
        if self.dense is None:
            self.dense, self._owned = g, False  # g may be autograd's: never written to
        elif self._owned:
            self.dense += g
        else:
            self.dense, self._owned = self.dense + g, True

    def norms(self, b: int) -> torch.Tensor:
        if self.dense is None:
            return self.sq.sqrt() if self.sq is not None else self.param.new_zeros(b)
        norm = torch.linalg.vector_norm(self.dense.reshape(b, -1), dim=1)
        return norm if self.sq is None else (self.sq + norm.square()).sqrt()

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """``Σ_b c_b G_b`` as a new contiguous tensor of the parameter's shape."""
        parts = []
        if self.dense is not None:  # one matrix-vector product
            s = c.to(self.dense.dtype) @ self.dense.reshape(c.shape[0], -1)
            if self.stored is not None:
                shape, perm = self.stored
                s = s.view(shape).permute(perm)
            parts.append(s.reshape(self.param.shape))
        for a, g, layout in self.products:
            cg = g * c.to(g.dtype).view(-1, 1, 1)
            parts.append(_layout(cg.flatten(0, 1).t() @ a.flatten(0, 1), layout, self.param.shape))
        for use in self.convs:
            parts.append(use.weight_grad(use.x, use.g * c.to(use.g.dtype).view(-1, *[1] * (use.g.dim() - 1))))
        total = parts[0].contiguous() if parts else torch.zeros_like(self.param)
        for part in parts[1:]:
            total += part
        for use in self.scatters:
            d = use.g.shape[-1]
            g = (use.g.reshape(c.shape[0], -1, d) * c.to(use.g.dtype).view(-1, 1, 1)).reshape(-1, d)
            idx = use.idx.reshape(-1)
            if use.padding_idx is not None:
                g = g * (idx != use.padding_idx).unsqueeze(1).to(g.dtype)
            total.index_add_(0, idx, g)
        return total


class GhostClipper:
    """Per-example gradient norms and clipped sums of ``loss_fn(model, batch)`` (a mean over the batch)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 params: dict[str, nn.Parameter], budget: int = MATERIALISE_BUDGET):
        self.model, self.loss_fn, self.params, self.budget = model, loss_fn, params, budget
        self._names = {id(p): n for n, p in params.items()}
        if len(self._names) != len(params):
            raise Unsupported("the same tensor is registered under two parameter names")
        self.workspace = _Workspace()

    def run(self, batch: Any, b: int) -> tuple[dict[str, _Param], torch.Tensor]:
        """One forward and one backward on a micro-batch of ``b`` ≥ 1 examples: ``({name: _Param}, Σ_i ℓ_i)``.
        The result holds views of the workspace, valid until the next call."""
        if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
            raise Unsupported("autocast (mixed dtypes between activations and gradients)")
        rec = _Recorder(self._names, b)
        with rec:
            loss = self.loss_fn(self.model, batch)
        rec.views.clear()
        rec._alive.clear()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise Unsupported("the loss is not a scalar tensor")
        total = loss * b  # Σ_i ℓ_i when the loss is the mean of per-example losses (checked by the engine)
        uses = rec.uses
        recorded = {n for u in uses for n in _names_of(u)}
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

    # -- planning: which per-example gradients are materialised, and where
    def _plan(self, uses: list[_Use], b: int) -> list[str]:
        count: dict[str, int] = {}
        for u in uses:
            for name in _names_of(u):
                count[name] = count.get(name, 0) + 1
        plans, used, sizes, scratch, tied_done = [], 0, {}, {}, set()

        def reserve(like: torch.Tensor, n: int, temporary: bool = False) -> None:
            key = (like.dtype, like.device)
            if temporary:
                scratch[key] = max(scratch.get(key, 0), n)
            else:
                sizes[key] = sizes.get(key, 0) + n

        for u in uses:
            name = getattr(u, "weight", None)
            if isinstance(u, _Elementwise):
                reserve(u.g, sum(b * math.prod(step[2]) for step in u.view.chain if step[0] == "index"))
            if not isinstance(u, (_Linear, _Conv, _Embedding)) or name is None:
                plans.append("dense")
                continue
            numel = self.params[name].numel()
            if count[name] > 1:
                plans.append("tied")
                if name not in tied_done:
                    tied_done.add(name)
                    used += b * numel
                    reserve(u.g, b * numel)
                continue
            if isinstance(u, _Conv):
                temporary = u.scratch_size()
                keep = used + b * numel + temporary <= self.budget
                plans.append("keep" if keep else "norm")
                if keep:
                    used += b * numel
                    reserve(u.g, b * numel)
                    reserve(u.g, temporary, temporary=True)
                continue
            fits = used + b * numel <= self.budget
            if isinstance(u, _Embedding):  # scatter into (B, V, d), or T×T token-equality Gram matrices
                t = u.idx.numel() // b
                plan = "keep" if fits and u.num < t * t else "ghost"
            else:
                t = u.g.numel() // (b * (1 if u.layout == "vec" else u.g.shape[-1]))
                d_in, d_out = u.x.shape[-1], numel // u.x.shape[-1]
                plan = ("outer" if t == 1 else "keep" if fits else
                        "ghost" if t * (d_in + d_out) < d_in * d_out else "norm")
            plans.append(plan)
            if plan == "keep":
                used += b * numel
                reserve(u.g, b * numel)
        self.workspace.reserve(sizes, scratch)
        return plans

    def _assemble(self, uses: list[_Use], b: int) -> dict[str, _Param]:
        out = {n: _Param(p) for n, p in self.params.items()}
        plans = self._plan(uses, b)
        for u, plan in zip(uses, plans, strict=True):  # tied parameters: one accumulator each, before any use
            if plan == "tied" and out[u.weight].dense is None:
                out[u.weight].accumulator(self.workspace.take((b, *self.params[u.weight].shape), u.g))
        for u, plan in zip(uses, plans, strict=True):
            if isinstance(u, _Linear):
                self._linear(u, out, plan, b)
            elif isinstance(u, _Conv):
                self._conv(u, out, plan)
            elif isinstance(u, _Embedding):
                self._embedding(u, out[u.weight], plan, b)
            elif isinstance(u, _Norm):
                self._norm(u, out)
            else:
                g = u.g
                if u.other is not None:
                    g = g * u.other
                g = _reduce_to(g, u.view_shape)
                out[u.view.name].add_dense(_to_param(g if u.sign == 1 else -g, u.view.chain, self.workspace))
        return out

    def _linear(self, u: _Linear, out: dict[str, _Param], plan: str, b: int) -> None:
        g = u.out_grads(b)
        if u.bias is not None:
            out[u.bias].add_dense(g.sum(1))
        if u.weight is None:
            return
        p = out[u.weight]
        a = u.activations(b)
        # (B, d_out, d_in) for nn.Linear's layout, (B, d_in, d_out) for x @ P
        left, right = (g.transpose(1, 2), a) if u.layout == "W" else (a.transpose(1, 2), g)
        if plan == "tied":
            p.dense.view(b, left.shape[1], right.shape[2]).baddbmm_(left, right)
        elif plan == "keep":
            region = self.workspace.take((b, left.shape[1], right.shape[2]), g)
            p.add_dense(torch.bmm(left, right, out=region).view(b, *p.param.shape))
        else:
            p.products.append((a, g, u.layout))
            if plan == "outer":
                p.sq = (torch.linalg.vector_norm(a.flatten(1), dim=1)
                        * torch.linalg.vector_norm(g.flatten(1), dim=1)).square()
            elif plan == "ghost":  # two T×T Gram matrices per example
                p.sq = _ghost_sq(a, g)
            else:  # G_i for its norm only, a few examples at a time
                step = max(1, _CHUNK // p.param.numel())
                p.sq = torch.cat([torch.linalg.vector_norm(torch.bmm(ll, rr).flatten(1), dim=1).square()
                                  for ll, rr in zip(left.split(step), right.split(step), strict=True)])

    def _conv(self, u: _Conv, out: dict[str, _Param], plan: str) -> None:
        if u.bias is not None:
            out[u.bias].add_dense(u.g.flatten(2).sum(2))
        if u.weight is None:
            return
        p = out[u.weight]
        if plan == "keep":
            p.set_stored(*u.per_example_into(self.workspace))
            return
        if plan == "tied":
            p.add_dense(u.per_example(u.x, u.g))
            return
        step = max(1, _CHUNK // p.param.numel())
        p.sq = torch.cat([torch.linalg.vector_norm(u.per_example(xx, gg).flatten(1), dim=1).square()
                          for xx, gg in zip(u.x.split(step), u.g.split(step), strict=True)])
        p.convs.append(u)

    def _embedding(self, u: _Embedding, p: _Param, plan: str, b: int) -> None:
        d = u.g.shape[-1]
        g = u.g.reshape(b, -1, d)
        idx = u.idx.reshape(b, -1)
        if u.padding_idx is not None:
            g = g * (idx != u.padding_idx).unsqueeze(-1).to(g.dtype)
        if plan in ("keep", "tied"):
            if plan == "keep":
                p.accumulator(self.workspace.take((b, u.num, d), g))
            rows = (torch.arange(b, device=idx.device).unsqueeze(1) * u.num + idx).reshape(-1)
            p.dense.view(b * u.num, d).index_add_(0, rows, g.reshape(-1, d))
            return
        p.scatters.append(u)
        if idx.shape[1] == 1:
            p.sq = torch.linalg.vector_norm(g.flatten(1), dim=1).square()
        else:
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)
            p.sq = (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))

    def _norm(self, u: _Norm, out: dict[str, _Param]) -> None:
        x, g = u.x, u.g
        if u.groups is None:
            dims = list(range(1, x.dim() - len(u.shape)))
        else:
            dims = list(range(2, x.dim()))
        if u.weight is not None:  # Σ g ⊙ x̂, with x̂ (the normalised input) from the norm without its affine part
            if u.groups is None:
                xhat = F.layer_norm(x, u.shape, eps=u.eps)
            else:
                xhat = F.group_norm(x, u.groups, eps=u.eps)
            xhat.mul_(g)
            out[u.weight].add_dense(xhat.sum(dims) if dims else xhat)
        if u.bias is not None:
            out[u.bias].add_dense(g.sum(dims) if dims else g)


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


def _names_of(u: _Use) -> list[str]:
    if isinstance(u, (_Linear, _Conv, _Norm)):
        return [n for n in (u.weight, u.bias) if n is not None]
    if isinstance(u, _Embedding):
        return [u.weight]
    return [u.view.name]


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` per example, a few examples at a time."""
    t = a.shape[1]
    step = max(1, _CHUNK // (t * t))
    return torch.cat([(torch.bmm(aa, aa.transpose(1, 2)) * torch.bmm(gg, gg.transpose(1, 2))).sum((1, 2))
                      for aa, gg in zip(a.split(step), g.split(step), strict=True)])

