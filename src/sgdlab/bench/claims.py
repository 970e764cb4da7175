"""Measurements behind BENCHMARKS.md's optimizer claims (issue 16): sharpness and peak memory.

* :func:`top_hessian_eigenvalue` — the dominant eigenvalue of the Hessian of a loss at the current weights, by
  power iteration on Hessian-vector products (Pearlmutter's double backward: ``Hv = d/dw (grad L(w) . v)``
  with ``torch.autograd.grad(..., create_graph=True)``). The loss may be a weighted sum over several fixed
  batches; ``Hv`` is then accumulated batch by batch, so the graph of one batch is alive at a time. Power
  iteration converges to the eigenvalue of largest *magnitude* (at a minimum of a training loss that is the
  top, positive one; the tests check it against ``eigvalsh`` of known Hessians). The estimate is the Rayleigh
  quotient ``v^T H v`` of the last unit iterate, which is never above the true top eigenvalue when the
  spectrum is positive and approaches it at the rate ``(lambda_2 / lambda_1)^k``; the relative change of the
  last iteration is returned so that a caller can tell whether it converged.
* :func:`peak_allocated` — the peak of bytes held by PyTorch's CPU (or CUDA) allocator while a function runs,
  above what was held when it started, read from the PyTorch profiler's allocation records
  (``profile_memory=True``): every allocation and free made while profiling carries the allocator's running
  total (``total_allocated``), and the peak is its maximum less the total just before the call's first
  record. This counts tensor storage exactly (to the byte; tested) and nothing else: Python objects,
  oneDNN/MKL scratch buffers allocated outside c10's allocator, and the code itself are not included. Frees
  of blocks allocated before the call are not recorded (the profiler does not know their size), so a
  function should not free state it did not allocate (e.g. call ``zero_grad(set_to_none=True)`` before, not
  only after, a measured step) — see :func:`training_step_peak`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, check_range

__all__ = ["EigenResult", "PeakMemory", "hessian_vector_product", "load_run_model", "peak_allocated",
           "top_hessian_eigenvalue", "training_batches", "training_step_peak"]


@dataclass(frozen=True)
class EigenResult:
    """Power iteration's estimate of the dominant Hessian eigenvalue."""

    value: float
    """The Rayleigh quotient ``v^T H v`` of the last unit iterate."""
    iterations: int
    rel_change: float
    """``|value_k - value_{k-1}| / |value_k|`` of the last iteration (convergence check)."""
    history: list[float] = field(default_factory=list)


def hessian_vector_product(losses: Sequence[tuple[Callable[[], torch.Tensor], float]], params: list[torch.Tensor],
                           v: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` of ``L = sum_i w_i * loss_i()`` with respect to ``params``, one loss's graph at a time."""
    out = [torch.zeros_like(p) for p in params]
    for loss_fn, weight in losses:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, u) for g, u in zip(grads, v, strict=True) if g is not None]
        if not pairs:
            continue
        dot = sum((g * u).sum() for g, u in pairs)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        for o, h in zip(out, hv, strict=True):
            if h is not None:
                o.add_(h.detach(), alpha=weight)
    return out


def top_hessian_eigenvalue(losses: Sequence[tuple[Callable[[], torch.Tensor], float]], params: Sequence[torch.Tensor],
                           iters: int = 30, seed: int = 0, tol: float = 0.0) -> EigenResult:
    """The dominant eigenvalue of the Hessian of ``sum_i w_i * loss_i()`` at the current ``params``.

    ``losses``: ``(closure, weight)`` pairs, each closure returning a differentiable scalar loss (e.g. the mean
    loss on one fixed batch, weighted by that batch's share of the examples). ``iters`` >= 1 power iterations
    from a Gaussian start drawn with ``seed``; stops early when the relative change falls below ``tol`` (0:
    never). The parameters are not changed.
    """
    check_range("iters", iters, low=1, integer=True)
    check_range("tol", tol, low=0.0)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("top_hessian_eigenvalue needs at least one parameter with requires_grad=True")
    if not losses:
        raise ConfigError("top_hessian_eigenvalue needs at least one (loss, weight) pair; got none")
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    norm = math.sqrt(sum(float((u * u).sum()) for u in v))
    v = [u / norm for u in v]
    history: list[float] = []
    rel = math.inf
    for k in range(iters):
        hv = hessian_vector_product(losses, params, v)
        value = sum(float((h * u).sum()) for h, u in zip(hv, v, strict=True))
        if history:
            rel = abs(value - history[-1]) / max(abs(value), 1e-30)
        history.append(value)
        norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
        if norm == 0.0:
            return EigenResult(0.0, k + 1, 0.0, history)
        v = [h / norm for h in hv]
        if tol and rel < tol:
            break
    return EigenResult(history[-1], len(history), rel, history)


def load_run_model(run_dir: str | Path, device: str = "cpu") -> tuple[Any, nn.Module, Any]:
    """``(task, model, spec)`` of a finished sgdlab run: its task rebuilt from ``config.json`` and the model
    with the final weights of worker 0 from ``checkpoint.pt``."""
    from .. import checkpoint
    from ..config import Config
    from ..runner.build import build_task

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["device"] = device
    spec = Config.from_dict(cfg).spec()
    task = build_task(spec)
    model = task.build_model()
    state = checkpoint.load(run_dir / "checkpoint.pt", map_location=device)
    model.load_state_dict(state["workers"][0]["model"])
    return task, model, spec


def training_batches(task: Any, n_batches: int, batch_size: int, seed: int = 0) -> list[Any]:
    """``n_batches`` disjoint batches of ``batch_size`` training examples of ``task``, from a permutation fixed
    by ``seed`` (the same for every run compared)."""
    check_range("n_batches", n_batches, low=1, integer=True)
    check_range("batch_size", batch_size, low=1, integer=True)
    n = task.num_train
    if n_batches * batch_size > n:
        raise ConfigError(f"n_batches * batch_size = {n_batches * batch_size} is more than the {n} training "
                          f"examples; allowed: at most {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [task.get_batch(perm[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]


@dataclass(frozen=True)
class PeakMemory:
    peak_bytes: int
    """The most bytes the allocator held during the call, above what it held at the start."""
    end_bytes: int
    """Bytes allocated during the call and still held at its end."""
    allocations: int


def _allocation_events(prof: Any, device: str) -> list[tuple[int, int, int]]:
    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    out = []
    for node in walk(prof.profiler.kineto_results.experimental_event_tree()):
        ef = node.extra_fields
        if type(ef).__name__.endswith("Allocation") and torch.device(ef.device).type == device:
            out.append((node.start_time_ns, int(ef.alloc_size), int(ef.total_allocated)))
    out.sort()
    return out


def peak_allocated(fn: Callable[[], Any], device: str = "cpu") -> tuple[PeakMemory, Any]:
    """``(PeakMemory, fn())``: the peak of ``device``'s allocator (``"cpu"`` or ``"cuda"``) while ``fn`` runs,
    from the profiler's allocation records (see the module docstring for what is and is not counted)."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}; allowed: cpu, cuda")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        result = fn()
    events = _allocation_events(prof, device)
    if not events:
        return PeakMemory(0, 0, 0), result
    # the reporter's running total spans profiling sessions (blocks allocated in an earlier one and freed
    # while none ran stay in it), so the baseline is the total just before this call's first record
    _, size0, total0 = events[0]
    base = total0 - size0
    totals = [t - base for _, _, t in events]
    return PeakMemory(max(0, max(totals)), totals[-1], len(events)), result


def training_step_peak(optimizer: Any, ctx: Any, device: str = "cpu") -> PeakMemory:
    """Peak allocator bytes of one training step as sgdlab's runner takes it (the step protocol's forward and
    backward, ``step``, ``zero_grad(set_to_none=True)``), above the resting state (weights and optimizer state).

    Gradients are cleared before the measurement, so the step's gradients count towards its peak. Take a
    step or two first so that lazily created optimizer state is part of the resting state.
    """
    from ..optim import protocol

    need = protocol.needs(optimizer)
    optimizer.zero_grad(set_to_none=True)

    def one_step():
        protocol.forward_backward(optimizer, ctx, need)
        protocol.step(optimizer, ctx, need)
        optimizer.zero_grad(set_to_none=True)

    peak, _ = peak_allocated(one_step, device)
    return peak
