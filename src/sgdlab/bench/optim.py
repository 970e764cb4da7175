"""``sgdlab bench optim``: the cost of one optimizer step, for every registered optimizer.

Two parameter sets: ``10m`` (about 10M parameters shaped like a small transformer: an 8192x256 embedding,
1024x1024 and 4096x1024 matrices, biases and norm vectors) and ``charlm`` (the parameters of the default
``charlm`` model, about 0.45M). Gradients are random and set once; only ``opt.step()`` is timed.

Per optimizer and parameter set it reports:

* **ms/step**: median over ``--repeats`` timed blocks, after ``--warmup`` untimed steps. A block is as many
  consecutive steps as fill ``--block-ms`` (at least one), so tiny steps are not lost in timer noise. The
  optimizer runs its default path (``foreach=None``, ``compiled=None``): the per-tensor compiled kernel where
  it has one and the group holds >= 4M elements, else the multi-tensor path on one device type (AdamP/SGDP:
  the per-parameter path on CPU); torch.optim's own default on CPU is the for-loop.
* **group ms**, **group compile s**: for the optimizers with compiled kernels, the same with
  ``compiled="group"`` (one compiled call for the whole parameter group), and the time of its first step,
  which includes compiling (less when inductor's on-disk cache already holds the kernel).
* **eager ms**: the same with ``foreach=False`` (and ``compiled=False``), the per-parameter loop, and the
  fast path's speed-up over it (the fast path: the faster of the default and the group kernel; the
  bandwidth, AdamW and pytorch_optimizer columns use it too).
* **state B/param**: ``state_bytes(opt) / numel`` after the warm-up.
* **eff. GB/s**: bytes moved per step under a simple traffic model, divided by the step time. The model:
  every step reads each parameter, its gradient and each optimizer-state tensor once and writes the
  parameter and each state tensor once, i.e. ``bytes = 3 * param_bytes + 2 * state_bytes``. Lookahead's
  slow weights are touched once every ``k`` steps, so they count ``2 / k`` of their bytes. The model ignores
  temporaries and extra passes, so it is a lower bound of the real traffic for the elementwise optimizers
  and meaningless for the matrix ones (Muon, SWAN, AuON, FRUGAL), whose step is dominated by matrix products.
  It is shown against a **copy bandwidth** measured in the same rounds (``dst.copy_(src)`` on a tensor the
  size of the parameter set, ``2 * bytes / time``) and against fused AdamW's effective bandwidth under the same
  model (``3 + 2 * 2`` parameter sizes per step).
* **x AdamW**: time relative to ``torch.optim.AdamW(fused=True)`` (``foreach=True`` where fused is not
  available for the device and dtype; the header says which), measured in the same rounds.
* **pytorch_optimizer**: the time of pytorch_optimizer's implementation of the same algorithm with the same
  hyperparameters (and ``foreach=True``), where one exists, and our speed-up over it (their time / ours), for
  the fast path and for the default path.
* **N-step default path**, **amortised ms**, **amortised speed-up vs p_o**: the default path of a run of
  ``N = --amortise-steps`` steps (1000 by default), i.e. the optimizer told the run's length
  (``expect_steps(N)``, as sgdlab's runner does; :mod:`sgdlab.optim._compiled` says what it picks), and its cost
  per step with the compile time counted: ``(warm-up time - warm-up steps x step time + N x step time) / N``,
  the warm-up steps' extra time being the compile (and the state allocation); and pytorch_optimizer's time
  over that. This
  contender is warmed up first in its row, so it pays for any kernel it compiles (the group column then shows
  the compile time it paid). Cold and warm inductor caches: ``--cold-cache`` runs with a fresh, empty cache
  directory; without it, whatever ``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_$USER``) holds.

All implementations timed for one row share the parameters and gradients and are run in alternating order
(round ``r`` starts with contender ``r mod n``), so slow drifts of the machine hit all of them alike.
Rows with slow steps get fewer repeats (at least 3) so that a row takes about ``--row-seconds``, and an
implementation whose step takes over a second gets a single warm-up step. The reference AdamW and the copy
are timed in every row's rounds too; their table rows show the medians over all rounds.

Special cases:

* Sophia-G: just ``step()``; its Hessian estimate (the step protocol's ``before_backward``) is not timed here.
* Sophia-H: needs a closure with a differentiable loss on Hessian steps (every ``k``). Both
  implementations are built with ``k`` (``update_period``) = 10**9, so the only Hessian step is the very
  first (warm-up) step: ours gets a cheap quadratic-loss closure, pytorch_optimizer's gets ``hessian=``
  zeros. The timed steps are ordinary steps: the cost of Hessian-vector products is not measured.
* Lookahead: ``create("lookahead", params, base="adamw")`` against ``pytorch_optimizer.Lookahead`` around an
  identical ``torch.optim.AdamW``; ``foreach`` switches the inner AdamW.
* Muon: both treat every parameter with ``ndim >= 2`` (the embedding included) with Newton-Schulz and the
  rest with AdamW. pytorch_optimizer always runs Newton-Schulz in bfloat16, so the comparison is against
  ours with ``ns_dtype="bfloat16"`` (an extra contender, shown in the notes; the row's own time is our
  default, float32). On CPUs without bfloat16 matrix units that takes minutes per row, so on CPU the
  pytorch_optimizer comparison is left out for Muon (the row says so); it runs on CUDA.
"""

from __future__ import annotations

import gc
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import optim, tasks
from ..config import resolve_device
from ..errors import ConfigError
from ..optim import protocol

SLOW_STEP_S = 1.0  # contenders whose step takes longer get only one warm-up step
HUGE_K = 10**9  # Sophia-H Hessian period: no Hessian step after the first (warm-up) one

# Optimizers whose step is dominated by matrix products, not memory traffic: no bandwidth verdict for them
# (FRUGAL projects every gradient matrix onto its subspace and back, and re-computes an SVD every T steps).
MATRIX_OPTIMIZERS = {"muon", "swan", "auon", "hybrid-auon", "frugal"}

# sgdlab name -> pytorch_optimizer name (load_optimizer) of the same algorithm.
PYTORCH_OPTIMIZER_NAMES = {"diffgrad": "diffgrad", "adamp": "adamp", "sgdp": "sgdp", "sgd-sai": "sgdsai",
                           "ademamix": "ademamix", "mars": "mars", "grams": "grams", "laprop": "laprop",
                           "sophia-h": "sophiah", "lookahead": "lookahead", "muon": "muon"}

# Hyperparameters our row uses on top of the registry defaults (besides foreach).
ROW_OVERRIDES: dict[str, dict[str, Any]] = {"sophia-h": {"k": HUGE_K}}

# The ~10M parameter set: (name, shape). nn.Linear layout (out, in).
SHAPES_10M: list[tuple[str, tuple[int, ...]]] = [
    ("embed.weight", (8192, 256)),
    ("in_proj.weight", (1024, 256)), ("in_proj.bias", (1024,)),
    ("norm1.weight", (1024,)), ("norm1.bias", (1024,)),
    ("attn.q.weight", (1024, 1024)), ("attn.q.bias", (1024,)),
    ("attn.k.weight", (1024, 1024)), ("attn.k.bias", (1024,)),
    ("attn.v.weight", (1024, 1024)), ("attn.v.bias", (1024,)),
    ("norm2.weight", (1024,)), ("norm2.bias", (1024,)),
    ("mlp.up.weight", (4096, 1024)), ("mlp.up.bias", (4096,)),
    ("out_proj.weight", (256, 1024)), ("out_proj.bias", (256,)),
    ("norm_f.weight", (256,)), ("norm_f.bias", (256,)),
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

COLUMNS = ["params", "optimizer", "ms/step", "group ms", "group compile s", "eager ms", "fast-path speed-up",
           "state B/param", "eff. GB/s", "% of copy BW", "BW / AdamW BW", "x AdamW time", "pytorch_optimizer ms",
           "speed-up vs p_o", "default-path speed-up vs p_o", "N-step default path", "amortised ms",
           "amortised speed-up vs p_o", "notes"]


def add_arguments(p) -> None:
    """Options of ``sgdlab bench optim`` (``p`` is an ``argparse`` parser)."""
    p.add_argument("--optimizers", default=None, metavar="A,B,C",
                   help="comma-separated optimizer names; default: every registered one")
    p.add_argument("--params", default="both", choices=["10m", "charlm", "both"], help="parameter set(s)")
    p.add_argument("--repeats", type=int, default=15, help="timed blocks per implementation (median); fewer "
                   "(at least 3) for rows slower than --row-seconds; default 15")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first; default 3")
    p.add_argument("--block-ms", type=float, default=10.0,
                   help="a timed block runs steps until it lasts at least this long (0: one step); default 10")
    p.add_argument("--row-seconds", type=float, default=12.0,
                   help="about how long the timed rounds of one row may take; default 12")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda; default auto")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype; default float32")
    p.add_argument("--no-pytorch-optimizer", dest="pytorch_optimizer", action="store_false",
                   help="skip the comparison with pytorch_optimizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amortise-steps", type=int, default=1000, metavar="N",
                   help="run length N of the amortised columns: the default path told N steps, compile time "
                        "spread over N steps; 0: leave them out; default 1000")
    p.add_argument("--cold-cache", action="store_true",
                   help="compile into a fresh, empty inductor cache directory (cold compile times)")


# --- parameter sets --------------------------------------------------------------------------------------

def params_10m(device: torch.device, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * 0.02) for _, shape in SHAPES_10M]


def params_charlm(device: torch.device, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    model = tasks.create("charlm", device=device).build_model().to(device=device, dtype=dtype)
    return [p for p in model.parameters() if p.requires_grad]


PARAM_SETS: dict[str, Callable[[torch.device, torch.dtype], list[torch.nn.Parameter]]] = {
    "10m": params_10m, "charlm": params_charlm}


# --- timing ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` consecutive calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


@dataclass
class Contender:
    label: str
    opt: torch.optim.Optimizer | None
    step: Callable[[], Any]
    times: list[float] = field(default_factory=list)
    inner: int = 1
    first: float = math.nan  # seconds of the first step (state allocation, compilation)
    warm: list[float] = field(default_factory=list)  # seconds of each warm-up step, the first included

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def copy_contender(numel: int, device: torch.device, dtype: torch.dtype) -> tuple[Contender, int]:
    """``dst.copy_(src)`` on ``numel`` elements, timed like an optimizer; and the bytes it moves (2 x size)."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    return Contender("copy", None, lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def measure(contenders: list[Contender], warmup: int, repeats: int, block_s: float, row_s: float,
            device: torch.device) -> None:
    """Warm up each contender, then time them in alternating rounds (fills ``times``, seconds per step)."""
    est = {}
    for c in contenders:
        est[c.label] = c.first = _time_block(c.step, 1, device)  # the first step also allocates the state
        c.warm = [c.first]
        for i in range(max(0, warmup - 1)):
            if i > 0 and est[c.label] > SLOW_STEP_S:  # a step this slow (after the first, which may compile)
                break                                 # is not warming anything up any more
            est[c.label] = _time_block(c.step, 1, device)
            c.warm.append(est[c.label])
    for c in contenders:
        c.inner = max(1, math.ceil(block_s / max(est[c.label], 1e-7))) if block_s > 0 else 1
    round_s = sum(c.inner * est[c.label] for c in contenders)
    n = min(repeats, max(3, int(row_s / max(round_s, 1e-9)))) if repeats > 3 else repeats
    for r in range(n):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            c.times.append(_time_block(c.step, c.inner, device))


# --- building the contenders -----------------------------------------------------------------------------

def _set_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, device=p.device) * 1e-2).to(p.dtype)


def has_foreach(name: str) -> bool:
    return "foreach" in optim.hyperparameters(name)


def ours(name: str, params: list[torch.nn.Parameter], foreach: bool | None, **extra: Any) -> Contender:
    hp = {**ROW_OVERRIDES.get(name, {}), **extra}
    if foreach is not None:
        hp["foreach"] = foreach
    opt = optim.create(name, params, **hp)
    step: Callable[[], Any] = opt.step
    need = protocol.needs(opt)
    if need.closure:  # Sophia-H: its Hessian step (the first one only, k = HUGE_K) gets a cheap quadratic loss
        ctx = protocol.StepContext(loss=lambda: sum((p * p).sum() for p in params) * 0.5)

        def step():
            return protocol.step(opt, ctx, need)
    label = "ours" if foreach is not False else "ours eager"
    return Contender(label + "".join(f" {k}={v}" for k, v in extra.items()), opt, step)


def fused_adamw(params: list[torch.nn.Parameter]) -> tuple[Contender, str]:
    """torch.optim.AdamW(fused=True), or foreach=True where fused does not support the device/dtype."""
    try:
        probe = torch.nn.Parameter(torch.zeros(4, device=params[0].device, dtype=params[0].dtype))
        probe.grad = torch.ones_like(probe)
        torch.optim.AdamW([probe], fused=True).step()
        opt, kind = torch.optim.AdamW(params, fused=True), "fused"
    except (RuntimeError, ValueError) as e:
        print(f"bench optim: fused AdamW unavailable ({e}); reference is AdamW(foreach=True)", file=sys.stderr)
        opt, kind = torch.optim.AdamW(params, foreach=True), "foreach"
    return Contender(f"AdamW({kind})", opt, opt.step), kind


def _theirs_kwargs(name: str, cls: type, hp: dict[str, Any]) -> dict[str, Any]:
    """Our hyperparameters that pytorch_optimizer's ``cls`` takes under the same name (same meaning)."""
    sig = inspect.signature(cls.__init__).parameters
    skip = {"self", "params", "maximize", "foreach", "kwargs"}
    out = {k: v for k, v in hp.items() if k in sig and k not in skip and v is not None}
    if "foreach" in sig:
        out["foreach"] = True
    return out


def theirs(name: str, params: list[torch.nn.Parameter]) -> Contender | None:
    """pytorch_optimizer's implementation of ``name`` with our default hyperparameters, or None."""
    if name not in PYTORCH_OPTIMIZER_NAMES:
        return None
    try:
        import pytorch_optimizer as po
    except ImportError:
        return None
    hp = {**optim.hyperparameters(name), **ROW_OVERRIDES.get(name, {})}
    if name == "lookahead":
        base = {k: v for k, v in hp.items() if k in inspect.signature(torch.optim.AdamW).parameters
                and k not in ("params", "foreach")}
        opt = po.Lookahead(torch.optim.AdamW(params, **base, foreach=True), k=hp["k"], alpha=hp["alpha"],
                           pullback_momentum=hp["pullback"])
        return Contender("pytorch_optimizer", opt, opt.step)
    cls = po.load_optimizer(PYTORCH_OPTIMIZER_NAMES[name])
    kw = _theirs_kwargs(name, cls, hp)
    if name == "mars":
        kw.update(mars_type="adamw", optimize_1d=True)  # ours applies MARS to every parameter
    if name == "sophia-h":
        kw.update(p=hp["gamma"], update_period=HUGE_K, hessian_distribution=hp["probe"])
    if name == "muon":
        kw.update(adamw_lr=hp["lr"] * hp["adamw_lr_ratio"], adamw_wd=hp["weight_decay"], use_adjusted_lr=False)
        groups = [dict(params=[p for p in params if p.ndim >= 2], use_muon=True),
                  dict(params=[p for p in params if p.ndim < 2], use_muon=False)]
        opt = cls([g for g in groups if g["params"]], **kw)
    else:
        opt = cls(params, **kw)
    step: Callable[[], Any] = opt.step
    if name == "sophia-h":  # its first step is a Hessian step: hand it one instead of needing a graph
        zeros = [torch.zeros_like(p) for p in params]

        def step():
            return opt.step(hessian=zeros) if opt.param_groups[0].get("step", 0) == 0 else opt.step()
    return Contender("pytorch_optimizer", opt, step)


def model_bytes(name: str, opt: torch.optim.Optimizer, param_bytes: int) -> float:
    """Bytes per step under the traffic model of the module docstring."""
    total = 3.0 * param_bytes
    k = getattr(opt, "k", 1) if name == "lookahead" else 1
    for st in opt.state.values():
        for key, v in st.items():
            if torch.is_tensor(v):
                share = 2.0 / k if key.startswith("slow") else 2.0
                total += share * v.numel() * v.element_size()
    return total


# --- the benchmark ---------------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def planned_label(opt: torch.optim.Optimizer) -> str:
    """What the run-length hint picked for ``opt`` (after its first step)."""
    inner: Any = opt
    while getattr(inner, "base_optimizer", None) is not None:
        inner = inner.base_optimizer
    modes = inner.planned_modes() if hasattr(inner, "planned_modes") else set()
    if not modes:
        return "as default"
    return "+".join(sorted("group" if m == "group" else "per tensor" if m == "tensor" else "not compiled"
                           for m in modes))


def amortised(c: Contender, n: int) -> float:
    """Seconds per step of an ``n``-step run of ``c`` with its warm-up steps' extra time (compilation, a
    recompilation in a later warm-up step included) counted."""
    warm = c.warm or [c.first]
    return (max(sum(warm) - len(warm) * c.median, 0.0) + n * c.median) / n


def run_row(name: str, set_name: str, params: list[torch.nn.Parameter], args,
            device: torch.device) -> tuple[dict[str, Any], Contender, Contender]:
    """Time ``name`` on ``params``: the row, and the reference AdamW and copy contenders (their times are
    measured in the same rounds)."""
    numel = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    fe = has_foreach(name)
    n_run = getattr(args, "amortise_steps", 0)
    planned = None
    if n_run > 0:  # the default path of an n_run-step run: first, so that it pays for what it compiles
        planned = ours(name, params, None)
        optim._base.expect_steps(planned.opt, n_run)
        planned.label = f"ours default, {n_run} steps"
    main = ours(name, params, None)  # the default path (foreach / compiled / eager, as the optimizer picks)
    contenders = [main] if planned is None else [planned, main]
    # one compiled kernel for the whole group, where the optimizer has compiled kernels
    group = ours(name, params, None, compiled="group") if "compiled" in optim.hyperparameters(name) else None
    if group:
        contenders.append(group)
    # "eager": the per-parameter loop, never the compiled kernel (which the fast path picks at >= 4M elements)
    no_compile = {"compiled": False} if "compiled" in optim.hyperparameters(name) else {}
    eager = ours(name, params, False, **no_compile) if fe else None
    if eager:
        contenders.append(eager)
    ref, _ = fused_adamw(params)
    contenders.append(ref)
    copy, copy_bytes = copy_contender(numel, device, params[0].dtype)
    contenders.append(copy)
    notes = []
    # pytorch_optimizer's Muon always runs Newton-Schulz in bfloat16, which CPUs without bf16 matrix units run
    # many times slower than float32 (minutes per row at 10M parameters): compared on CUDA only.
    skip_theirs = name == "muon" and device.type != "cuda"
    other = theirs(name, params) if args.pytorch_optimizer and not skip_theirs else None
    paired = main
    if other is not None:
        contenders.append(other)
        if name == "muon":
            paired = ours(name, params, True, ns_dtype="bfloat16")
            contenders.append(paired)
    measure(contenders, args.warmup, args.repeats, args.block_ms / 1000, args.row_seconds, device)
    best = group if group and group.median < main.median else main  # the fastest of our paths
    plan = planned_label(planned.opt) if planned else None
    group_first = group and (planned.first if plan == "group" else group.first)  # who compiled it first
    t_run = amortised(planned, n_run) if planned else None
    if paired is main:
        paired = best
    t, t_ref = best.median, ref.median
    bw = model_bytes(name, main.opt, param_bytes) / t
    ref_bw = model_bytes("adamw", ref.opt, param_bytes) / t_ref
    copy_bw = copy_bytes / copy.median
    row = {"params": set_name, "optimizer": name, "ms": 1e3 * main.median, "group_ms": group and 1e3 * group.median,
           "group_first_s": group_first, "eager_ms": eager and 1e3 * eager.median,
           "foreach_speedup": eager and eager.median / t, "state_bpp": optim.state_bytes(main.opt) / numel,
           "bw": bw, "copy_frac": bw / copy_bw, "bw_frac": bw / ref_bw, "x_adamw": t / t_ref,
           "theirs_ms": other and 1e3 * other.median, "speedup": other and other.median / paired.median,
           "default_speedup": other and name != "muon" and other.median / main.median,
           "elementwise": name not in MATRIX_OPTIMIZERS, "repeats": len(main.times),
           "plan": plan, "run_ms": t_run and 1e3 * t_run,
           "run_speedup": other and t_run and name != "muon" and other.median / t_run}
    if name == "muon" and other is not None:
        notes.append(f"p_o compared with ours ns_dtype=bfloat16: {1e3 * paired.median:.1f} ms")
    if skip_theirs and args.pytorch_optimizer:
        notes.append("p_o (bf16-only Newton-Schulz) not compared on CPU")
    if name in MATRIX_OPTIMIZERS:
        notes.append("matrix products dominate; BW model n/a")
    if name == "sophia-h":
        notes.append("Hessian steps not timed (k=1e9)")
    if name == "sophia-g":
        notes.append("update_hessian not timed")
    if name == "lookahead":
        notes.append("base adamw; slow weights counted 2/k")
    row["notes"] = "; ".join(notes)
    row["copy_bw"], row["ref_state_bpp"] = copy_bw, optim.state_bytes(ref.opt) / numel
    return row, ref, copy


def format_row(r: dict[str, Any]) -> str:
    bw_cells = [_fmt(r["bw"] / 1e9), _fmt(100 * r["copy_frac"], ".0f"), _fmt(r["bw_frac"])]
    if not r["elementwise"]:
        bw_cells = [f"({c})" for c in bw_cells]
    cells = [r["params"], r["optimizer"], _fmt(r["ms"], ".3f"), _fmt(r.get("group_ms"), ".3f"),
             _fmt(r.get("group_first_s"), ".1f"), _fmt(r["eager_ms"], ".3f"), _fmt(r["foreach_speedup"]),
             _fmt(r["state_bpp"], ".1f"), *bw_cells, _fmt(r["x_adamw"]), _fmt(r["theirs_ms"], ".3f"),
             _fmt(r["speedup"]), _fmt(r.get("default_speedup") or None), r.get("plan") or "–",
             _fmt(r.get("run_ms"), ".3f"), _fmt(r.get("run_speedup") or None), r["notes"]]
    return "| " + " | ".join(cells) + " |"


def main(args) -> int:
    names = optim.registry.names() if not args.optimizers else [n.strip() for n in args.optimizers.split(",")
                                                                     if n.strip()]
    for n in names:
        optim.registry.entry(n)  # unknown name: the registry's error names the valid ones
    for flag, low in (("repeats", 1), ("warmup", 1), ("block_ms", 0), ("row_seconds", 0)):
        if not getattr(args, flag) >= low:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} is out of range; "
                              f"allowed: >= {low}")
    if getattr(args, "amortise_steps", 0) < 0:
        raise ConfigError(f"--amortise-steps={args.amortise_steps} is out of range; allowed: >= 0 (0: no amortised "
                          "columns)")
    device = torch.device(resolve_device(args.device))
    dtype = DTYPES[args.dtype]
    if getattr(args, "cold_cache", False):  # before anything compiles in this process
        import os
        import tempfile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sgdlab-bench-inductor-")
    sets = ["10m", "charlm"] if args.params == "both" else [args.params]
    _, ref_kind = fused_adamw([torch.nn.Parameter(torch.zeros(4, device=device, dtype=dtype))])
    print(f"bench optim: {len(names)} optimizers, params={','.join(sets)}, device={device}, dtype={args.dtype}, "
          f"threads={torch.get_num_threads()}, warmup={args.warmup}, repeats<={args.repeats}, "
          f"block>={args.block_ms:g} ms; reference: torch.optim.AdamW({ref_kind}=True); inductor cache "
          f"{'fresh (cold)' if getattr(args, 'cold_cache', False) else 'as found'}; amortised over "
          f"{getattr(args, 'amortise_steps', 0)} steps")
    rows, footers = [], []
    for set_name in sets:
        torch.manual_seed(args.seed)
        params = PARAM_SETS[set_name](device, dtype)
        numel = sum(p.numel() for p in params)
        nbytes = sum(p.numel() * p.element_size() for p in params)
        print(f"[{set_name}] {numel / 1e6:.2f}M parameters in {len(params)} tensors ({nbytes / 2**20:.1f} MiB)",
              file=sys.stderr)
        ref_times, copy_times, copy_bytes = [], [], 2 * nbytes
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(args.seed)
                _set_grads(params, args.seed)
                row, ref, copy = run_row(name, set_name, params, args, device)
            ref_times += ref.times
            copy_times += copy.times
            rows.append(row)
            print(f"[{set_name} {i + 1}/{len(names)}] {name}: {row['ms']:.3f} ms/step, {row['repeats']} repeats, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            gc.collect()
        t_ref, copy_bw = statistics.median(ref_times), copy_bytes / statistics.median(copy_times)
        ref_bw = 7 * nbytes / t_ref
        footers.append(f"{set_name}: {numel / 1e6:.2f}M parameters in {len(params)} tensors "
                       f"({nbytes / 2**20:.1f} MiB); copy bandwidth {copy_bw / 1e9:.2f} GB/s (median of all rounds; "
                       f"each row's % of copy BW uses the copies timed in its own rounds)")
        rows.append({"params": set_name, "optimizer": f"adamw ({ref_kind}, reference)", "ms": 1e3 * t_ref,
                     "eager_ms": None, "foreach_speedup": None, "state_bpp": row["ref_state_bpp"],
                     "bw": ref_bw, "copy_frac": ref_bw / copy_bw, "bw_frac": 1.0, "x_adamw": 1.0,
                     "theirs_ms": None, "speedup": None, "elementwise": True,
                     "notes": "medians over all rows' rounds"})
        del params
        gc.collect()

    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print(format_row(r))
    print()
    for f in footers:
        print(f)
    print("eff. GB/s model: bytes/step = 3 x parameter bytes (read p, g; write p) + 2 x each state tensor's bytes; "
          "values in parentheses are not meaningful (matrix-product optimizers)")
    ours_rows = [r for r in rows if "reference" not in r["optimizer"]]
    for set_name in sets:
        sp = [r["speedup"] for r in ours_rows if r["params"] == set_name and r["speedup"] is not None]
        dp = [r["default_speedup"] for r in ours_rows if r["params"] == set_name and r.get("default_speedup")]
        if sp:
            default = f"{statistics.median(dp):.2f}x over {len(dp)}" if dp else "–"
            print(f"median speed-up over pytorch_optimizer ({set_name}): {statistics.median(sp):.2f}x over "
                  f"{len(sp)} optimizers (their time / our fastest path; > 1: sgdlab faster); default paths: "
                  f"{default}")
        else:
            print(f"median speed-up over pytorch_optimizer ({set_name}): – (no comparable optimizer timed)")
        rp = [r["run_speedup"] for r in ours_rows if r["params"] == set_name and r.get("run_speedup")]
        if rp:
            med = statistics.median(rp)
            print(f"median amortised default-path speed-up over pytorch_optimizer ({set_name}, "
                  f"{args.amortise_steps}-step runs, compile time counted): {med:.2f}x over {len(rp)} optimizers; "
                  f"target >= 3x {'met' if med >= 3 else 'NOT met'}")
        elem = [r for r in ours_rows if r["params"] == set_name and r["elementwise"]]
        fast = [r["optimizer"] for r in elem if r["bw_frac"] >= 0.8]
        slow = [f"{r['optimizer']} ({r['bw_frac']:.2f})" for r in elem if r["bw_frac"] < 0.8]
        print(f"elementwise optimizers at >= 0.8 of fused AdamW's effective bandwidth ({set_name}): "
              f"{', '.join(fast) or 'none'}; below: {', '.join(slow) or 'none'}")
    sp_all = [r["speedup"] for r in ours_rows if r["speedup"] is not None]
    if sp_all and len(sets) > 1:
        print(f"median speed-up over pytorch_optimizer (all): {statistics.median(sp_all):.2f}x over {len(sp_all)} rows")
    return 0
