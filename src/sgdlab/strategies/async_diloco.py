"""``async-diloco``: asynchronous Local-SGD with Delayed Nesterov and Dynamic Local Updates (SCOPE D5).

Liu, Chhaparia, Douillard, Kale, Rusu, Shen, Szlam & Ranzato, "Asynchronous Local-SGD Training for
Language Modeling", 2024 (arXiv:2401.09135), Algorithms 2–5. No worker waits for another: when worker w
has taken its round's local steps (inner optimizer, default AdamW, whose state stays on the worker) it
sends its pseudo-gradient ``g = θ_start(w) − θ_w`` to a server, which applies it at once and answers with
its current parameters; w starts its next round from them.

Server rule (option ``server``):

* ``dn`` (default), Delayed Nesterov (Algorithm 3). Buffer Δ = 0 and momentum m = 0; for the t-th arrival
  g_t (t = 0, 1, ...)::

      Δ ← Δ + g_t
      if (t + 1) mod N = 0:   m ← β m + Δ/N;   θ ← θ − ε [(1 − cN + c) β m + g_t/N];   Δ ← 0
      else:                                    θ ← θ − ε [c β m + g_t/N]

  Over a window of N arrivals with c = 0 this is one Nesterov step on the window's mean pseudo-gradient,
  so with equal speeds and N = number of workers it is synchronous DiLoCo. Defaults: N = the number of
  workers (``buffer=0``), c = 0 (the paper's ablation: c ∈ {0, 0.1} makes no difference), β = 0.9,
  ε = 0.7 (DiLoCo's outer step; DN divides each g by N, so ε is per window).
* ``nesterov``: plain asynchronous DiLoCo, the paper's negative baseline — a Nesterov step
  (m ← β m + g; θ ← θ − ε (g + β m)) on every arrival, so k near-simultaneous arrivals take an oversized
  step (the paper's Eq. 5). The paper lowers ε for it (its toy: 0.07 against 0.7 synchronously).

Dynamic Local Updates (``dylu``, default on): worker w's rounds are ``⌊H · v_w / max v⌋`` local steps (at
least 1), with v its nominal speed (1 / step time), so the fastest worker takes H = ``sync_every`` steps
and all finish their rounds at about the same time. Off: every round is H steps.

Grace period (``grace`` seconds): once the first push of a batch reaches the server at τ, pushes arriving
until τ + grace join the batch, and every worker of the batch receives the parameters after all of them
(the paper's Algorithm 5); with grace 0 only pushes arriving at the same instant do. Default ``auto``: with
DyLU, the largest amount by which the floor makes a worker's nominal round shorter than the longest round
(0 at equal speeds), so rounds that DyLU meant to end together are answered together; without DyLU, 0.
Measured (BENCHMARKS.md, ``async`` preset): with grace 0 the four slow workers of speeds 2, 2, 4, 4 arrive
0.1 s before the others every round, are answered without the window's momentum step and start each round
one window behind (final loss 2.32 against 1.98 with a 0.2 s grace).

Simulated time (:mod:`.clock`): each worker's clock advances by its step times (``--step-time`` ×
``--worker-speeds``, with ``slow_prob``/``slow_factor`` random slowdowns); a push and the answer are each
one point-to-point message of the fp32 parameters (:meth:`NetworkModel.send`: latency + bytes/bandwidth),
and the worker idles while they travel (and through a grace period). The server's own link and compute are
not modelled (no queueing at the server). ``bytes_sent`` counts both messages of every push, averaged over
the workers. Every worker's LR schedule follows simulated time (runner steps), as the paper's per-shard
schedules follow their shards' progress, which balanced sampling keeps equal; rounds still under way when
the run ends are not pushed. Logged: ``server_updates`` (arrivals so far) and ``staleness`` (mean server
updates between a round's start and its arrival, since the last record).

``--backend torch`` (:mod:`.async_server`): real asynchrony. Rank 0 runs the server in a thread next to its
own worker; every rank pushes by point-to-point messages and waits only for the server's answer. Each
process logs its own worker's losses and clock (the lead's are rank 0's); bytes and simulated time are
combined over the ranks when the run ends, after every rank's last push (so are the steps behind ``samples``;
earlier records count rank 0's steps × the number of workers), and the last record's
``pushes`` (every rank's) equals ``server_updates`` when no update was lost. With ``--step-time`` each
process follows the same event clock as the simulator and sleeps so that each of its steps takes its
step time (emulated heterogeneous hardware); without it every process steps as fast as it can, each for
``--steps`` steps, and every round is H steps. ``order=rank`` makes the server apply one round of every
worker in rank order (deterministic: equal to the simulator with equal speeds; the workers then wait for
each other). Not on torch: ``grace`` > 0, resuming (the ranks checkpoint at different moments).

A worker lost mid-run (killed, its host gone) does not stop the others: the server goes on without it
and says so (:mod:`.async_server`); the summary's bytes, pushes and steps are then the finished ranks' and
the log's ``lost_workers`` counts the lost ones.

Not built here: the paper's shard sampling by remaining tokens (each worker keeps its own shard, as in every
sgdlab strategy), and compressors, aggregators and attacks on the pushes (refused).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed.group import Group
from ..errors import ConfigError, UnknownNameError, check_range
from ..exchange import ExchangeSpec
from .base import GlobalModelMixin, Strategy, Worker
from .clock import EventClock, check_slowdown

SERVERS = ("dn", "nesterov")
ORDERS = ("arrival", "rank")


@dataclass
class AsyncDiLoCoOptions:
    sync_every: int = 50       # H: local steps of a round of the fastest worker
    server: str = field(default="dn", metadata={
        "help": "async-diloco's server rule: dn (Delayed Nesterov) or nesterov (a Nesterov step per arrival)"})
    outer_lr: float = 0.7      # ε
    momentum: float = field(default=0.9, metadata={"help": "async-diloco's outer momentum β"})
    buffer: int = field(default=0, metadata={
        "help": "async-diloco dn: arrivals N per momentum update (0: the number of workers)"})
    c: float = field(default=0.0, metadata={"help": "async-diloco dn: momentum activation, 0 <= c <= 1/N"})
    dylu: bool = field(default=True, metadata={
        "help": "async-diloco: Dynamic Local Updates, rounds of floor(H * v / v_max) steps"})
    grace: float | str = field(default="auto", metadata={
        "help": "async-diloco: seconds the server waits for more pushes before answering a batch, or auto "
                "(DyLU's rounding gap; sim only)"})
    slow_prob: float = field(default=0.0, metadata={"help": "probability that a local step straggles"})
    slow_factor: float = field(default=1.0, metadata={"help": "how many times longer a straggling step takes"})
    order: str = field(default="arrival", metadata={
        "help": "async-diloco on torch: arrival, or rank (one round of every worker in rank order)"})

    def validate(self) -> None:
        check_range("sync_every", self.sync_every, low=1, integer=True)
        if self.server not in SERVERS:
            raise UnknownNameError("server", self.server, SERVERS)
        check_range("outer_lr", self.outer_lr, low=0)
        check_range("momentum", self.momentum, low=0, high=1, high_open=True)
        check_range("buffer", self.buffer, low=0, integer=True)
        check_range("c", self.c, low=0)
        if self.grace != "auto":
            if isinstance(self.grace, str):
                raise ConfigError(f"grace={self.grace!r}; allowed: auto or a number of seconds >= 0")
            check_range("grace", self.grace, low=0)
        if self.grace == float("inf") or self.outer_lr == float("inf"):
            raise ConfigError(f"grace={self.grace!r}, outer_lr={self.outer_lr!r}; allowed: finite numbers")
        check_slowdown(self.slow_prob, self.slow_factor)
        if self.order not in ORDERS:
            raise UnknownNameError("order", self.order, ORDERS)


def dylu_steps(h: int, step_seconds: list[float], dylu: bool = True) -> list[int]:
    """Local steps per round of each worker: ⌊H · v_w / max v⌋ (at least 1) with v = 1/step time; H without
    DyLU."""
    if not dylu:
        return [h] * len(step_seconds)
    fastest = min(step_seconds)
    return [max(1, int(h * fastest / s + 1e-9)) for s in step_seconds]


@torch.no_grad()
def dn_update(theta: list[torch.Tensor], m: list[torch.Tensor], buf: list[torch.Tensor], g: list[torch.Tensor],
              t: int, n: int, c: float, beta: float, lr: float) -> None:
    """Delayed Nesterov: apply the ``t``-th (0-based) arrival ``g`` to ``theta`` in place (momentum ``m``,
    buffer ``buf``)."""
    torch._foreach_add_(buf, g)
    if (t + 1) % n == 0:
        torch._foreach_mul_(m, beta)
        torch._foreach_add_(m, buf, alpha=1.0 / n)
        torch._foreach_add_(theta, m, alpha=-lr * (1 - c * n + c) * beta)
        torch._foreach_add_(theta, g, alpha=-lr / n)
        torch._foreach_zero_(buf)
    else:
        if c:
            torch._foreach_add_(theta, m, alpha=-lr * c * beta)
        torch._foreach_add_(theta, g, alpha=-lr / n)


@torch.no_grad()
def nesterov_update(theta: list[torch.Tensor], m: list[torch.Tensor], g: list[torch.Tensor], beta: float,
                    lr: float) -> None:
    """One Nesterov step on ``g``: m ← β m + g; θ ← θ − lr (g + β m) (torch.optim.SGD's, dampening 0)."""
    torch._foreach_mul_(m, beta)
    torch._foreach_add_(m, g)
    torch._foreach_add_(theta, g, alpha=-lr)
    torch._foreach_add_(theta, m, alpha=-lr * beta)


class AsyncDiLoCo(GlobalModelMixin, Strategy):
    name = "async-diloco"
    description = ("asynchronous Local-SGD: pushes applied on arrival by Delayed Nesterov, rounds sized by "
                   "speed (Liu et al., 2024)")
    Options = AsyncDiLoCoOptions
    independent_processes = True

    @classmethod
    def check_workers(cls, options: Any, workers: int) -> None:
        n = options.buffer or workers
        if options.server == "dn" and options.c > 1.0 / n + 1e-12:
            raise ConfigError(f"c={options.c!r} with buffer N={n}; allowed: 0 <= c <= 1/N = {1.0 / n:.6g}")

    def __init__(self, options: Any, group: Group, exchange: ExchangeSpec | None = None, seed: int = 0):
        super().__init__(options, group, exchange, seed)
        if self.exchange_spec.canonical() != ExchangeSpec().canonical():
            s = self.exchange_spec
            raise ConfigError("strategy async-diloco pushes exact fp32 pseudo-gradients to its server; compress, "
                              f"aggregate and byzantine are not supported (got compress={s.compress!r}, "
                              f"aggregate={s.aggregate!r}, byzantine={s.byzantine!r})")
        self.check_workers(options, group.world)
        self.seed = seed

    def setup(self, workers: list[Worker]) -> None:
        o, n = self.options, self.group.world
        self.torch = len(workers) != n  # one worker per process
        if self.torch and o.grace != "auto" and o.grace > 0:
            raise ConfigError(f"grace={o.grace!r}: a grace period is simulated only; on --backend torch the server "
                              "answers each push at once (allowed there: grace=0)")
        if not self.torch and o.order != "arrival":
            raise ConfigError(f"order={o.order!r} applies to --backend torch; the simulator's order of arrivals is "
                              "already deterministic (allowed: order=arrival)")
        self.clock = (EventClock(self.name, self.step_seconds, o.slow_prob, o.slow_factor, self.seed)
                      if self.step_seconds is not None or not self.torch else None)
        self.init_global(workers)
        self.n_buffer = o.buffer or n
        self.rounds = dylu_steps(o.sync_every, self.step_seconds or [1.0] * n, o.dylu)
        self.grace = float(o.grace) if o.grace != "auto" else 0.0
        if o.grace == "auto" and o.dylu and not self.torch and self.clock is not None:
            lengths = [r * t for r, t in zip(self.rounds, self.clock.seconds, strict=True)]
            self.grace = max(lengths) - min(lengths)
        self.m = [torch.zeros_like(g) for g in self.global_params]
        self.buf = [torch.zeros_like(g) for g in self.global_params] if o.server == "dn" else []
        self.start = [[g.clone() for g in self.global_params] for _ in workers]  # θ each round began from
        self.t = 0                          # arrivals applied (the server's)
        self.done = [0] * len(workers)      # local steps of the current round, per local worker
        self.k = [0] * len(workers)         # local steps taken
        self.version = [0] * len(workers)   # server updates when the round began
        self.batch: dict[str, Any] | None = None  # open batch: {"close": time, "members": [rank, ...]}
        self.history: list[tuple[float, int]] = []  # (arrival time, rank) of every push
        self._staleness: list[int] = []
        self._active: list[int] | None = []
        self.pushes = 0                     # this process's pushes (torch)
        self.total_pushes: int | None = None
        numel = sum(g.numel() for g in self.global_params)
        self.nbytes = numel * 4  # fp32 parameters, one message
        self.server = None
        self.lock: Any = contextlib.nullcontext()
        if self.torch:
            from .async_server import TorchServer
            self.server = TorchServer(self.group, numel, self._apply_flat, self._snapshot, o.order)  # type: ignore[arg-type]
            self.lock = self.server.lock
            self._t_last = time.perf_counter()
            self._t0 = self._t_last

    # ---- the event clock ----------------------------------------------------------------------------
    def computing(self, step: int) -> list[int] | None:
        ranks = self.group.local
        if self.clock is None:
            self._active = None
            return None
        waiting = set(self.batch["members"]) if self.batch else set()
        self._active = [i for i, r in enumerate(ranks)
                        if r not in waiting and self.clock.fits(self.group.clocks[i], r, self.k[i] + 1, step)]
        return self._active

    def after_step(self, workers: list[Worker], step: int) -> None:
        active = range(len(workers)) if self._active is None else self._active
        pushes = []
        for i in active:
            rank = self.group.local[i]
            self.k[i] += 1
            self.done[i] += 1
            if self.clock is not None:
                self.group.advance(i, self.clock.extra(rank, self.k[i]))
                if self.torch:
                    self._emulate(self.clock.step_time(rank, self.k[i]))
            if self.done[i] == self.rounds[rank]:
                pushes.append(i)
        if self.torch:
            for i in pushes:
                self._push_torch(workers[i], i)
            return
        up = self.group.network.send(self.nbytes)[1]
        for i in sorted(pushes, key=lambda r: (self.group.clocks[r], r)):
            arrival = self.group.clocks[i] + up
            if self.batch is not None and arrival > self.batch["close"] * (1 + 1e-9):  # (clocks: float sums)
                self._answer(workers)
            self._apply(workers[i], i)
            self.history.append((arrival, i))
            if self.batch is None:
                self.batch = {"close": arrival + self.grace, "members": []}
            self.batch["members"].append(i)
        if self.batch is not None and self.batch["close"] <= self.clock.slice_end(step) * (1 + 1e-9):
            self._answer(workers)

    # ---- the server's rule (both backends) -------------------------------------------------------------
    def _server_apply(self, g: list[torch.Tensor], rank: int, version: int) -> None:
        """Apply one arriving pseudo-gradient ``g`` of worker ``rank``, whose round began at server update
        ``version`` (on torch: under the server's lock)."""
        o = self.options
        if o.server == "dn":
            dn_update(self.global_params, self.m, self.buf, g, self.t, self.n_buffer, o.c, o.momentum, o.outer_lr)
        else:
            nesterov_update(self.global_params, self.m, g, o.momentum, o.outer_lr)
        self._staleness.append(self.t - version)
        self.t += 1

    def _apply(self, worker: Worker, i: int) -> None:
        """Simulator: the server applies worker ``i``'s pseudo-gradient at its arrival."""
        g = [s - p.detach() for s, p in zip(self.start[i], worker.params, strict=True)]
        self._server_apply(g, i, self.version[i])
        sent, seconds = self.group.network.send(self.nbytes)
        self.group.bytes_sent += 2 * sent / self.group.world  # the push and the answer
        self.group.comm_time += 2 * seconds

    def _answer(self, workers: list[Worker]) -> None:
        """Simulator: close the open batch; its workers receive the server's parameters and start a round."""
        assert self.batch is not None
        down = self.group.network.send(self.nbytes)[1]
        with torch.no_grad():
            for i in self.batch["members"]:
                torch._foreach_copy_([p.data for p in workers[i].params], self.global_params)
                torch._foreach_copy_(self.start[i], self.global_params)
                self.done[i], self.version[i] = 0, self.t
                self.group.clocks[i] = max(self.group.clocks[i], self.batch["close"] + down)
        self.batch = None

    # ---- torch: real asynchrony ------------------------------------------------------------------------
    def _apply_flat(self, g: torch.Tensor, rank: int, version: int) -> None:
        like = self.global_params
        flat = g.to(like[0].device)
        parts = [t.view_as(p).to(p.dtype) for t, p in zip(flat.split([p.numel() for p in like]), like, strict=True)]
        self._server_apply(parts, rank, version)
        self.history.append((time.perf_counter() - self._t0, rank))

    def _snapshot(self) -> tuple[torch.Tensor, int]:
        return torch.cat([g.detach().reshape(-1) for g in self.global_params]).float().cpu(), self.t

    def _push_torch(self, worker: Worker, i: int) -> None:
        assert self.server is not None
        g = torch.cat([(s - p.detach()).reshape(-1) for s, p in zip(self.start[i], worker.params, strict=True)])
        flat, count = self.server.push(g.float().cpu(), self.version[i])
        params = [p.data for p in worker.params]
        with torch.no_grad():
            for p, t in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.copy_(t.view_as(p))
            torch._foreach_copy_(self.start[i], params)
            if self.group.local[i] != 0:  # rank 0's global parameters are the server's own
                torch._foreach_copy_(self.global_params, params)
        self.done[i], self.version[i] = 0, count
        self.pushes += 1
        sent, seconds = self.group.network.send(self.nbytes)
        self.group.bytes_sent += 2 * sent
        self.group.comm_time += 2 * seconds
        self.group.advance(i, 2 * seconds)

    def worker_steps(self) -> int | None:
        return getattr(self, "_all_steps", None)

    def _emulate(self, seconds: float) -> None:
        """torch with --step-time: make this step last ``seconds`` of real time (emulated slower hardware)."""
        left = seconds - (time.perf_counter() - self._t_last)
        if left > 0:
            time.sleep(left)
        self._t_last = time.perf_counter()

    def finish(self, workers: list[Worker]) -> None:
        """torch: wait for every rank's last push, then combine bytes (mean), pushes (sum) and clocks (max)."""
        if self.server is None:
            return
        mine = [self.group.bytes_sent, float(self.pushes), float(sum(self.k)), self.group.clocks[0]]
        totals = list(self.server.close(mine).values())  # rank 0: every finished rank's; others: their own
        self.group.bytes_sent = sum(t[0] for t in totals) / len(totals)
        self.total_pushes, self._all_steps = int(sum(t[1] for t in totals)), int(sum(t[2] for t in totals))
        self.group.clocks[0] = max(t[3] for t in totals)

    # ---- reporting and checkpoints --------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        with self.lock:
            out: dict[str, float] = {"server_updates": self.t}
            if self._staleness:
                out["staleness"] = sum(self._staleness) / len(self._staleness)
                self._staleness = []
        if self.total_pushes is not None:
            out["pushes"] = self.total_pushes
        if self.server is not None and self.server.lost:
            out["lost_workers"] = len(self.server.lost)
        return out

    def eval_model(self, workers: list[Worker]) -> Any:
        with self.lock:
            return super().eval_model(workers)

    def log_info(self) -> dict[str, Any]:
        return {"async": {"server": self.options.server, "buffer": self.n_buffer, "round_steps": self.rounds,
                          "grace": self.grace,
                          **(self.clock.info() if self.clock is not None else {})}}

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "m": [t.clone() for t in self.m], "buf": [t.clone() for t in self.buf],
                "start": [[t.clone() for t in s] for s in self.start], "t": self.t, "done": list(self.done),
                "k": list(self.k), "version": list(self.version),
                "batch": None if self.batch is None else {"close": self.batch["close"],
                                                          "members": list(self.batch["members"])},
                "history": list(self.history), "staleness": list(self._staleness)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        torch._foreach_copy_(self.m, state["m"])
        if self.buf:
            torch._foreach_copy_(self.buf, state["buf"])
        for mine, saved in zip(self.start, state["start"], strict=True):
            torch._foreach_copy_(mine, saved)
        self.t, self.done, self.k = int(state["t"]), list(state["done"]), list(state["k"])
        self.version = list(state["version"])
        b = state["batch"]
        self.batch = None if b is None else {"close": float(b["close"]), "members": list(b["members"])}
        self.history = [(float(a), int(r)) for a, r in state["history"]]
        self._staleness = list(state["staleness"])
