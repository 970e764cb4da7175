"""Schedule refinement: a learning-rate schedule computed from a previous run's gradient norms.

Reference: Aaron Defazio, Ashok Cutkosky, Harsh Mehta, Konstantin Mishchenko, "When, Why and How Much?
Adaptive Learning Rate Scheduling by Refinement", arXiv:2310.07831 (2023).

Linear decay ``lr_t = lr (1 - t / T)`` is the paper's default (worst-case optimal for the last iterate of
SGD-like methods). Refinement takes the gradient norms ``n_t`` of a previous run of the same problem
(t = 0 .. T-1) and sets, for the l2 case (SGD-like methods; the paper's closed form, its Theorem 8)::

    w_t     = n_t^-2                         (l1 case, coordinate-wise methods such as Adam: n_t^-1 with l1 norms)
    s_t     = w_t * sum_{p > t} w_p,  s_{T-1} = 0
    factor_t = s_t / max_t s_t              (so the peak learning rate stays lr)

after smoothing ``n`` with a median filter of width ``2 floor(tau T / 2) + 1`` (tau = 0.1), the end of the
sequence reflect-padded by twice the width first (then dropped) and its start held at the first value, as
the authors' ``visual.py`` (``sigma2 = 0.1``, ``scipy.ndimage.median_filter`` with ``mode="nearest"``).
Constant norms give linear decay exactly, ``(T - 1 - t) / (T - 1)``; scaling every norm by c changes nothing.
The refined schedule typically shows a warm-up and a sharper anneal at the end.

In sgdlab: ``--schedule refined --set refine_from=runs/x`` reads ``runs/x/metrics.jsonl``, whose records carry
``grad_norm`` (the l2 norm of the gradient the optimizer was given, averaged over the steps since the
previous record; the runner logs it). The records are expanded to one value per step (each record's value
for the steps it covers) and resampled linearly to the new run's decay length (``steps - warmup_steps``) when
the lengths differ. Only the l2 version is offered (the runner logs l2 norms).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError

__all__ = ["grad_norms_of", "refined_factors", "refined_schedule"]


def refined_schedule(norms: Sequence[float], tau: float = 0.1, power: float = 2.0) -> list[float]:
    """The refined schedule (factors in [0, 1], the last 0) of a per-step gradient-norm sequence.

    ``power`` 2 is the l2 version, 1 the l1 version (for l1 norms); ``tau`` the median filter's relative width
    (0: no smoothing).
    """
    g = np.asarray(norms, dtype=np.float64)
    if g.ndim != 1 or len(g) < 2:
        raise ConfigError(f"schedule refinement needs at least 2 gradient norms, got {len(g)}")
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ConfigError("schedule refinement needs finite, positive gradient norms")
    width = 2 * (int(tau * len(g)) // 2) + 1
    if width > 1:
        from scipy.ndimage import median_filter  # scipy comes with scikit-learn

        pad = 2 * width
        g = median_filter(np.pad(g, (0, pad), mode="reflect"), size=width, mode="nearest")[:-pad]
    w = g ** -power
    tail = np.cumsum(w[::-1])[::-1]  # tail[t] = sum_{p >= t} w_p
    sched = np.zeros_like(w)
    sched[:-1] = w[:-1] * tail[1:]
    return (sched / sched.max()).tolist()


def grad_norms_of(run_dir: str | Path) -> list[float]:
    """One gradient norm per step of the run in ``run_dir`` (from the ``grad_norm`` of its metrics.jsonl)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"refine_from={str(run_dir)!r}: {path} does not exist (refine from a finished run's "
                          "directory)")
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "grad_norm" in rec and "step" in rec:
                records.append((int(rec["step"]), float(rec["grad_norm"])))
    if len(records) < 2:
        raise ConfigError(f"refine_from={str(run_dir)!r}: {path} has {len(records)} records with grad_norm; "
                          "it needs at least 2 (a run of this version of sgdlab logs them)")
    records.sort()
    out: list[float] = []
    last = 0
    for step, value in records:  # each record stands for the steps since the previous one
        out.extend([value] * max(0, step - last))
        last = max(last, step)
    return out


@functools.lru_cache(maxsize=8)
def refined_factors(run_dir: str, length: int, tau: float = 0.1) -> tuple[float, ...]:
    """The refined schedule of the run in ``run_dir`` for a decay of ``length`` steps (resampled linearly)."""
    norms = np.asarray(grad_norms_of(run_dir), dtype=np.float64)
    if length < 2:
        return (1.0,) * length
    if len(norms) != length:
        norms = np.interp(np.linspace(0.0, 1.0, length), np.linspace(0.0, 1.0, len(norms)), norms)
    return tuple(refined_schedule(norms, tau))
