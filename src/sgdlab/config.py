"""The run configuration: one validated dataclass, built from defaults, a TOML file, CLI flags and
``--set key=value`` overrides (later sources win).

A TOML file holds top-level keys (the fields of :class:`Config`) and two tables::

    task = "charlm"
    optimizer = "adamw"
    lr = 3e-3
    steps = 400

    [optimizer_args]      # any hyperparameter of the chosen optimizer
    weight_decay = 0.1

    [task_args]           # any option of the chosen task (see `sgdlab list tasks -v`)
    d_model = 128

    [strategy_args]       # any option of the chosen strategy (see `sgdlab list strategies -v`)
    sync_every = 50
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import optim, strategies, tasks
from .distributed.network import NetworkModel
from .errors import ConfigError, UnknownNameError, check_range
from .options import build_options, check_types
from .privacy.options import DPOptions
from .strategies.base import check_client_dp

SCHEDULES = ("constant", "cosine", "linear")
BACKENDS = ("sim", "torch")


@dataclass
class Config:
    """Everything that defines a run. ``validate()`` checks it; ``resolve()`` fills in defaults."""

    task: str = "charlm"
    optimizer: str = "adamw"
    lr: float | None = None            # None: the optimizer's registered default
    steps: int = 300
    batch_size: int = 32
    seed: int = 0
    eval_every: int = 50               # 0: evaluate only at the end
    log_every: int = 10
    checkpoint_every: int | None = None  # None: same as eval_every; 0: only at the end
    schedule: str = "constant"         # constant | cosine | linear (decay to min_lr_ratio·lr)
    warmup_steps: int = 0              # linear warm-up from 0 over this many steps
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0             # max global gradient norm; 0 disables clipping
    io_adamw: bool = False             # matrix optimizers: embedding/first/last layers in a use_adamw=True group
    dp: str | None = None              # DP-SGD: "noise=SIGMA,clip=C[,delta=D,...]" or "target_epsilon=E,clip=C,delta=D"
    strategy: str = "single"
    workers: int = 1                   # N, the number of workers (simulated, or torchrun processes)
    backend: str = "sim"               # sim (all workers in this process) | torch (torchrun + torch.distributed)
    data_split: str = "iid"            # iid | contiguous | dirichlet:ALPHA — how the data is sharded over workers
    network: str | None = None         # "bandwidth=1G,latency=1ms" (the defaults): the simulated network
    worker_speeds: list[float] | None = None  # per-worker compute-time multipliers (default all 1)
    step_time: float | None = None     # seconds one step takes on a speed-1 worker; None: measured
    timeout: float = 60.0              # torch backend: seconds before a silent peer counts as lost
    data: str | None = None            # input file for tasks that read one (textfile)
    device: str = "auto"               # auto | cpu | cuda | cuda:N | mps
    name: str | None = None            # label in reports; default "<optimizer>"
    out: str | None = None             # run directory; default runs/<task>-<name>-<time>
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    task_args: dict[str, Any] = field(default_factory=dict)
    strategy_args: dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config key") -> Config:
        return cls(**check_types(cls, dict(values), source))

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        return cls.from_dict(values, source=f"key in config file {path}:")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **check_types(Config, changes, "config key"))

    def set(self, assignment: str) -> Config:
        """Apply one ``key=value`` override (value parsed as TOML, else taken as a string).

        A bare key is a top-level field, else a hyperparameter of the optimizer, else an option of the
        task, else an option of the strategy. ``optimizer_args.KEY`` / ``task_args.KEY`` /
        ``strategy_args.KEY`` (or ``optim.KEY`` / ``task.KEY`` / ``strategy.KEY``) are explicit.
        """
        key, eq, raw = assignment.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
        value = parse_value(raw.strip())
        top = [f.name for f in dataclasses.fields(self) if not f.name.endswith("_args")]
        scope, dot, sub = key.partition(".")
        if dot:
            if scope in ("optimizer_args", "optim"):
                return self._set_arg("optimizer_args", sub, value)
            if scope in ("task_args", "task"):
                return self._set_arg("task_args", sub, value)
            if scope in ("strategy_args", "strategy"):
                return self._set_arg("strategy_args", sub, value)
            raise UnknownNameError("config scope", scope, ["optimizer_args", "task_args", "strategy_args"])
        if key in top:
            return self.replace(**{key: value})
        opt_keys = (optim.hyperparameters(self.optimizer, self.optimizer_args.get("base"))
                    if self.optimizer in optim.registry else {})
        if key in opt_keys and key != "lr":
            return self._set_arg("optimizer_args", key, value)
        task_keys = _option_names(tasks.registry, self.task)
        if key in task_keys:
            return self._set_arg("task_args", key, value)
        strategy_keys = _option_names(strategies.registry, self.strategy)
        if key in strategy_keys:
            return self._set_arg("strategy_args", key, value)
        raise UnknownNameError("config key", key, [*top, *opt_keys, *task_keys, *strategy_keys])

    def _set_arg(self, table: str, key: str, value: Any) -> Config:
        return dataclasses.replace(self, **{table: {**getattr(self, table), key: value}})

    # ---- checking -----------------------------------------------------------------------------
    def validate(self) -> Config:
        """Raise a :class:`ConfigError` naming the first invalid value and what is allowed."""
        tasks.registry.entry(self.task)
        optim.registry.entry(self.optimizer)
        strategies.registry.entry(self.strategy)
        if self.lr is not None:
            check_range("lr", self.lr, low=0)
            if math.isinf(self.lr):
                raise ConfigError("lr must be finite")
        check_range("steps", self.steps, low=1, integer=True)
        check_range("batch_size", self.batch_size, low=1, integer=True)
        check_range("seed", self.seed, low=0, high=2**63 - 1, integer=True)
        check_range("eval_every", self.eval_every, low=0, integer=True)
        check_range("log_every", self.log_every, low=1, integer=True)
        if self.checkpoint_every is not None:
            check_range("checkpoint_every", self.checkpoint_every, low=0, integer=True)
        if self.schedule not in SCHEDULES:
            raise UnknownNameError("schedule", self.schedule, SCHEDULES)
        check_range("warmup_steps", self.warmup_steps, low=0, high=self.steps, integer=True)
        check_range("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_range("grad_clip", self.grad_clip, low=0)
        if self.io_adamw and "use_adamw" not in optim.hyperparameters(self.optimizer, self.optimizer_args.get("base")):
            with_it = [n for n in optim.registry.names() if "use_adamw" in optim.hyperparameters(n)]
            raise ConfigError(f"io_adamw=true needs an optimizer with a use_adamw group option ({', '.join(with_it)}"
                              f"), not {self.optimizer!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        hp = optim.hyperparameters(self.optimizer, self.optimizer_args.get("base"))
        unknown = sorted(set(self.optimizer_args) - set(hp))
        if unknown:
            raise UnknownNameError(f"hyperparameter of optimizer {self.optimizer!r}", unknown[0], hp)
        if "lr" in self.optimizer_args:
            raise ConfigError("set the learning rate with lr (or --lr), not optimizer_args.lr")
        task_cls = tasks.registry.get(self.task)
        build_options(task_cls.Options, self.task_args, f"option of task {self.task!r}")
        check_range("workers", self.workers, low=1, integer=True)
        if self.strategy == "single" and self.workers != 1:
            others = ", ".join(n for n in strategies.registry.names() if n != "single")
            raise ConfigError(f"strategy 'single' trains one worker, got workers={self.workers}; choose a "
                              f"distributed strategy: {others}")
        if self.backend not in BACKENDS:
            raise UnknownNameError("backend", self.backend, BACKENDS)
        tasks.parse_split(self.data_split)
        NetworkModel.parse(self.network)
        if self.worker_speeds is not None:
            if len(self.worker_speeds) != self.workers:
                raise ConfigError(f"worker_speeds has {len(self.worker_speeds)} entries; it needs one per worker "
                                  f"(workers={self.workers})")
            for i, v in enumerate(self.worker_speeds):
                check_range(f"worker_speeds[{i}]", v, low=0, low_open=True)
        if self.step_time is not None:
            check_range("step_time", self.step_time, low=0, low_open=True)
        check_range("timeout", self.timeout, low=0, low_open=True)
        strategies.options(self.strategy, self.strategy_args)
        if self.dp is not None:
            dp = DPOptions.parse(self.dp)
            if dp.unit == "example" and (self.workers != 1 or self.strategy != "single"):
                raise ConfigError(f"dp: DP-SGD (unit=example) runs on one worker with strategy 'single' (got "
                                  f"strategy={self.strategy!r}, workers={self.workers}); for client-level DP of "
                                  "localsgd or diloco add unit=client to dp")
            if dp.unit == "client":
                sopts = strategies.options(self.strategy, self.strategy_args)
                check_client_dp(strategies.registry.get(self.strategy), sopts)
                if self.steps < sopts.sync_every:
                    raise ConfigError(f"dp unit=client: steps={self.steps} < sync_every={sopts.sync_every}, so "
                                      "no round ends and nothing is released; allowed: steps >= sync_every")
        return self

    def resolve(self) -> Config:
        """A validated copy with every default made explicit (as written to config.json)."""
        self.validate()
        hp = optim.hyperparameters(self.optimizer, self.optimizer_args.get("base"))
        lr = hp.pop("lr") if self.lr is None else self.lr
        hp.pop("lr", None)
        task_cls = tasks.registry.get(self.task)
        opts = build_options(task_cls.Options, self.task_args, f"option of task {self.task!r}")
        net = NetworkModel.parse(self.network)
        return dataclasses.replace(
            self, lr=float(lr), name=self.name or (self.optimizer if self.strategy == "single" else self.strategy),
            network=f"bandwidth={net.bandwidth:g},latency={net.latency:g}",
            worker_speeds=[float(v) for v in (self.worker_speeds or [1.0] * self.workers)],
            strategy_args=_json_form(dataclasses.asdict(strategies.options(self.strategy, self.strategy_args))),
            checkpoint_every=self.eval_every if self.checkpoint_every is None else self.checkpoint_every,
            device=resolve_device(self.device),
            dp=None if self.dp is None else DPOptions.parse(self.dp).canonical(),
            optimizer_args=_json_form({**hp, **self.optimizer_args}),
            task_args=_json_form(dataclasses.asdict(opts)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _json_form(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples become lists, as after a trip through config.json, so saved and live configs compare equal."""
    return json.loads(json.dumps(d))


def _option_names(registry, name: str) -> list[str]:
    if name not in registry:
        return []
    return [f.name for f in dataclasses.fields(registry.get(name).Options)]


def parse_value(raw: str) -> Any:
    """``"0.9"`` → 0.9, ``"[0.9, 0.95]"`` → [0.9, 0.95], ``"true"`` → True, ``"cnn"`` → "cnn"."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but MPS is not available here; use --device cpu or auto")
    return device
