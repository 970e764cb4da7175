"""What a strategy is: hooks around every worker's optimizer step that decide when workers talk and
what they exchange. A strategy is written once, against :class:`sgdlab.distributed.group.Group`, and
runs unchanged on the in-process simulator and on ``torch.distributed``.

Per training step the runner calls, for the workers that live in this process::

    (every worker: forward, backward)   →  strategy.after_backward(workers, step)
    (every worker: optimizer.step())    →  strategy.after_step(workers, step)

``step`` counts completed steps (1, 2, ...). Inner optimizer state stays local to each worker. A
strategy decides when to talk and what to send; it hands those tensors to ``self.exchange``
(:class:`sgdlab.exchange.Exchange`), which compresses, communicates, aggregates and applies client-level
DP as configured, so every compressor and aggregator works with every strategy.

Buffers (BatchNorm running statistics) are model state, not gradients or updates: they bypass the
exchange and are synchronised exactly by :meth:`Strategy.sync_buffers` (option ``buffers``), whose bytes
the group counts like any collective's. See :func:`synced_buffers` for which buffers.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..distributed.group import Group
from ..errors import ConfigError, UnknownNameError
from ..exchange import PRECISIONS, ExchangeSpec


@dataclass
class Worker:
    """One replica: its model, its parameters (in ``model.parameters()`` order) and inner optimizer."""

    rank: int
    model: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())


@dataclass
class NoOptions:
    pass


def exchange_spec(options: Any, spec: ExchangeSpec | None = None) -> ExchangeSpec:
    """The exchange a strategy with ``options`` uses: ``spec`` if given, else its ``precision`` option."""
    precision = getattr(options, "precision", "fp32")
    if spec is None:
        return ExchangeSpec(compress=precision)
    if precision == "fp32" or spec.compress.split(",")[0].strip() == precision:
        return spec
    if spec.compress != "fp32":
        raise ConfigError(f"precision={precision!r} and compress={spec.compress!r} both choose the compressor; "
                          "give one of them")
    return dataclasses.replace(spec, compress=precision)


def check_client_dp(cls: type[Strategy], options: Any, spec: ExchangeSpec | None = None) -> None:
    """Raise ``ConfigError`` unless strategy ``cls`` with ``options`` can run client-level DP."""
    if not cls.supports_client_dp:
        raise ConfigError(f"dp unit=client (client-level DP) works with strategies localsgd and diloco, not "
                          f"{cls.name!r}")
    if getattr(options, "sync_rule", "fixed") != "fixed":
        raise ConfigError(f"dp unit=client accounts for rounds of a fixed sync_every; sync_rule="
                          f"{options.sync_rule!r} changes them (allowed with client DP: sync_rule=fixed)")
    spec = exchange_spec(options, spec)
    if not spec.lossless:
        raise ConfigError(f"dp unit=client needs precision=fp32 and a lossless compressor (got compress="
                          f"{spec.compress!r}): quantising a clipped update could raise its norm above clip")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)


#: How a strategy synchronises the model's floating buffers when it synchronises (``buffers`` option):
#: ``average`` — the exact mean over workers (one all-reduce); ``broadcast`` — rank 0's values (one
#: broadcast; what ``torch.nn.parallel.DistributedDataParallel`` does with ``broadcast_buffers=True``);
#: ``local`` — never: every worker keeps its own.
BUFFER_RULES = ("average", "broadcast", "local")


def check_buffers(buffers: str) -> None:
    if buffers not in BUFFER_RULES:
        raise UnknownNameError("buffers", buffers, BUFFER_RULES)


def synced_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a strategy synchronises: ``model``'s persistent floating-point buffers (BatchNorm's
    ``running_mean`` and ``running_var``, ...), in ``named_buffers`` order. Integer buffers
    (``num_batches_tracked``, which counts forward passes and is equal on workers that step alike) and
    non-persistent ones (caches derived from the configuration) stay each worker's own."""
    out, seen = [], set()
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if (b is not None and id(b) not in seen and name not in module._non_persistent_buffers_set
                    and torch.is_floating_point(b)):
                seen.add(id(b))
                out.append(b)
    return out


class Strategy:
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    #: Whether the strategy exchanges per-round updates that client-level DP can clip and noise.
    supports_client_dp: ClassVar[bool] = False
    #: Whether, on ``--backend torch``, processes must never wait for each other during training (asynchronous
    #: strategies): the runner then measures locally (:class:`~sgdlab.distributed.group.IndependentTorchGroup`).
    independent_processes: ClassVar[bool] = False

    def __init__(self, options: Any, group: Group, exchange: ExchangeSpec | None = None, seed: int = 0):
        self.options, self.group = options, group
        self.exchange_spec = exchange_spec(options, exchange)
        self.exchange = self.exchange_spec.build(group, seed=seed)

    @classmethod
    def check_workers(cls, options: Any, workers: int) -> None:
        """Raise ``ConfigError`` unless the strategy with ``options`` can run on ``workers`` workers."""

    def log_info(self) -> dict[str, Any]:
        """Set-up facts stated once, in the first metrics record of a fresh run (JSON values; e.g. a mixing
        matrix)."""
        return {}

    def eval_info(self, workers: list[Worker]) -> dict[str, float]:
        """Numbers logged with every evaluation, after :meth:`eval_model` (every process calls it)."""
        return {}

    def enable_client_dp(self, client_dp: Any) -> None:
        """Clip and noise every round's updates with ``client_dp`` (:mod:`sgdlab.privacy.client`)."""
        check_client_dp(type(self), self.options, self.exchange_spec)
        self.exchange.client_dp = client_dp

    def lr_multiplier(self) -> float:
        """Factor applied to the inner learning rate (e.g. linear scaling for large batches)."""
        return 1.0

    #: The run's length and LR warm-up, for strategies whose rounds follow the schedule (sync_rule=qsr);
    #: set by :meth:`plan` before :meth:`setup` (None / 0 where nobody calls it).
    total_steps: int | None = None
    warmup_steps: int = 0

    #: Seconds one step takes on each worker (``step_time`` × ``worker_speeds``), in rank order; None when
    #: step times are measured (no ``--step-time``). Set by :meth:`plan`; event-clock strategies need it.
    step_seconds: list[float] | None = None

    def plan(self, steps: int, warmup_steps: int = 0, step_seconds: list[float] | None = None) -> None:
        """Tell the strategy the run's number of steps, LR warm-up steps and per-worker step times (the runner
        calls it)."""
        self.total_steps, self.warmup_steps, self.step_seconds = steps, warmup_steps, step_seconds

    def computing(self, step: int) -> list[int] | None:
        """The local workers (indices into this process's worker list) that take a step at runner step
        ``step``; None: every one (synchronous strategies). An event-clock strategy (asynchronous rounds,
        time-based syncs) returns those whose next step ends within the step's slice of simulated time; the
        others are busy communicating or waiting: their data and optimizer do not move (their LR schedules do:
        they follow the runner's steps)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Values the strategy adds to every metrics record (e.g. the current sync period)."""
        return {}

    def setup(self, workers: list[Worker]) -> None:
        pass

    def after_backward(self, workers: list[Worker], step: int) -> None:
        pass

    def after_step(self, workers: list[Worker], step: int) -> None:
        pass

    def finish(self, workers: list[Worker]) -> None:
        """After the run's last step, before its last record: end any communication still under way (an
        asynchronous server waits here for every worker's last push)."""

    def worker_steps(self) -> int | None:
        """Steps taken, summed over every worker of every process, where the runner cannot count them (an
        asynchronous torch run, whose processes step on their own clocks; known after :meth:`finish`); None:
        the runner's count (its local count × processes) is right."""
        return None

    @property
    def buffer_rule(self) -> str:
        """The ``buffers`` option (``local`` for a strategy without one)."""
        return getattr(self.options, "buffers", "local")

    def sync_buffers(self, workers: list[Worker]) -> None:
        """Synchronise every worker's :func:`synced_buffers` by :attr:`buffer_rule`, exactly and outside the
        exchange (no compressor, aggregator, attack or client-level DP acts on them); the bytes are counted."""
        rule = self.buffer_rule
        per_worker = [synced_buffers(w.model) for w in workers]
        if rule == "local" or not per_worker[0]:
            return
        with torch.no_grad():
            if rule == "average":
                self.group.mean_exact_(per_worker)
            else:
                self.group.broadcast_exact_(per_worker)

    def eval_model(self, workers: list[Worker]) -> nn.Module:
        """The model that represents the run at this point (what is evaluated and reported)."""
        return workers[0].model

    def state_dict(self) -> dict[str, Any]:
        return {"exchange": self.exchange.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exchange.load_state_dict(state.get("exchange", {}))  # absent in checkpoints before 0.2


class GlobalModelMixin:
    """Keeps ``self.global_params``, the last synchronised parameters, ``self.global_buffers``, the last
    synchronised buffers (:func:`synced_buffers`), and a model replica to evaluate: the global parameters
    with the global buffers (under ``buffers=local``, local worker 0's current buffers; other buffers are
    always local worker 0's)."""

    global_params: list[torch.Tensor]
    global_buffers: list[torch.Tensor]
    exchange: Any       # provided by Strategy
    buffer_rule: str    # provided by Strategy

    def init_global(self, workers: list[Worker]) -> None:
        self.global_params = [p.detach().clone() for p in workers[0].params]
        self.global_buffers = [b.detach().clone() for b in synced_buffers(workers[0].model)]
        self._eval_model = copy.deepcopy(workers[0].model)
        if self.exchange.client_dp is not None and self.global_buffers and self.buffer_rule != "local":
            raise ConfigError(f"dp unit=client does not cover the model's buffers (BatchNorm running statistics), "
                              f"which buffers={self.buffer_rule} would share exactly; "
                              "set buffers=local or use a model without them (GroupNorm, LayerNorm)")

    def sync_buffers(self, workers: list[Worker]) -> None:
        """Synchronise the workers' buffers (:meth:`Strategy.sync_buffers`); they become the global ones."""
        super().sync_buffers(workers)  # type: ignore[misc]
        if self.buffer_rule != "local" and self.global_buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.global_buffers, synced_buffers(workers[0].model))

    def eval_model(self, workers: list[Worker]) -> nn.Module:
        with torch.no_grad():
            for p, g in zip(self._eval_model.parameters(), self.global_params, strict=True):
                p.copy_(g)
            for b, w in zip(self._eval_model.buffers(), workers[0].model.buffers(), strict=True):
                b.copy_(w)
            if self.buffer_rule != "local" and self.global_buffers:
                torch._foreach_copy_(synced_buffers(self._eval_model), self.global_buffers)
        return self._eval_model

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "global_params": [g.clone() for g in self.global_params],  # type: ignore[misc]
                "global_buffers": [b.clone() for b in self.global_buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # type: ignore[misc]
        for g, s in zip(self.global_params, state["global_params"], strict=True):
            g.copy_(s)
        for b, s in zip(self.global_buffers, state.get("global_buffers", self.global_buffers), strict=True):
            b.copy_(s)  # absent in checkpoints before buffers were synchronised: keep the initial ones

    def pseudo_gradients(self, workers: list[Worker], indices: list[int] | None = None) -> list[list[torch.Tensor]]:
        """Every local worker's θ − θ_i (of the parameters at ``indices``, default all)."""
        idx = range(len(self.global_params)) if indices is None else indices
        return [[self.global_params[i] - w.params[i].detach() for i in idx] for w in workers]

    def restart_from_global(self, workers: list[Worker]) -> None:
        """θ_i ← θ on every local worker."""
        with torch.no_grad():
            for w in workers:
                torch._foreach_copy_([p.data for p in w.params], self.global_params)
