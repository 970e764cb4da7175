"""``desloc``: desynchronised sync periods for the parameters and each optimizer state (SCOPE D7).

Iacob et al., "DES-LOC: Desynced Low Communication Adaptive Optimizers for Training Foundation Models",
2025 (arXiv:2505.22549), Algorithm 2. Every worker m runs its inner optimizer (Adam: first moment u,
second moment v) on its own data; parameters and moments are averaged over workers on their own periods:

    x^m ← mean_m(x)     after steps t ≡ 0 (mod K_x)      (``sync_every``)
    u^m ← mean_m(u)     after steps t ≡ 0 (mod K_u)      (``sync_u``; default 3·K_x, the paper)
    v^m ← mean_m(v)     after steps t ≡ 0 (mod K_v)      (``sync_v``; default 6·K_x, the paper)

Bytes per step ∝ 1/K_x + 1/K_u + 1/K_v: the paper's K_x = 256, K_u = 768, K_v = 1536 costs 1/170 of DDP and
half of Local Adam (K = 256 for all three). A period ``inf`` never syncs that state (K_u = K_v = ∞: Local
SGD/FedAvg with persistent local states, i.e. ``localsgd``).

Which state is which, by the inner optimizer's state names: ``exp_avg`` and ``momentum_buffer`` (SGD
momentum) and ``exp_avg_<k>`` (the extra first moments of :class:`sgdlab.optim.mtdao.MTAdamW`, MT-DAO) take
K_u; ``exp_avg_sq`` and ``max_exp_avg_sq`` take K_v; ``state_sync`` sets a period per state name
(``--set 'state_sync={exp_avg_2=96}'``), also for states kept local otherwise (any other name). ``step`` is
never averaged: bias correction uses each worker's own count, as in the paper.

Differences from the paper's pseudocode: states are averaged *after* the optimizer step, as in the authors'
torchtitan port (``torchtitan/experiments/fl/desloc.py``, a post-step hook), not before the local update
(the paper writes v ← β₂·mean(v_{t−1}) + (1−β₂)·g², x ← mean(x) − d). The post-step order makes K_x = K_u = K_v
= H exactly Local Adam with state averaging, and K_x = 1 with SGD momentum exactly mini-batch SGD-M. No
per-coordinate gradient clipping (the theory's ρ; use ``--grad-clip`` for norm clipping, which the paper's
experiments use); the optional Nesterov outer step (appendix C.1) and random sync at probability 1/K are
not implemented. Parameters go through the exchange as updates θ − θ_i (the ``localsgd`` round, stream
``delta``), states as their values (streams ``state.exp_avg``, ``state.exp_avg_sq``, ...): every
compressor and aggregator applies, and every byte is counted. A lossy compressor may make an averaged
second moment negative: it is clamped at 0. One that zeroes small values (``topk``, ``int8`` blocks) sets
v to 0 where u is not, and the next steps η·û/ε diverge (seen on ``digits``); ``bf16`` trains. Client-level
DP is not supported (states are not updates).

Pitfall (measured on ``digits``): averaging u at a step where v is not averaged (K_u not a multiple of K_v,
as in the paper's defaults) can make a worker's step η·û/(√v̂ + ε) huge on coordinates where that worker's
own v is about 0 but the averaged u is not (features absent from its batches so far): the parameters grow
by orders of magnitude within a few steps. A larger ``eps`` (1e-3 there) or K_u a multiple of K_v avoids it.

Buffers (``buffers``, default ``"average"``) are synchronised with the parameters, as in ``localsgd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, check_range
from .base import GlobalModelMixin, Strategy, Worker, check_buffers, check_precision
from .localsgd import average_parameters

#: State names averaged with K_u / K_v (first / second moments); other states stay local unless named in
#: ``state_sync``.
FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def check_period(name: str, value: Any) -> None:
    """A sync period: an integer >= 1, or inf (never)."""
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return
    if isinstance(value, float) or isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r}; allowed: an integer >= 1 (steps between syncs) or inf (never)")
    check_range(name, value, low=1, integer=True)


def moment_kind(state_name: str) -> str | None:
    """``"u"`` for a first moment, ``"v"`` for a second moment, None for any other optimizer state."""
    if state_name in SECOND_MOMENTS:
        return "v"
    if state_name in FIRST_MOMENTS or (state_name.startswith("exp_avg_") and state_name[8:].isdigit()):
        return "u"
    return None


@dataclass
class DESLOCOptions:
    sync_every: int = 50                  # K_x: steps between parameter averages (the paper: 16 to 256)
    sync_u: int | float | None = None     # K_u: first moments (None: 3·K_x; inf: never)
    sync_v: int | float | None = None     # K_v: second moments (None: 6·K_x; inf: never)
    state_sync: dict | None = None        # {state name: period}, overrides K_u / K_v per state
    precision: str = "fp32"               # precision of the exchange (parameters and states)
    buffers: str = "average"              # average | broadcast | local: floating buffers with the parameters

    def validate(self) -> None:
        check_range("sync_every", self.sync_every, low=1, integer=True)
        for name in ("sync_u", "sync_v"):
            if getattr(self, name) is not None:
                check_period(name, getattr(self, name))
        for key, value in (self.state_sync or {}).items():
            if key == "step":
                raise ConfigError("state_sync: 'step' is a step counter, not a moment; it is never averaged")
            check_period(f"state_sync.{key}", value)
        check_precision(self.precision)
        check_buffers(self.buffers)

    @property
    def k_u(self) -> float:
        return 3 * self.sync_every if self.sync_u is None else self.sync_u

    @property
    def k_v(self) -> float:
        return 6 * self.sync_every if self.sync_v is None else self.sync_v

    def period(self, state_name: str) -> float | None:
        """The sync period of optimizer state ``state_name`` (None: kept local)."""
        if self.state_sync and state_name in self.state_sync:
            return self.state_sync[state_name]
        kind = moment_kind(state_name)
        return self.k_u if kind == "u" else self.k_v if kind == "v" else None


class DESLOC(GlobalModelMixin, Strategy):
    name = "desloc"
    description = ("DES-LOC: parameters and each Adam moment averaged on their own periods K_x, K_u, K_v "
                   "(Iacob et al., 2025)")
    Options = DESLOCOptions

    def setup(self, workers: list[Worker]) -> None:
        self.init_global(workers)
        self.state_periods: dict[str, int] | None = None  # known after the first optimizer step

    def _resolve(self, workers: list[Worker]) -> dict[str, int]:
        """The optimizer states that are synchronised, by name (sorted), with their periods."""
        opt, params = workers[0].optimizer, workers[0].params
        names: set[str] = set()
        for p in params:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and torch.is_floating_point(value):
                    names.add(key)
        unknown = sorted(set(self.options.state_sync or {}) - names)
        if unknown:
            raise ConfigError(f"state_sync: optimizer {type(opt).__name__} has no state {unknown[0]!r}; its states: "
                              f"{', '.join(sorted(names)) or '(none)'}")
        periods = {n: self.options.period(n) for n in sorted(names)}
        return {n: k for n, k in periods.items() if k is not None and math.isfinite(k)}

    def after_step(self, workers: list[Worker], step: int) -> None:
        if step % self.options.sync_every == 0:
            average_parameters(self, workers, step)
        if self.state_periods is None:
            self.state_periods = self._resolve(workers)
        for name, period in self.state_periods.items():
            if step % period == 0:
                self.average_state(workers, name, step)

    def average_state(self, workers: list[Worker], name: str, step: int) -> None:
        """Every local worker's optimizer state ``name`` ← its mean over all workers (stream ``state.NAME``)."""
        idx = [i for i, p in enumerate(workers[0].params) if name in workers[0].optimizer.state.get(p, {})]
        tensors = [[w.optimizer.state[w.params[i]][name] for i in idx] for w in workers]
        with torch.no_grad():
            self.exchange.mean_(tensors, key=f"state.{name}", step=step)
            if moment_kind(name) == "v" and not self.exchange_spec.lossless:
                for ts in tensors:
                    torch._foreach_clamp_min_(ts, 0.0)
