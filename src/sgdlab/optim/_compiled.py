"""``torch.compile``d per-tensor update kernels for the elementwise optimizers, with an eager fallback.

An optimizer's whole per-element update is written once as a plain function of flattened (1-D) tensors;
:class:`Kernel` compiles it (inductor fuses it into one loop per tensor: each element of the parameter and
its state is read and written once, where the ``_foreach_*`` path makes one pass per operation). Values
that change every step (learning rate, bias corrections, decay) are passed as 0-d tensors on the
parameter's device, so schedulers and the step count never trigger a recompilation; constant
hyperparameters (betas, eps) are Python floats. Shapes: the first call compiles for its size and the
first size change recompiles once with dynamic sizes.

``compiled=None`` (the default of the optimizers that have it) compiles a parameter group when it holds at
least :data:`AUTO_MIN_NUMEL` elements and every tensor is contiguous: measured on the 2-core CPU
(BENCHMARKS.md), compiling diffGrad's kernel costs about 3–5 s once and saves about 40 ms per step at 12.6M
parameters (14 ms against 58 ms for the per-parameter loop), so it pays for itself within about a
hundred steps there, but never at the 0.5M parameters of ``charlm``. ``compiled=True`` forces it,
``compiled=False`` never compiles.

If compilation fails (no C++ compiler, an unsupported platform), the kernel warns once and runs the same
function eagerly from then on: same numbers, slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

#: Elements in a parameter group from which ``compiled=None`` compiles (see the module docstring).
AUTO_MIN_NUMEL = 1 << 22


class Kernel:
    """``fn`` compiled on first use; on a compilation error, ``fn`` itself (with one warning)."""

    def __init__(self, fn: Callable[..., None], name: str):
        self.fn, self.name = fn, name
        self._compiled: Callable[..., None] | None = None
        self.error: str | None = None

    def __call__(self, *args: Any) -> None:
        if self.error is None:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, fullgraph=True)
                return self._compiled(*args)
            except Exception as e:  # compilation happens before any tensor is written
                text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                self.error = f"{type(e).__name__}: {text}"
                warnings.warn(f"{self.name}: torch.compile failed ({self.error}); running the same update "
                              "eagerly (pass compiled=False to skip compilation)", RuntimeWarning, stacklevel=3)
        return self.fn(*args)


def check_compiled(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"compiled must be None (automatic), True or False, got {value!r}")


def use_compiled(flag: bool | None, tensors: list[torch.Tensor]) -> bool:
    """Whether a group takes the compiled path: ``flag`` if given, else by size (see the module docstring).
    Non-contiguous tensors always take the multi-tensor or per-parameter path."""
    if flag is False or not all(t.is_contiguous() for t in tensors):
        return False
    return bool(flag) or sum(t.numel() for t in tensors) >= AUTO_MIN_NUMEL


def scalars(values: list[float], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """0-d tensors on ``like``'s device and dtype (one allocation)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unbind()
