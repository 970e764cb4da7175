"""The tensor ops of :meth:`ElementwiseOptimizer._update <sgdlab.optim._base.ElementwiseOptimizer._update>`,
in two spellings with the same names, so that one body serves both eager paths.

:data:`FOREACH` takes lists of tensors (the ``torch._foreach_*`` functions; the multi-tensor path) and
:data:`SINGLE` one tensor (the plain tensor ops; the per-parameter path, where a ``torch._foreach_*`` call
on a one-element list costs about 0.4 us more than the plain op). On the CPU a ``torch._foreach_*`` op runs
the plain op on each tensor in turn, so the two give the same numbers. ``batched`` says which one it is.
A scalar argument is one number for all tensors; keyword arguments (``alpha=``, ``value=``) are spelled out.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

__all__ = ["FOREACH", "SINGLE"]

_NAMES = ("abs_", "add", "add_", "addcdiv_", "addcmul_", "clamp_min_", "copy_", "div", "div_", "lerp_", "mul",
          "mul_", "neg", "norm", "sigmoid_", "sign", "sqrt", "sub")


def _foreach_clamp_(xs: list[torch.Tensor], low: float, high: float) -> None:
    torch._foreach_clamp_min_(xs, low)  # torch has no two-sided foreach clamp
    torch._foreach_clamp_max_(xs, high)


FOREACH = SimpleNamespace(batched=True, clamp_=_foreach_clamp_,
                          **{n: getattr(torch, f"_foreach_{n}") for n in _NAMES})
SINGLE = SimpleNamespace(batched=False, clamp_=torch.Tensor.clamp_, norm=torch.linalg.vector_norm,
                         **{n: getattr(torch.Tensor if n.endswith("_") else torch, n) for n in _NAMES if n != "norm"})
