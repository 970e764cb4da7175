"""Convolutions: ``F.conv1d`` and ``F.conv2d``, any stride, padding, dilation and groups."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..grads import ParamGrads
from ..planning import CHUNK, Planner, Workspace
from ..recorder import Recorder
from ..rule import Rule, Unsupported, bind, register


@register(F.conv1d, F.conv2d)
@dataclass
class Conv(Rule):
    """The outer-product rule of :class:`~.linear.Linear` with the input's patches ``P_i`` for ``a`` (``T`` =
    output pixels): ``G_i = g_i P_iᵀ`` per group, ``‖G_i‖_F²`` from ``G_i`` materialised (Li et al. 2021;
    Bu et al. 2022). Plan ``"keep"``: ``G_i`` of all examples in the workspace (patches gathered in scratch),
    the clipped sum ``Σ_i c_i G_i``; ``"norm"`` (beyond the budget): ``G_i`` a few examples at a time as one
    grouped convolution weight gradient with the batch folded into the channels, for the norms only, and the
    clipped sum as the weight gradient of ``c ⊙ g``. Bias: ``Σ_pixels g_i``, materialised."""

    weight: str | None = None
    bias: str | None = None
    x: torch.Tensor | None = None
    weight_shape: tuple = ()
    stride: tuple = ()
    padding: list = field(default_factory=list)
    dilation: tuple = ()
    groups: int = 1

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        x, w, b, stride, padding, dilation, groups = bind(
            args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
        dims = 1 if func is F.conv1d else 2
        kernel, dilation = tuple(w.shape[2:]), _pairs(dilation, dims)
        use = cls(weight=rec.param(w, "the weight"), bias=rec.param(b, "the bias"),
                  weight_shape=tuple(w.shape), stride=_pairs(stride, dims), dilation=dilation, groups=groups,
                  padding=_conv_padding(padding, dims, kernel, dilation))
        x = rec.input(x, dims + 2)
        if x.dim() != dims + 2:
            raise Unsupported("unbatched input")
        use.x = use.keep(x)
        out = func(*args, **kwargs)
        if any(lo != hi for lo, hi in use.padding):  # "same" with an even kernel: pad explicitly
            use.x = F.pad(use.x, [v for lo_hi in reversed(use.padding) for v in lo_hi])
            use.padding = [(0, 0)] * dims
        return rec.record(use, out)

    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]

    def tied_weight(self) -> str | None:
        return self.weight

    def plan(self, planner: Planner) -> str:
        if self.weight is None:
            return "dense"
        n, temporary = planner.b * planner.numel(self.weight), self.scratch_size()
        if not planner.fits(n, temporary):
            return "norm"
        planner.keep(self.g, n)
        planner.reserve(self.g, temporary, temporary=True)
        return "keep"

    def assemble(self, plan: str, grads: dict[str, ParamGrads], b: int, workspace: Workspace) -> None:
        if self.bias is not None:
            grads[self.bias].add_dense(self.g.flatten(2).sum(2))
        if self.weight is None:
            return
        p = grads[self.weight]
        if plan == "keep":
            p.set_stored(*self.per_example_into(workspace))
            return
        if plan == "tied":
            p.add_dense(self.per_example(self.x, self.g))
            return
        step = max(1, CHUNK // p.param.numel())
        p.sq = torch.cat([torch.linalg.vector_norm(self.per_example(xx, gg).flatten(1), dim=1).square()
                          for xx, gg in zip(self.x.split(step), self.g.split(step), strict=True)])
        p.parts.append(self.clipped_sum)

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """The weight gradient of ``c ⊙ g``."""
        return self.weight_grad(self.x, self.g * c.to(self.g.dtype).view(-1, *[1] * (self.g.dim() - 1)))

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

    def per_example(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(b, *weight shape) weight gradients of each of ``x``'s ``b`` examples: the batch folded into the
        channels, one group per example."""
        b = x.shape[0]
        out = self.weight_grad(x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:]), groups=b)
        return out.view(b, *self.weight_shape)

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

    def per_example_into(self, workspace: Workspace) -> tuple[torch.Tensor, tuple, tuple]:
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
