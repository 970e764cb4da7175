"""The training loop behind ``sgdlab run`` and :func:`sgdlab.run`.

One run = one :class:`~sgdlab.config.Config` → a run directory holding ``config.json`` (resolved),
``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt``. A run stopped (``stop_at``, Ctrl-C, SIGTERM)
and resumed ends bit-identical on CPU to the same run done in one go: the checkpoint holds the model,
optimizer, LR schedule, sampler position and RNG states.

The hot loop does no host synchronisation except at logging steps (losses are kept as tensors and read
in one batch) and checks that losses are finite at those points.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import __version__, checkpoint, optim, strategies, tasks
from .config import Config
from .distributed.group import Group, SimGroup, TorchGroup, torchrun_env
from .distributed.network import NetworkModel
from .errors import CheckpointError, ConfigError, DivergenceError
from .metrics import MetricsLog, read_metrics, write_json
from .models import io_parameters
from .privacy import ClientDP, DPOptions, PoissonSampler, PrivateTraining
from .strategies import Worker

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt")
# Settings that may differ between a run and its resumption (they do not change the trajectory,
# except ``steps``, which extends or shortens the run).
RESUMABLE_CHANGES = ("steps", "device", "eval_every", "log_every", "checkpoint_every", "name", "out", "timeout")


@dataclass
class RunResult:
    out: Path
    config: Config
    summary: dict[str, Any]


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1 - p
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def default_out(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.task}-{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_out(out: Path, resume: bool, overwrite: bool, create: bool = True) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory")
    if resume:
        for f in ("config.json", "checkpoint.pt"):
            if not (out / f).is_file():
                raise CheckpointError(f"cannot resume: {out / f} does not exist")
        return
    if overwrite:
        if create:  # only the lead process deletes
            for f in (*RUN_FILES, "report.png", *(p.name for p in out.glob("checkpoint*.pt"))):
                (out / f).unlink(missing_ok=True)
    elif any((out / f).exists() for f in RUN_FILES):
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite "
                          "to replace it, or choose another --out")
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e.strerror}") from None


def check_resume_config(saved: Config, given: Config) -> None:
    a, b = saved.to_dict(), given.to_dict()
    changed = [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"cannot change {k} when resuming (the run used {a[k]!r}, now {b[k]!r}); only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change")


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop at the next step boundary."""

    def __init__(self, enabled: bool):
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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


class Trainer:
    """Runs one configuration. ``task`` may be given to reuse already-loaded data."""

    def __init__(self, config: Config, *, task: tasks.Task | None = None, progress: bool | None = None,
                 handle_signals: bool = False):
        self.cfg = config.resolve()
        self.task = task
        self.progress = progress
        self.handle_signals = handle_signals

    def run(self, *, resume: bool = False, stop_at: int | None = None, overwrite: bool = False) -> RunResult:
        group = self._make_group()
        try:
            result = self._run(group, resume=resume, stop_at=stop_at, overwrite=overwrite)
        except BaseException:
            group.close(clean=False)
            raise
        group.close()
        return result

    def _make_group(self) -> Group:
        cfg = self.cfg
        net = NetworkModel.parse(cfg.network)
        if cfg.backend == "sim":
            return SimGroup(cfg.workers, net)
        env = torchrun_env()
        if env is None:
            raise ConfigError("--backend torch must be started by torchrun, e.g. `torchrun --nproc-per-node "
                              f"{cfg.workers} -m sgdlab run --backend torch --workers {cfg.workers} ...`")
        if env[1] != cfg.workers:
            raise ConfigError(f"workers={cfg.workers} but torchrun started {env[1]} processes; pass "
                              f"--workers {env[1]} (one worker per process)")
        if cfg.device.startswith("cuda") and ":" not in cfg.device:
            cfg.device = f"cuda:{env[2]}"
            torch.cuda.set_device(cfg.device)
        group = TorchGroup(net, torch.device(cfg.device), cfg.timeout)
        group.check_same(hashlib.sha256(json.dumps(
            {k: v for k, v in cfg.to_dict().items() if k != "device"}, sort_keys=True).encode()).hexdigest())
        return group

    def _run(self, group: Group, *, resume: bool, stop_at: int | None, overwrite: bool) -> RunResult:
        cfg = self.cfg
        lead = group.local[0] == 0  # rank 0 writes config, metrics and summary
        out = Path(cfg.out) if cfg.out else default_out(cfg)
        if isinstance(group, TorchGroup) and not cfg.out:
            raise ConfigError("--backend torch needs --out DIR (the same directory on every rank)")
        prepare_out(out, resume, overwrite, create=False)
        if isinstance(group, TorchGroup):
            group.barrier()  # every rank has checked --out before rank 0 writes into it
        if lead:
            prepare_out(out, resume, overwrite, create=True)
        if resume:
            saved = Config.from_dict(_read_json(out / "config.json"), source=f"key in {out / 'config.json'}:")
            check_resume_config(saved, cfg)
        cfg.out = str(out)
        ckpt_path = out / ("checkpoint.pt" if lead else f"checkpoint.rank{group.local[0]}.pt")

        torch.manual_seed(cfg.seed)
        task = self.task or tasks.create(cfg.task, cfg.task_args, cfg.device, cfg.data)
        strategy = strategies.create(cfg.strategy, group, cfg.strategy_args)
        lr = cfg.lr * strategy.lr_multiplier()
        shards = None
        if task.num_train is not None:
            min_size = cfg.batch_size if cfg.data_split.startswith("dirichlet") else 1
            shards = task.shards(cfg.workers, cfg.data_split, cfg.seed, min_size=min_size)
        replicas = []
        for rank in group.local:
            torch.manual_seed(cfg.seed)  # identical initial replicas
            model = task.build_model()
            params: Any = list(model.parameters())
            if cfg.io_adamw:  # embeddings and the first/last layer on the optimizer's AdamW side
                io = {id(p) for p in io_parameters(model)}
                params = [{"params": [p for p in params if id(p) not in io]},
                          {"params": [p for p in params if id(p) in io], "use_adamw": True}]
            opt = optim.create(cfg.optimizer, params, lr=lr, **cfg.optimizer_args)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, cfg))
            sampler = None if shards is None else tasks.EpochSampler(shards[rank], cfg.batch_size,
                                                                     cfg.seed + 7919 * rank)
            replicas.append(_Replica(Worker(rank, model, opt), sched, sampler))
        workers = [r.worker for r in replicas]
        dp: Any = None
        if cfg.dp is not None and DPOptions.parse(cfg.dp).unit == "client":  # clip + noise each round's updates
            dp = ClientDP.from_options(cfg.dp, num_clients=cfg.workers, sync_every=strategy.options.sync_every,
                                       steps=cfg.steps, seed=cfg.seed)
            strategy.enable_client_dp(dp)
        elif cfg.dp is not None:  # DP-SGD: Poisson sampling and private gradients (single worker, see Config)
            opt0 = workers[0].optimizer
            if getattr(opt0, "needs_closure", False) or getattr(opt0, "needs_sampled_loss", False):
                raise ConfigError(f"dp: optimizer {cfg.optimizer!r} evaluates extra non-private losses (Hessian "
                                  "estimates); choose another optimizer for DP-SGD")
            dp = PrivateTraining(cfg.dp, task, workers[0].model, steps=cfg.steps, batch_size=cfg.batch_size,
                                 seed=cfg.seed)
            replicas[0].sampler = dp.sampler
        dp_sgd = dp if isinstance(dp, PrivateTraining) else None
        strategy.setup(workers)
        log = MetricsLog(out / "metrics.jsonl")
        st = _State()
        if resume:
            ck = _load_agreed_checkpoint(group, ckpt_path, cfg.device)
            try:
                for r, wst in zip(replicas, ck["workers"], strict=True):
                    r.load_state_dict(wst)
                strategy.load_state_dict(ck["strategy"])
                group.load_state_dict(ck["group"])
                if dp is not None:
                    dp.load_state_dict(ck["dp"])
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"checkpoint {ckpt_path} does not match this run "
                                      f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
            checkpoint.set_rng_state(ck["rng"])
            st.load(ck["trainer"])
            if lead:
                log.truncate_after(st.step)
        elif lead:
            cfg.save(out / "config.json")
        if isinstance(group, TorchGroup):
            group.barrier()

        # Optional optimizer protocol: `needs_closure` (step(closure) recomputes the loss) and
        # `needs_sampled_loss` (every `hessian_due` step, the gradient of task.sampled_loss is fed to
        # `update_hessian(batch_size)` before the ordinary backward).
        needs_closure = bool(getattr(workers[0].optimizer, "needs_closure", False))
        hessian_hook = bool(getattr(workers[0].optimizer, "needs_sampled_loss", False))
        samples_per_step = (cfg.batch_size if shards is not None else 1) * cfg.workers
        tokens_per_sample = task.tokens_per_example if task.unit == "tokens" else None
        speeds = cfg.worker_speeds
        sync_timing = torch.device(cfg.device).type == "cuda" and cfg.step_time is None

        def elapsed(t0: float) -> float:
            if sync_timing:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        def save_checkpoint() -> None:
            for r in replicas:
                bad = [n for n, p in r.worker.model.named_parameters() if not torch.isfinite(p).all()]
                if bad:
                    raise DivergenceError(st.step, float("nan"),
                                          str(ckpt_path) if st.saved_step is not None else None,
                                          what=f"parameter {bad[0]} of worker {r.worker.rank}")
            if lead:
                log.flush()
            checkpoint.save({
                "step": st.step, "workers": [r.state_dict() for r in replicas], "strategy": strategy.state_dict(),
                "group": group.state_dict(), "rng": checkpoint.rng_state(), "trainer": st.state_dict(),
                "dp": dp.state_dict() if dp is not None else None,
                "sgdlab_version": __version__,
            }, ckpt_path, keep_previous=isinstance(group, TorchGroup))
            st.saved_step = st.step

        def evaluate(record: dict[str, Any]) -> None:
            t = time.perf_counter()
            metrics = task.evaluate(strategy.eval_model(workers))
            if dp is not None:
                metrics = {**metrics, "epsilon": dp.epsilon(record["step"])}
            st.eval_time += time.perf_counter() - t
            record.update(metrics)
            st.last_eval = metrics
            if st.best_val_loss is None or metrics["val_loss"] < st.best_val_loss:
                st.best_val_loss = metrics["val_loss"]
            m = metrics[task.metric]
            if st.best_metric is None or (m > st.best_metric if task.metric_higher_is_better
                                          else m < st.best_metric):
                st.best_metric = m

        def record_at(step: int) -> dict[str, Any]:
            r: dict[str, Any] = {"step": step, "samples": step * samples_per_step}
            if tokens_per_sample:
                r["tokens"] = step * samples_per_step * tokens_per_sample
            return r

        status = "completed"
        bar = _progress_bar(self.progress if lead else False, cfg, st.step)
        try:
            with _StopFlag(self.handle_signals) as stop:
                if st.step == 0 and cfg.eval_every > 0:
                    r = record_at(0)
                    evaluate(r)
                    r.update(bytes_sent=0.0, sim_time_s=0.0)
                    log.append(r)
                for w in workers:
                    w.model.train()
                t_start = time.perf_counter()
                t_train = st.wall_time
                for step in range(st.step + 1, cfg.steps + 1):
                    is_eval = step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
                    is_ckpt = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
                    is_log = is_eval or is_ckpt or step % cfg.log_every == 0
                    # the torch backend agrees on a stop request at logging steps only (see below)
                    stop_now = step == stop_at or (stop.requested and isinstance(group, SimGroup))
                    for i, r in enumerate(replicas):
                        t0 = time.perf_counter()
                        model, opt = r.worker.model, r.worker.optimizer
                        batch = task.get_batch(r.sampler.next() if r.sampler is not None else None)
                        if hessian_hook and opt.hessian_due:  # Gauss-Newton-Bartlett estimate (Sophia-G)
                            sampled, n_labels = task.sampled_loss(model, batch)
                            sampled.backward()
                            opt.update_hessian(batch_size=n_labels)
                            opt.zero_grad(set_to_none=True)
                        if dp_sgd is not None:  # per-example clipping + noise → p.grad
                            loss = dp_sgd.backward(batch)
                        else:
                            loss = task.loss(model, batch)
                            loss.backward()
                        r.batch = batch
                        r.pending.append(loss.detach())
                        group.advance(i, (cfg.step_time / 2 if cfg.step_time else elapsed(t0)) * speeds[r.worker.rank])
                    strategy.after_backward(workers, step)
                    lr_used = workers[0].optimizer.param_groups[0]["lr"]
                    for i, r in enumerate(replicas):
                        t0 = time.perf_counter()
                        model, opt = r.worker.model, r.worker.optimizer
                        if cfg.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
                        if needs_closure:  # e.g. Sophia-H's Hessian-vector products
                            opt.step(lambda m=model, b=r.batch: task.loss(m, b))
                        else:
                            opt.step()
                        r.scheduler.step()
                        opt.zero_grad(set_to_none=True)
                        r.batch = None
                        group.advance(i, (cfg.step_time / 2 if cfg.step_time else elapsed(t0)) * speeds[r.worker.rank])
                    strategy.after_step(workers, step)
                    st.step = step
                    bar.update(1)
                    if is_log or stop_now:
                        per_step = torch.stack([torch.stack(r.pending) for r in replicas]).double().mean(0)
                        for r in replicas:
                            r.pending.clear()
                        flag = float(stop.requested) if isinstance(group, TorchGroup) and is_log else 0.0
                        reduced = group.mean_vector([*per_step.tolist(), flag])
                        if reduced[-1] > 0:
                            stop_now = True
                        losses = st.carry + reduced[:-1]
                        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
                        if bad:
                            st.step = step - len(losses) + bad[0] + 1
                            raise DivergenceError(st.step, losses[bad[0]],
                                                  str(ckpt_path) if st.saved_step is not None else None)
                        st.wall_time = t_train + (time.perf_counter() - t_start) - st.pause
                        t_pause = time.perf_counter()
                        if is_log:  # the record's train_loss is the mean since the previous record
                            st.carry = []
                            st.train_loss = sum(losses) / len(losses)
                            rec = record_at(step)
                            rec.update(train_loss=st.train_loss, lr=lr_used, wall_time_s=st.wall_time,
                                       bytes_sent=group.bytes_sent, sim_time_s=group.sim_time())
                            if is_eval:
                                evaluate(rec)
                            log.append(rec)
                            bar.set_postfix(_postfix(rec, task.metric), refresh=False)
                        else:  # stopping between records: carry the losses over in the checkpoint
                            st.carry = losses
                        if is_ckpt or stop_now:
                            save_checkpoint()
                        st.pause += time.perf_counter() - t_pause
                    if stop_now:
                        status = "stopped"
                        break
                if status == "completed" and st.saved_step != st.step:
                    save_checkpoint()
        except DivergenceError:
            sim_time = group.sim_time()  # a collective on the torch backend: every rank takes part
            if lead:
                log.flush()
                self._write_summary(out, cfg, task, workers, group, sim_time, st, "diverged", dp)
            raise
        finally:
            bar.close()
            if lead:
                log.flush()
        sim_time = group.sim_time()
        summary = self._write_summary(out, cfg, task, workers, group, sim_time, st, status, dp) if lead else {}
        return RunResult(out, cfg, summary)

    @staticmethod
    def _write_summary(out, cfg, task, workers, group, sim_time, st, status, dp=None) -> dict[str, Any]:
        ev = st.last_eval or {}
        model, opt = workers[0].model, workers[0].optimizer
        s: dict[str, Any] = {
            "name": cfg.name, "task": cfg.task, "optimizer": cfg.optimizer, "strategy": cfg.strategy,
            "lr": cfg.lr, "status": status, "steps": st.step, "steps_planned": cfg.steps,
            "batch_size": cfg.batch_size, "seed": cfg.seed,
            "final_train_loss": st.train_loss, "final_val_loss": ev.get("val_loss"),
            "best_val_loss": st.best_val_loss, "metric": task.metric,
            task.metric: ev.get(task.metric), f"best_{task.metric}": st.best_metric,
            "wall_time_s": st.wall_time, "eval_time_s": st.eval_time,
            "workers": cfg.workers, "backend": cfg.backend, "bytes_sent_per_worker": group.bytes_sent,
            "bytes_sent_total": group.bytes_sent * cfg.workers, "sim_time_s": sim_time,
            "sim_comm_time_s": group.comm_time,
            "num_params": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": optim.state_bytes(opt),
            "device": cfg.device, "torch_version": torch.__version__, "sgdlab_version": __version__,
            "data": task.info(),
        }
        if dp is not None:
            s.update(dp.summary(st.step))
        for k, v in ev.items():
            s.setdefault(k, v)
        write_json(out / "summary.json", s)
        return s


@dataclass
class _Replica:
    """A worker plus what only the runner needs: LR schedule, data sampler, pending losses."""

    worker: Worker
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: tasks.EpochSampler | PoissonSampler | None
    pending: list[torch.Tensor] = field(default_factory=list)
    batch: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.worker.rank, "model": self.worker.model.state_dict(),
                "optimizer": self.worker.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict() if self.sampler else None}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st["rank"] != self.worker.rank:
            raise ValueError(f"checkpoint holds worker {st['rank']}, expected {self.worker.rank}")
        self.worker.model.load_state_dict(st["model"])
        self.worker.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.sampler is not None:
            self.sampler.load_state_dict(st["sampler"])


@dataclass
class _State:
    step: int = 0
    wall_time: float = 0.0
    eval_time: float = 0.0
    pause: float = 0.0
    train_loss: float | None = None
    best_val_loss: float | None = None
    best_metric: float | None = None
    last_eval: dict[str, float] | None = None
    carry: list[float] = field(default_factory=list)  # losses not yet in a metrics record
    saved_step: int | None = None  # step of the checkpoint on disk

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "wall_time", "eval_time", "train_loss", "best_val_loss",
                                              "best_metric", "last_eval", "carry")}

    def load(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)
        self.saved_step = self.step


def _load_agreed_checkpoint(group: Group, path: Path, device: str) -> dict[str, Any]:
    """This process's checkpoint; on the torch backend, the newest step that every rank has (a rank that
    died between the others' checkpoint and its own leaves them one checkpoint apart)."""
    if not isinstance(group, TorchGroup):
        return checkpoint.load(path, map_location=device)
    candidates = {}
    for p in (path, checkpoint.previous(path)):
        if p.is_file():
            try:
                ck = checkpoint.load(p, map_location=device)
            except CheckpointError:
                continue
            candidates[int(ck["step"])] = ck
    steps = group.gather_ints(sorted(candidates, reverse=True)[:2] + [-1] * (2 - len(candidates)))
    common = set(steps[0]).intersection(*steps[1:]) - {-1}
    if not common:
        raise CheckpointError(f"rank {group.rank}: the ranks' checkpoints share no step (steps per rank: "
                              f"{[[s for s in st if s >= 0] for st in steps]}); cannot resume consistently")
    return candidates[max(common)]


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _postfix(r: dict[str, Any], metric: str) -> dict[str, str]:
    p = {"loss": f"{r['train_loss']:.4f}"}
    if "val_loss" in r:
        p["val"] = f"{r['val_loss']:.4f}"
        if metric != "val_loss" and metric in r:
            p[metric.removeprefix("val_")] = f"{r[metric]:.4g}"
    return p


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def close(self) -> None: ...


def _progress_bar(progress: bool | None, cfg: Config, start: int):
    if progress is False:
        return _NoBar()
    from tqdm.auto import tqdm

    # progress=None: show it only on a terminal
    return tqdm(total=cfg.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True,
                disable=None if progress is None else False, leave=True, mininterval=0.5)


def run(config: Config, *, resume: bool = False, stop_at: int | None = None, overwrite: bool = False,
        progress: bool | None = False, task: tasks.Task | None = None) -> RunResult:
    """Train ``config`` and return its :class:`RunResult` (run directory, resolved config, summary).

    >>> import sgdlab
    >>> res = sgdlab.run(sgdlab.Config(task="quadratic", optimizer="sgd", lr=0.01, steps=100,
    ...                                out="runs/quad"))
    >>> res.summary["final_val_loss"]
    """
    return Trainer(config, task=task, progress=progress).run(resume=resume, stop_at=stop_at,
                                                             overwrite=overwrite)


def load_run(path: str | Path) -> dict[str, Any]:
    """A run directory's config, summary and metrics records, for reports."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a run directory (no config.json)")
    summary_path = path / "summary.json"
    return {"path": path, "config": _read_json(path / "config.json"),
            "summary": _read_json(summary_path) if summary_path.is_file() else {},
            "metrics": read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []}

