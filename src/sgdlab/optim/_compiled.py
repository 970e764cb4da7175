"""``torch.compile``d update kernels for the elementwise optimizers, with an eager fallback.

An optimizer's whole per-element update is written once as a plain function of one parameter's tensors;
:class:`Kernel` compiles it in one of two modes (inductor fuses the update into one loop per tensor: each
element of the parameter and its state is read and written once, where the ``_foreach_*`` path makes one
pass per operation):

* ``"tensor"``: one compiled call per parameter, on flattened (1-D) tensors, so one compiled function
  serves every shape (the first size change recompiles once with dynamic sizes). Compiles in about 3–5 s
  on the 2-core CPU; each call costs about 0.1 ms of Python and guard overhead.
* ``"group"``: one compiled call for the whole parameter group (the loop over its tensors is unrolled into
  one C++ kernel with one loop per tensor), so the per-call overhead is paid once per step; optimizers that
  count steps per parameter advance the counters inside the call too (:meth:`Kernel.run_stepped`).
  Compilation takes longer the more tensors the group has (7–20 s for ``charlm``'s 28 on the idle 2-core
  CPU, 16–36 s when it is loaded; a fifth to an eighth of that once inductor's on-disk cache holds the
  kernel), and a different set of tensors (shapes, count) compiles again.

Values that change every step (learning rate, bias corrections, decay) are passed as tensors (0-d, or one
row per tensor in ``"group"`` mode) on the parameters' device, so schedulers and the step count never
trigger a recompilation; constant hyperparameters (betas, eps) are Python floats.

``compiled`` (a hyperparameter of the optimizers that have kernels): ``None`` (automatic) compiles
``"tensor"`` kernels for a parameter group of at least :data:`AUTO_MIN_NUMEL` elements whose tensors are all
contiguous — measured on the 2-core CPU (BENCHMARKS.md), compiling costs 3–5 s once and saves about 40 ms
per step at 12.6M parameters, so it pays for itself within about a hundred steps there — and otherwise takes
the multi-tensor path, unless the optimizer knows how long the run is (below). ``True`` or ``"tensor"``
forces per-tensor kernels, ``"group"`` one kernel per group (the fastest steps, though AdamP's is no faster
than its per-tensor kernels at 10M parameters: for long runs or many small tensors), ``False`` never compiles.

**The run-length hint** (:meth:`sgdlab.optim._base.Optimizer.expect_steps`, set by sgdlab's runner to
``--steps`` right after it creates the optimizer; library users can call it too): with ``compiled=None`` and a
hint of ``steps``, :func:`planned_mode` compiles only when the expected saving exceeds the expected compile
time, ``steps x saving per step > compile time``, with costs measured on the 2-core CPU (the constants below;
their ratio, not the machine's speed, sets the break-even):

* a group of fewer than :data:`GROUP_MAX_NUMEL` parameter elements on one device takes the ``"group"`` kernel
  when ``steps * (GROUP_SAVING_PER_TENSOR_S * n + GROUP_SAVING_PER_ELEMENT_S * numel) >
  GROUP_COMPILE_BASE_S + GROUP_COMPILE_PER_TENSOR_S * n`` for its ``n`` tensors of ``numel`` elements in all:
  for ``charlm`` (28 tensors, 0.45M) from :func:`break_even` = 14,614 steps (measured: 10–40 thousand for
  LaProp, MARS, Grams and SGD-SaI), for a handful of tiny tensors only from about 10^5;
* a group that gets ``"tensor"`` kernels without a hint (at least :data:`AUTO_MIN_NUMEL` elements) keeps them
  when ``steps * TENSOR_SAVING_PER_ELEMENT_S * numel > TENSOR_COMPILE_S`` (from 268 steps at 10M parameters);
* otherwise the eager path (``foreach`` decides: the multi-tensor path, AdamP/SGDP's per-parameter one on CPU);
* anything else, and every device type but the CPU (where nothing was measured), is decided as without a hint;
  so is a kernel that failed to compile once (the multi-tensor path, not the kernel run eagerly).

The compile cost is the **cold** one (an empty inductor cache). Inductor's on-disk caches (FX graph cache and
AOTAutograd cache, both on by default in torch 2.13, under ``TORCHINDUCTOR_CACHE_DIR``) cut a recompile to a
fifth to an eighth (charlm, loaded 2-core CPU: 16–36 s cold, 2–4 s warm, plus 3–4 s for a process's first
compile), but whether they hold a kernel cannot be told without tracing it (their key is a hash of the
traced graph), which is itself a large part of the warm cost; and a guess from the machine's state (a marker
file) would make the code path, and so the last bits of a run's numbers, depend on what ran before on that
machine. So the rule depends only on the hint, the group's sizes and the device type: two runs of one
configuration take the same path everywhere. Where the cache is known to be warm, ``compiled="group"`` pays
from about a fifth of the break-even. The hint changes speed only: the kernels compute the same update as the
eager paths, equal to rounding (float64 runs agree to 1e-12; the fused form differs from the eager one in the
last bits), and a run below the break-even takes exactly the path it took without a hint.

If compilation fails (no C++ compiler, an unsupported platform), the kernel warns once and runs the same
function eagerly from then on: same numbers, slower.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

#: Elements in a parameter group from which ``compiled=None`` compiles (see the module docstring).
AUTO_MIN_NUMEL = 1 << 22


# --- the run-length rule (module docstring). Costs measured on the 2-core CPU under load (BENCHMARKS.md,
# "the default path"): LaProp, MARS, Grams and SGD-SaI, group kernel vs the multi-tensor path, on charlm's
# parameters and on 4, 8 and 28 small tensors; the savings are the lower of the typical ones, the compile
# times (a process's first compile included) the higher. Only the ratio of saving to compile time matters.
#: groups of fewer parameter elements than this may take the "group" kernel on a long enough run
GROUP_MAX_NUMEL = 1 << 20
#: "group" kernel vs the multi-tensor path: seconds saved per step, per tensor and per element of the group
GROUP_SAVING_PER_TENSOR_S = 20e-6
GROUP_SAVING_PER_ELEMENT_S = 3.5e-9
#: cold compile of a "group" kernel (empty inductor cache): a fixed part and a part per tensor of the group
GROUP_COMPILE_BASE_S = 6.0
GROUP_COMPILE_PER_TENSOR_S = 0.9
#: per-tensor kernels: cold compile seconds (3-5 s, and a process's first compile), and seconds saved per
#: step per element over the multi-tensor path (40 ms at 12.6M parameters, BENCHMARKS.md)
TENSOR_COMPILE_S = 8.0
TENSOR_SAVING_PER_ELEMENT_S = 3e-9
#: device types whose costs were measured (elsewhere the hint changes nothing)
MEASURED_DEVICES = ("cpu",)


def check_steps(steps: Any) -> int | None:
    """The run-length hint: None (unknown) or a non-negative integer; anything else is a ConfigError."""
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ConfigError(f"expected steps must be None (unknown) or a non-negative integer (how many steps the "
                          f"optimizer will take), got {steps!r}")
    return int(steps)


def group_saving_s(n_tensors: int, numel: int) -> float:
    """Seconds a ``"group"`` kernel saves per step over the multi-tensor path (the measured model)."""
    return GROUP_SAVING_PER_TENSOR_S * n_tensors + GROUP_SAVING_PER_ELEMENT_S * numel


def group_compile_s(n_tensors: int) -> float:
    """Seconds a cold compile of a ``"group"`` kernel for ``n_tensors`` tensors takes (the measured model)."""
    return GROUP_COMPILE_BASE_S + GROUP_COMPILE_PER_TENSOR_S * n_tensors


def break_even(n_tensors: int, numel: int, mode: str = "group") -> int:
    """The fewest steps from which ``mode``'s kernel repays its cold compile for a group of ``n_tensors``
    tensors of ``numel`` elements in all (:func:`planned_mode` compiles from there on)."""
    if mode == "group":
        return math.floor(group_compile_s(n_tensors) / group_saving_s(n_tensors, numel)) + 1
    return math.floor(TENSOR_COMPILE_S / (TENSOR_SAVING_PER_ELEMENT_S * max(numel, 1))) + 1


def planned_mode(default: str | None, steps: int | None, n_tensors: int, numel: int, device_type: str,
                 one_device: bool) -> str | None:
    """``compiled=None``'s mode given the run-length hint ``steps`` (module docstring): ``default`` is the mode
    without a hint (:func:`compiled_mode`), ``n_tensors`` and ``numel`` the group's parameters and their
    elements, ``one_device`` whether all its tensors share a device."""
    if steps is None or device_type not in MEASURED_DEVICES:
        return default
    if default == "tensor":
        return "tensor" if steps >= break_even(n_tensors, numel, "tensor") else None
    if default is None and one_device and numel < GROUP_MAX_NUMEL and steps >= break_even(n_tensors, numel):
        return "group"
    return default


COMPILED = (None, True, False, "tensor", "group")
# inductor re-checks every input's size and stride on each call, which dynamo's guards already did: about
# 2.5 us per tensor, 0.07 ms per step for charlm's 28 parameters in "group" mode
_OPTIONS = {"size_asserts": False}


def _over_group(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` applied to each parameter of a group: ``run(tensor_lists, coef, consts)`` calls
    ``fn(*(lst[i] for lst in tensor_lists), *coef[i], *consts)`` for every ``i``."""
    def run(tensor_lists: list[list[torch.Tensor]], coef: torch.Tensor, consts: tuple) -> None:
        for i in range(coef.shape[0]):
            fn(*[ts[i] for ts in tensor_lists], *coef[i].unbind(), *consts)

    # a code object of its own, so that torch.compile's cache (and recompile limit) is per kernel
    run.__code__ = run.__code__.replace(co_name=f"{fn.__name__}_over_group")
    return run


def _over_group_counted(fn: Callable[..., None]) -> Callable[..., None]:
    """Like :func:`_over_group`, with each parameter's step counter advanced inside the compiled call."""
    def run(tensor_lists: list[list[torch.Tensor]], steps: list[torch.Tensor], coef: torch.Tensor,
            consts: tuple) -> None:
        for i in range(len(steps)):
            steps[i].add_(1)
            fn(*[ts[i] for ts in tensor_lists], *coef[i].unbind(), *consts)

    run.__code__ = run.__code__.replace(co_name=f"{fn.__name__}_over_group_counted")
    return run


class Kernel:
    """``fn`` compiled on first use; on a compilation error, ``fn`` itself (with one warning).

    ``fn(*tensors, *coefficients, *constants)`` updates one parameter in place; :meth:`run` applies it to a
    whole parameter group in the ``"tensor"`` or ``"group"`` mode (module docstring). ``flatten=False`` keeps
    the tensors' shapes in ``"tensor"`` mode (for updates that reduce over rows, like AdamP's projection)."""

    def __init__(self, fn: Callable[..., None], name: str, flatten: bool = True):
        self.fn, self.name, self.flatten = fn, name, flatten
        self._group_fn = _over_group(fn)
        self._counted_fn = _over_group_counted(fn)
        self._compiled: dict[str, Callable[..., None]] = {}
        self.error: str | None = None

    def _call(self, mode: str, fn: Callable[..., None], *args: Any) -> None:
        if self.error is None:
            try:
                compiled = self._compiled.get(mode)
                if compiled is None:
                    compiled = self._compiled[mode] = torch.compile(fn, fullgraph=True, options=_OPTIONS)
                return compiled(*args)
            except Exception as e:  # compilation happens before any tensor is written
                text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                self.error = f"{type(e).__name__}: {text}"
                warnings.warn(f"{self.name}: torch.compile failed ({self.error}); running the same update "
                              "eagerly (pass compiled=False to skip compilation)", RuntimeWarning, stacklevel=4)
        return fn(*args)

    def __call__(self, *args: Any) -> None:
        """One parameter's update (tensors already flattened, coefficients as 0-d tensors)."""
        self._call("tensor", self.fn, *args)

    def run(self, mode: str, tensors: list[tuple[torch.Tensor, ...]], coefs: list[list[float]],
            consts: tuple = ()) -> None:
        """Update a group: ``tensors[i]`` are parameter ``i``'s tensors (the parameter first), ``coefs[i]`` its
        per-step coefficients, ``consts`` the group's constant hyperparameters."""
        if mode == "group":
            like = tensors[0][0]
            dtype = like.dtype
            for d in {ts[0].dtype for ts in tensors}:
                dtype = torch.promote_types(dtype, d)
            coef = torch.tensor(coefs, dtype=dtype, device=like.device)
            self._call("group", self._group_fn, [list(col) for col in zip(*tensors, strict=True)], coef, consts)
            return
        for ts, c in zip(tensors, coefs, strict=True):
            self(*(t.view(-1) if t.dim() and self.flatten else t for t in ts), *scalars(c, ts[0]), *consts)

    def run_stepped(self, mode: str, tensors: list[tuple[torch.Tensor, ...]], steps: list[torch.Tensor],
                    coefficients: Callable[[float], list[float]], consts: tuple = ()) -> None:
        """:meth:`run` for optimizers that count steps per parameter: adds 1 to each ``steps[i]`` (a 0-d
        tensor) and updates parameter ``i`` with ``coefficients(new step count)``. In ``"group"`` mode (step
        counters on the parameters' device) the counters are advanced inside the compiled call and the
        coefficients computed once per distinct count, which saves the per-parameter host work (about 0.1
        ms per step for 28 parameters on the CPU)."""
        device = tensors[0][0].device
        if mode != "group" or any(s.device != device for s in steps):
            torch._foreach_add_(steps, 1)
            self.run(mode, tensors, [coefficients(s.item()) for s in steps], consts)
            return
        memo: dict[float, list[float]] = {}
        rows = []
        for s in steps:
            t = s.item() + 1
            row = memo.get(t)
            if row is None:
                row = memo[t] = coefficients(t)
            rows.append(row)
        dtype = tensors[0][0].dtype
        for d in {ts[0].dtype for ts in tensors}:
            dtype = torch.promote_types(dtype, d)
        coef = torch.tensor(rows, dtype=dtype, device=device)
        self._call("counted", self._counted_fn, [list(col) for col in zip(*tensors, strict=True)], list(steps),
                   coef, consts)

def check_compiled(value: Any) -> None:
    if not any(value is v if not isinstance(v, str) else value == v for v in COMPILED):
        raise ConfigError(f"compiled must be None (automatic), True or 'tensor' (one kernel per tensor), 'group' "
                         f"(one kernel per parameter group) or False, got {value!r}")


def compiled_mode(flag: Any, tensors: list[torch.Tensor]) -> str | None:
    """``"tensor"``, ``"group"`` or None (not compiled) for a group's ``tensors`` (module docstring).
    ``"group"`` needs one device (else per tensor); per-tensor kernels need contiguous tensors (else none)."""
    if flag is False:
        return None
    if flag == "group" and len({t.device for t in tensors}) == 1:
        return "group"
    if flag is None and sum(map(torch.Tensor.numel, tensors)) < AUTO_MIN_NUMEL:  # the common case, checked first
        return None
    return "tensor" if all(t.is_contiguous() for t in tensors) else None


def use_compiled(flag: Any, tensors: list[torch.Tensor]) -> bool:
    """Whether a group takes a compiled path (:func:`compiled_mode` is not None)."""
    return compiled_mode(flag, tensors) is not None


def scalars(values: list[float], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """0-d tensors on ``like``'s device and dtype (one allocation)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unbind()
