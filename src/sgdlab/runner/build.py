"""Building a run from its :class:`~sgdlab.config.RunSpec`: the communication group, the task, and this
process's replicas (model, optimizer, LR schedule, sampler) with the strategy and the DP engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .. import optim, strategies, tasks
from ..config import RunSpec
from ..distributed.group import Group, IndependentTorchGroup, SimGroup, TorchGroup, torchrun_env
from ..errors import ConfigError
from ..models import io_parameters
from ..optim import protocol
from ..optim.refine import refined_factors
from ..privacy import ClientDP, PoissonSampler, PrivateTraining
from ..strategies import Strategy, Worker


def lr_factor(step: int, spec: Any) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "refined":  # linear decay refined by a previous run's gradient norms (optim.refine)
        factors = refined_factors(spec.refine_from, spec.steps - spec.warmup_steps)
        shape = factors[min(step - spec.warmup_steps, len(factors) - 1)]
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape
    p = min(1.0, (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * p)) if spec.schedule == "cosine" else 1 - p
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape


def make_group(spec: RunSpec) -> tuple[Group, RunSpec]:
    """The group of ``spec.backend``, with ``spec`` placed on this process's device; every process is
    checked to run the same settings."""
    if spec.backend == "sim":
        group: Group = SimGroup(spec.workers, spec.network)
    else:
        env = torchrun_env()
        if env is None:
            raise ConfigError("--backend torch must be started by torchrun, e.g. `torchrun --nproc-per-node "
                              f"{spec.workers} -m sgdlab run --backend torch --workers {spec.workers} ...`")
        if env[1] != spec.workers:
            raise ConfigError(f"workers={spec.workers} but torchrun started {env[1]} processes; pass "
                              f"--workers {env[1]} (one worker per process)")
        if spec.device.startswith("cuda") and ":" not in spec.device:  # one GPU per process
            spec = spec.placed(device=f"cuda:{env[2]}")
            torch.cuda.set_device(spec.device)
        kind = IndependentTorchGroup if strategies.registry.get(spec.strategy).independent_processes else TorchGroup
        group = kind(spec.network, torch.device(spec.device), spec.timeout)
    group.check_same(spec.fingerprint())
    return group, spec


def build_task(spec: RunSpec) -> tasks.Task:
    return tasks.registry.get(spec.task)(spec.task_options, torch.device(spec.device), spec.data)


@dataclass
class Replica:
    """A worker plus what only the runner needs: LR schedule, data sampler, what its optimizer asks of a
    step (:func:`sgdlab.optim.protocol.needs`), the pending losses and the current step's context."""

    worker: Worker
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: tasks.EpochSampler | PoissonSampler | None
    need: protocol.StepNeeds
    pending: list[torch.Tensor | None] = field(default_factory=list)  # per step: its loss (None: no step)
    ctx: protocol.StepContext | None = None
    poison: Any = None  # batch -> batch: a Byzantine worker's data attack (labelflip), else None

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
class Parts:
    """What this process trains: its replicas, the strategy and the DP engine (client-level or DP-SGD)."""

    task: tasks.Task
    replicas: list[Replica]
    strategy: Strategy
    dp: ClientDP | PrivateTraining | None   # epsilon, summary and checkpoint state of either kind
    dp_sgd: PrivateTraining | None          # the same object when it is DP-SGD (it computes the gradients)
    samples_per_step: int

    @property
    def workers(self) -> list[Worker]:
        return [r.worker for r in self.replicas]


def build_parts(spec: RunSpec, group: Group, task: tasks.Task | None = None) -> Parts:
    """Everything the loop trains, for the workers of ``group`` that live in this process."""
    torch.manual_seed(spec.seed)
    task = task or build_task(spec)
    client_dp = None
    if spec.client_dp is not None:  # clip + noise each round's updates
        client_dp = ClientDP.from_options(spec.client_dp, num_clients=spec.workers, steps=spec.steps,
                                          sync_every=spec.strategy_options.sync_every, seed=spec.seed)
    strategy = strategies.create(spec.strategy, group, spec.strategy_options, client_dp=client_dp,
                                 exchange=spec.exchange, seed=spec.seed)
    lr = spec.lr * strategy.lr_multiplier()
    shards = None
    if task.num_train is not None:
        min_size = spec.batch_size if spec.split[0] == "dirichlet" else 1
        shards = task.shards(spec.workers, spec.data_split, spec.seed, min_size=min_size)
    replicas = [_replica(spec, task, rank, lr, None if shards is None else shards[rank]) for rank in group.local]
    attack = strategy.exchange.attack
    if attack is not None and attack.data_attack:  # the Byzantine workers train on poisoned batches
        attack.check_task(task)
        for r in replicas:
            if r.worker.rank in strategy.exchange.byzantine:
                r.poison = partial(attack.poison, task)
    dp_sgd = None
    if spec.dp_sgd is not None:  # Poisson sampling and private gradients (one worker, see Config)
        PrivateTraining.check_optimizer(replicas[0].worker.optimizer, spec.optimizer)
        dp_sgd = PrivateTraining(spec.dp_sgd, task, replicas[0].worker.model, steps=spec.steps,
                                 batch_size=spec.batch_size, seed=spec.seed)
        replicas[0].sampler = dp_sgd.sampler
    step_seconds = None if spec.step_time is None else [spec.step_time * v for v in spec.worker_speeds]
    strategy.plan(spec.steps, spec.warmup_steps, step_seconds)  # sync_rule=qsr rounds, event clocks
    strategy.setup([r.worker for r in replicas])
    samples_per_step = (spec.batch_size if shards is not None else 1) * spec.workers
    return Parts(task, replicas, strategy, client_dp or dp_sgd, dp_sgd, samples_per_step)


def _replica(spec: RunSpec, task: tasks.Task, rank: int, lr: float, shard: torch.Tensor | None) -> Replica:
    torch.manual_seed(spec.seed)  # identical initial replicas
    model = task.build_model()
    params: Any = list(model.parameters())
    if spec.io_adamw:  # embeddings and the first/last layer on the optimizer's AdamW side
        io = {id(p) for p in io_parameters(model)}
        params = [{"params": [p for p in params if id(p) not in io]},
                  {"params": [p for p in params if id(p) in io], "use_adamw": True}]
    opt = optim.expect_steps(optim.create(spec.optimizer, params, lr=lr, **spec.optimizer_kwargs()), spec.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, spec))
    sampler = None if shard is None else tasks.EpochSampler(shard, spec.batch_size, spec.seed + 7919 * rank)
    return Replica(Worker(rank, model, opt), sched, sampler, protocol.needs(opt))
