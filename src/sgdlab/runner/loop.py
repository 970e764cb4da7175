"""The training loop of one process.

The hot loop does no host synchronisation except at logging steps (losses are kept as tensors and read
in one batch) and checks that losses are finite at those points. It names no optimizer and no backend:
each step goes through the step protocol (:mod:`sgdlab.optim.protocol`), and what differs between
backends (stop agreement, barriers, which checkpoint to resume) is asked of the
:class:`~sgdlab.distributed.group.Group`.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import __version__, checkpoint
from ..config import RunSpec
from ..distributed.group import Group
from ..errors import CheckpointError, ConfigError, DivergenceError
from ..exchange.pipeline import NonFiniteError
from ..metrics import MetricsLog
from ..optim import protocol
from .build import Parts
from .rundir import load_agreed_checkpoint, write_summary


@dataclass
class State:
    step: int = 0
    worker_steps: int = 0  # steps taken, summed over all workers (step × workers unless some skip steps)
    wall_time: float = 0.0
    eval_time: float = 0.0
    pause: float = 0.0
    train_loss: float | None = None
    best_val_loss: float | None = None
    best_metric: float | None = None
    last_eval: dict[str, float] | None = None
    carry: list[float] = field(default_factory=list)  # losses not yet in a metrics record
    carry_grad_norms: list[float] = field(default_factory=list)  # likewise, the gradient norms
    saved_step: int | None = None  # step of the checkpoint on disk

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "worker_steps", "wall_time", "eval_time", "train_loss",
                                              "best_val_loss", "best_metric", "last_eval", "carry", "carry_grad_norms")}

    def load(self, d: dict[str, Any], workers: int) -> None:
        for k, v in d.items():
            setattr(self, k, v)
        if "worker_steps" not in d:  # checkpoints before strategies could skip steps
            self.worker_steps = self.step * workers
        self.saved_step = self.step


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop at the next step boundary."""

    def __init__(self, enabled: bool):
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class TrainingLoop:
    """Trains ``parts`` as ``spec`` says, logging into ``spec.out`` and checkpointing to ``ckpt_path``."""

    def __init__(self, spec: RunSpec, group: Group, parts: Parts, ckpt_path: Path, progress: bool | None):
        self.spec, self.group, self.parts, self.ckpt_path = spec, group, parts, ckpt_path
        self.task, self.replicas, self.strategy, self.dp = parts.task, parts.replicas, parts.strategy, parts.dp
        self.workers = parts.workers
        self.lead = group.is_lead  # the lead writes config, metrics and summary
        self.progress = progress if self.lead else False
        self.log = MetricsLog(Path(spec.out or ".") / "metrics.jsonl")
        self.st = State()
        self.tokens_per_sample = self.task.tokens_per_example if self.task.unit == "tokens" else None
        self.sync_timing = torch.device(spec.device).type == "cuda" and spec.step_time is None
        self._t_start = self._t_train = 0.0
        # reported train loss: the honest workers' mean (the Byzantine ones are the strategy's last ranks)
        byzantine = getattr(getattr(parts.strategy, "exchange", None), "byzantine", set())
        self.honest = [i for i, r in enumerate(self.replicas) if r.worker.rank not in byzantine]
        self.batch_per_worker = parts.samples_per_step // spec.workers
        self._info: dict[str, Any] = {}  # the strategy's log_info, for the first record of a fresh run
        # per step since the last record (for --schedule refined): the stepping workers' gradient norms, summed
        self._grad_norms: list[torch.Tensor] = []
        self._norm_counts: list[float] = []  # how many workers stepped

    # ---- resume, checkpoint, summary --------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint that every process has (models, optimizers, RNG, loop state)."""
        ck = load_agreed_checkpoint(self.group, self.ckpt_path, self.spec.device)
        try:
            for r, wst in zip(self.replicas, ck["workers"], strict=True):
                r.load_state_dict(wst)
            self.strategy.load_state_dict(ck["strategy"])
            self.group.load_state_dict(ck["group"])
            if self.dp is not None:
                self.dp.load_state_dict(ck["dp"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.ckpt_path} does not match this run "
                                  f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        checkpoint.set_rng_state(ck["rng"])
        self.st.load(ck["trainer"], self.spec.workers)
        if self.st.step > self.spec.steps:
            raise ConfigError(f"cannot resume with steps={self.spec.steps}: the run in {self.spec.out} is already at "
                              f"step {self.st.step} (a run is not shortened); allowed: steps >= {self.st.step}")
        if self.lead:
            self.log.truncate_after(self.st.step)

    def save_checkpoint(self) -> None:
        st = self.st
        for r in self.replicas:
            bad = [n for n, p in r.worker.model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise DivergenceError(st.step, float("nan"), self._last_good(),
                                      what=f"parameter {bad[0]} of worker {r.worker.rank}")
        if self.lead:
            self.log.flush()
        checkpoint.save({
            "step": st.step, "workers": [r.state_dict() for r in self.replicas],
            "strategy": self.strategy.state_dict(), "group": self.group.state_dict(), "rng": checkpoint.rng_state(),
            "trainer": st.state_dict(), "dp": self.dp.state_dict() if self.dp is not None else None,
            "sgdlab_version": __version__,
        }, self.ckpt_path, keep_previous=self.group.keeps_previous_checkpoint)
        st.saved_step = st.step

    def _last_good(self) -> str | None:
        return str(self.ckpt_path) if self.st.saved_step is not None else None

    def finish(self, status: str) -> dict[str, Any]:
        """Write the summary (the lead; others return {}). Every process calls it: sim_time is a collective."""
        sim_time = self.group.sim_time()
        if not self.lead:
            return {}
        return write_summary(Path(self.spec.out or "."), self.spec, self.task, self.workers, self.group, sim_time,
                             self.st, status, self.dp)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None, handle_signals: bool = False) -> str:
        """Train to ``spec.steps`` (or ``stop_at``); returns the status, "completed" or "stopped"."""
        if stop_at is not None and stop_at <= self.st.step < self.spec.steps:
            raise ConfigError(f"stop_at={stop_at} but the run is already at step {self.st.step}; allowed: "
                              f"{self.st.step} < stop_at")
        if self.lead and self.spec.tensorboard:
            self.log.open_tensorboard(Path(self.spec.out or "."), purge_step=self.st.step + 1 if self.st.step else None)
        self.bar = _progress_bar(self.progress, self.spec, self.st.step)
        try:
            with StopFlag(handle_signals) as stop:
                return self._train(stop, stop_at)
        except DivergenceError:
            if self.lead:
                self.log.flush()
            self.finish("diverged")
            raise
        finally:
            self.bar.close()
            if self.lead:
                self.log.close()

    def _train(self, stop: StopFlag, stop_at: int | None) -> str:
        spec, st = self.spec, self.st
        self._info = self.strategy.log_info() if st.step == 0 else {}
        if st.step == 0 and spec.eval_every > 0:
            r = self._record(0)
            self._evaluate(r)
            r.update(bytes_sent=0.0, sim_time_s=0.0)
            if self.lead:  # the lead writes the records (the others would only buffer them)
                self.log.append(r)
        for w in self.workers:
            w.model.train()
        self._t_start, self._t_train = time.perf_counter(), st.wall_time
        for step in range(st.step + 1, spec.steps + 1):
            is_eval = step == spec.steps or (spec.eval_every > 0 and step % spec.eval_every == 0)
            is_ckpt = spec.checkpoint_every > 0 and step % spec.checkpoint_every == 0
            is_log = is_eval or is_ckpt or step % spec.log_every == 0
            stop_now = step == stop_at or self.group.stops_at_once(stop.requested)
            try:
                lr_used = self._step(step)
            except NonFiniteError as e:  # stopped before the aggregate reached a model
                st.step = step
                raise DivergenceError(step, e.value, self._last_good(), what=e.what, hint=e.hint) from None
            st.step = step
            if step == spec.steps:
                self.strategy.finish(self.workers)
                st.worker_steps = self.strategy.worker_steps() or st.worker_steps
            self.bar.update(1)
            if is_log or stop_now:
                stop_now = self._at_log(step, lr_used, is_log, is_eval, is_ckpt, stop_now, stop)
            if stop_now:
                return "stopped"
        if st.saved_step != st.step:
            self.save_checkpoint()
        return "completed"

    def _step(self, step: int) -> float:
        """One training step of every local worker; returns the learning rate it used."""
        task, group, workers, dp_sgd = self.task, self.group, self.workers, self.parts.dp_sgd
        half, speeds = self.spec.step_time / 2 if self.spec.step_time else None, self.spec.worker_speeds
        active = self.strategy.computing(step)
        replicas = self.replicas if active is None else [self.replicas[i] for i in active]
        self.st.worker_steps += len(replicas) * group.world // len(self.replicas)
        for i, r in enumerate(self.replicas):
            if active is not None and i not in active:
                r.pending.append(None)
                continue
            t0 = time.perf_counter()
            model, opt = r.worker.model, r.worker.optimizer
            ids = r.sampler.next() if r.sampler is not None else None
            batch = task.get_batch(ids)
            if r.poison is not None:  # a Byzantine worker's data attack
                batch = r.poison(batch)
            r.ctx = ctx = protocol.StepContext(loss=partial(task.loss, model, batch),
                                               sampled_loss=partial(task.sampled_loss, model, batch),
                                               model=model, example_ids=ids)
            if dp_sgd is not None:  # per-example clipping + noise → p.grad
                r.pending.append(dp_sgd.backward(batch).detach())
            else:
                r.pending.append(protocol.forward_backward(opt, ctx, r.need))
            group.advance(i, (half if half is not None else self._elapsed(t0)) * speeds[r.worker.rank])
        self.strategy.after_backward(workers, step)
        if replicas:
            self._grad_norms.append(torch.stack([_grad_norm(r.worker.model) for r in replicas]).sum())
        else:
            self._grad_norms.append(torch.zeros((), device=self.spec.device))
        self._norm_counts.append(float(len(replicas)))
        lr_used = (replicas or self.replicas)[0].worker.optimizer.param_groups[0]["lr"]
        clip = self.spec.grad_clip
        for i, r in enumerate(self.replicas):
            if active is not None and i not in active:
                with warnings.catch_warnings():  # before the worker's first step: torch warns, harmlessly
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    r.scheduler.step()  # the LR schedule follows the runner's steps (simulated time)
                continue
            t0 = time.perf_counter()
            model, opt = r.worker.model, r.worker.optimizer
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
            protocol.step(opt, r.ctx, r.need)
            r.scheduler.step()
            opt.zero_grad(set_to_none=True)
            r.ctx = None
            group.advance(i, (half if half is not None else self._elapsed(t0)) * speeds[r.worker.rank])
        self.strategy.after_step(workers, step)
        return lr_used

    def _elapsed(self, t0: float) -> float:
        if self.sync_timing:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _at_log(self, step: int, lr_used: float, is_log: bool, is_eval: bool, is_ckpt: bool, stop_now: bool,
                stop: StopFlag) -> bool:
        """Read the pending losses (the one host sync), agree on a stop, log, evaluate, checkpoint.
        Returns whether the run stops here."""
        st, group = self.st, self.group
        sums, counts = _loss_sums([self.replicas[i].pending for i in self.honest], len(self.replicas[0].pending))
        for r in self.replicas:
            r.pending.clear()
        vote = group.stop_vote(stop.requested) if is_log else 0.0
        norm_sums = torch.stack(self._grad_norms).double().tolist() if self._grad_norms else []
        norm_counts, self._grad_norms, self._norm_counts = self._norm_counts, [], []
        k, m = len(sums), len(norm_sums)
        # one collective for all: per step, the honest workers' loss sums and counts and every stepping worker's
        # gradient-norm sums and counts; the stop vote
        reduced = group.mean_vector([*sums, *counts, *norm_sums, *norm_counts, vote])
        stop_now = stop_now or reduced[-1] > 0
        pairs = zip(reduced[:k], reduced[k:2 * k], strict=True)
        chunk = [(step - k + 1 + j, s / c) for j, (s, c) in enumerate(pairs) if c > 0]
        bad = [(j, v) for j, v in chunk if not math.isfinite(v)]
        if bad:
            st.step = bad[0][0]
            raise DivergenceError(st.step, bad[0][1], self._last_good())
        losses = st.carry + [v for _, v in chunk]  # steps where no honest worker computed have no loss
        norms = zip(reduced[2 * k:2 * k + m], reduced[2 * k + m:2 * k + 2 * m], strict=True)
        grad_norms = st.carry_grad_norms + [s / c for s, c in norms if c > 0]
        st.wall_time = self._t_train + (time.perf_counter() - self._t_start) - st.pause
        t_pause = time.perf_counter()
        if is_log:  # the record's train_loss is the mean since the previous record
            st.carry = []
            if losses:  # else (no worker computed since the last record) the previous value stands
                st.train_loss = sum(losses) / len(losses)
            rec = self._record(step)
            if st.train_loss is not None:  # None: no worker has taken a step yet (an event-clock strategy)
                rec["train_loss"] = st.train_loss
            rec.update(lr=lr_used, wall_time_s=st.wall_time,
                       bytes_sent=group.bytes_sent, sim_time_s=group.sim_time())
            st.carry_grad_norms = []
            if grad_norms:  # l2 norm of the gradient the optimizer got (workers' mean), mean since the last record
                rec["grad_norm"] = sum(grad_norms) / len(grad_norms)
            rec.update(self.strategy.metrics())  # e.g. sync_period under sync_rule=qsr
            if is_eval:
                self._evaluate(rec)
            if self.lead:
                self.log.append(rec)
            self.bar.set_postfix(_postfix(rec, self.task.metric), refresh=False)
        else:  # stopping between records: carry the losses over in the checkpoint
            st.carry = losses
            st.carry_grad_norms = grad_norms
        if is_ckpt or stop_now:
            self.save_checkpoint()
        st.pause += time.perf_counter() - t_pause
        return stop_now

    def _evaluate(self, record: dict[str, Any]) -> None:
        st, task = self.st, self.task
        t = time.perf_counter()
        model = self.strategy.eval_model(self.workers)
        metrics = task.evaluate(model)
        metrics = {**metrics, **self._averaged_metrics(model, metrics)}
        metrics = {**metrics, **self.strategy.eval_info(self.workers)}
        if self.dp is not None:
            metrics = {**metrics, "epsilon": self.dp.epsilon(record["step"])}
        st.eval_time += time.perf_counter() - t
        record.update(metrics)
        st.last_eval = metrics
        if st.best_val_loss is None or metrics["val_loss"] < st.best_val_loss:
            st.best_val_loss = metrics["val_loss"]
        m = metrics[task.metric]
        if st.best_metric is None or (m > st.best_metric if task.metric_higher_is_better else m < st.best_metric):
            st.best_metric = m

    def _averaged_metrics(self, model: torch.nn.Module, metrics: dict[str, float]) -> dict[str, float]:
        """Step protocol: every local optimizer sees the evaluation of the current weights (SWAD's valley); where
        worker 0's optimizer averages weights (SWA, SWAD) and the strategy evaluates worker 0's own model, the run
        is the average: its metrics replace the iterate's, which stay as ``iterate_val_loss`` (a strategy with a
        global model, localsgd or diloco, is represented by that model, not by a worker's local average).
        BatchNorm statistics are recomputed for the average over worker 0's shard (at most 500 batches)."""
        for w in self.workers:
            protocol.after_evaluate(w.optimizer, metrics)
        r0 = self.replicas[0]
        if model is not r0.worker.model:
            return {}
        bn_batches = None
        pool, bs = getattr(r0.sampler, "pool", None), getattr(r0.sampler, "batch_size", None)
        if pool is not None and bs:  # an epoch sampler's shard (not DP-SGD's Poisson sampler)
            bn_batches = lambda: (self.task.get_batch(i) for i in pool[:500 * bs].split(bs))  # noqa: E731
        with protocol.averaged_weights(r0.worker.optimizer, r0.worker.model, model, bn_batches) as averaged:
            if not averaged:
                return {}
            return {**self.task.evaluate(model), "iterate_val_loss": metrics["val_loss"]}

    def _record(self, step: int) -> dict[str, Any]:
        samples = self.st.worker_steps * self.batch_per_worker
        r: dict[str, Any] = {"step": step, "samples": samples, **self._info}
        self._info = {}
        if self.tokens_per_sample:
            r["tokens"] = samples * self.tokens_per_sample
        return r


def _loss_sums(pending: list[list[torch.Tensor | None]], steps: int) -> tuple[list[float], list[float]]:
    """Per step of the last ``steps``, the sum of the workers' losses and how many workers took the step
    (``pending[i][j]``: worker i's loss at step j, None where it took none); one host sync."""
    taken = [x for p in pending for x in p if x is not None]
    if not taken:
        return [0.0] * steps, [0.0] * steps
    values = torch.stack(taken).double().tolist()
    sums, counts, k = [0.0] * steps, [0.0] * steps, 0
    for p in pending:
        for j, x in enumerate(p):
            if x is not None:
                sums[j] += values[k]
                counts[j] += 1.0
                k += 1
    return sums, counts


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The l2 norm of the model's gradient (0 without one)."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:  # forward-only optimizers
        return torch.zeros((), device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _postfix(r: dict[str, Any], metric: str) -> dict[str, str]:
    p = {"loss": f"{r['train_loss']:.4f}"} if "train_loss" in r else {}
    if "val_loss" in r:
        p["val"] = f"{r['val_loss']:.4f}"
        if metric != "val_loss" and metric in r:
            p[metric.removeprefix("val_")] = f"{r[metric]:.4g}"
    return p


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def close(self) -> None: ...


def _progress_bar(progress: bool | None, spec: RunSpec, start: int):
    if progress is False:
        return _NoBar()
    from tqdm.auto import tqdm

    # progress=None: show it only on a terminal
    return tqdm(total=spec.steps, initial=start, desc=spec.name, unit="step", dynamic_ncols=True,
                disable=None if progress is None else False, leave=True, mininterval=0.5)
