"""The run configuration: one validated dataclass, built from defaults, a TOML file, CLI flags and
``--set key=value`` overrides (later sources win), and the :class:`RunSpec` it resolves to.

A TOML file holds top-level keys (the fields of :class:`Config`) and three tables::

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

Each field of :class:`Config` carries its description (``sgdlab run --help`` reads it, see
:func:`describe`). :meth:`Config.spec` checks and parses everything once and returns a frozen
:class:`RunSpec`; the runner builds the run from that and parses nothing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import optim, strategies, tasks
from .distributed.network import NetworkModel
from .errors import ConfigError, UnknownNameError, check_range
from .exchange import ExchangeSpec
from .options import build_options, check_types, parse_value
from .privacy.options import DPOptions
from .strategies.base import check_client_dp, exchange_spec

SCHEDULES = ("constant", "cosine", "linear", "refined")
BACKENDS = ("sim", "torch")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
MAX_TIMEOUT = 1e9  # seconds (about 31 years); torch's timedelta overflows near 8.6e13


def setting(default: Any, help: str, *, none: str | None = None) -> Any:
    """A :class:`Config` field with its description; ``none`` says what the default ``None`` stands for."""
    meta = {"help": help, **({"none": none} if none else {})}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _exact(x: float) -> str:  # %g (config.json's form so far) where it reads back exactly, else repr
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def _network_default() -> str:
    """NetworkModel's defaults, written as --network takes them (bandwidth=1G,latency=1ms)."""
    net = NetworkModel()
    bw = next(f"{net.bandwidth / s:g}{u}" for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1))
              if net.bandwidth >= s or s == 1)
    lat = next(f"{net.latency / s:g}{u}" for u, s in (("s", 1), ("ms", 1e-3), ("us", 1e-6))
               if net.latency >= s or s == 1e-6)
    return f"bandwidth={bw},latency={lat}"


@dataclass
class Config:
    """Everything that defines a run. ``validate()`` checks it; ``spec()`` resolves it (``resolve()``: the
    resolved Config, as written to config.json)."""

    task: str = setting("charlm", "task name (see `sgdlab list tasks`)")
    optimizer: str = setting("adamw", "optimizer name (see `sgdlab list optimizers`)")
    lr: float | None = setting(None, "learning rate", none="the optimizer's registered default")
    steps: int = setting(300, "optimizer steps")
    batch_size: int = setting(32, "examples per step")
    seed: int = setting(0, "seed for initialisation and data order")
    eval_every: int = setting(50, "evaluate every N steps (0: only at the end)")
    log_every: int = setting(10, "log the training loss every N steps")
    checkpoint_every: int | None = setting(None, "checkpoint every N steps (0: only at the end)",
                                           none="same as eval_every")
    schedule: str = setting("constant", f"LR schedule after warm-up: {', '.join(SCHEDULES)} (cosine and linear "
                                        "decay to min_lr_ratio·lr)")
    warmup_steps: int = setting(0, "linear LR warm-up from 0 over this many steps")
    min_lr_ratio: float = setting(0.0, "final LR of a cosine or linear schedule, as a fraction of lr")
    refine_from: str | None = setting(None, "schedule refined: the run directory whose logged gradient norms "
                                            "refine linear decay (Defazio et al., 2023)", none="none")
    grad_clip: float = setting(0.0, "clip the global gradient norm to this (0: off)")
    io_adamw: bool = setting(False, "matrix optimizers: embedding/first/last layers in a use_adamw=True group")
    dp: str | None = setting(None, "differential privacy: DP-SGD, or client-level DP with unit=client",
                             none="off")
    strategy: str = setting("single", "training strategy (see `sgdlab list strategies`)")
    compress: str | None = setting(None, "compressor of the strategy's exchange, NAME[,key=value...]"
                                         "[,feedback=RULE[,feedback.key=value]] (`sgdlab list compressors -v`)",
                                   none="the strategy's precision (fp32)")
    aggregate: str | None = setting(None, "aggregator of the strategy's exchange, NAME[,key=value...] (see "
                                          "`sgdlab list aggregators -v`)", none="mean")
    pre_aggregate: str | None = setting(None, "pre-aggregation rule applied to the workers' vectors before the "
                                              "aggregator, NAME[,key=value...] (e.g. nnm,f=3; see `sgdlab list "
                                              "aggregators -v`)", none="none")
    byzantine: str | None = setting(None, "count=F,attack=NAME[,key=value...]: the last F workers send the "
                                          "attack's vector (see `sgdlab list attacks -v`)", none="none")
    workers: int = setting(1, "number of workers N (simulated, or torchrun processes)")
    backend: str = setting("sim", "sim (all workers in this process) or torch (one worker per torchrun "
                                  "process, torch.distributed)")
    data_split: str = setting("iid", "how the data is sharded over workers: iid, contiguous or "
                                     "dirichlet:ALPHA (label skew)")
    network: str | None = setting(None, "the simulated network, e.g. bandwidth=10G,latency=5ms, or datacenter "
                                  "(100G, 10us), cross-region (1G, 30ms) or wan (100M, 100ms)",
                                  none=_network_default())
    worker_speeds: list[float] | None = setting(None, "per-worker compute-time multipliers, e.g. 1,1,2,1",
                                                none="all 1")
    step_time: float | None = setting(None, "seconds one step takes on a speed-1 worker", none="measured")
    timeout: float = setting(60.0, "torch backend: seconds before a silent peer counts as lost")
    data: str | None = setting(None, "input file for tasks that read one (textfile)")
    device: str = setting("auto", f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]} (auto: CUDA when available, "
                                  "else MPS, else CPU)")
    tensorboard: bool = setting(False, "also write the metrics as TensorBoard event files into the run directory "
                                       "(needs the tensorboard package: pip install 'sgdlab[tensorboard]')")
    name: str | None = setting(None, "label of the run in reports",
                               none="the optimizer name (the strategy name for distributed runs)")
    out: str | None = setting(None, "run directory", none="runs/<task>-<name>-<time>")
    optimizer_args: dict[str, Any] = setting({}, "hyperparameters of the optimizer (see `sgdlab list optimizers -v`)")
    task_args: dict[str, Any] = setting({}, "options of the task (see `sgdlab list tasks -v`)")
    strategy_args: dict[str, Any] = setting({}, "options of the strategy (see `sgdlab list strategies -v`)")

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
        raise UnknownNameError("config key", key, dict.fromkeys([*top, *opt_keys, *task_keys, *strategy_keys]))

    def _set_arg(self, table: str, key: str, value: Any) -> Config:
        return dataclasses.replace(self, **{table: {**getattr(self, table), key: value}})

    # ---- checking and resolving ---------------------------------------------------------------
    def validate(self) -> Config:
        """Raise a :class:`ConfigError` naming the first invalid value and what is allowed."""
        self._parse()
        return self

    def spec(self) -> RunSpec:
        """The :class:`RunSpec` of this run: every value checked and parsed once, every default filled in."""
        p = self._parse()
        hp = dict(p.hyperparameters)
        lr = hp.pop("lr") if self.lr is None else self.lr
        hp.pop("lr", None)
        network_text = f"bandwidth={_exact(p.network.bandwidth)},latency={_exact(p.network.latency)}"
        plain = {k: getattr(self, k) for k in _PLAIN if k != "name"}
        return RunSpec(
            **plain, lr=float(lr), optimizer_args=_freeze(_json_form({**hp, **self.optimizer_args})),
            task_options=_json_options(p.task_options), strategy_options=_json_options(p.strategy_options),
            checkpoint_every=self.eval_every if self.checkpoint_every is None else self.checkpoint_every,
            dp=p.dp, split=p.split, network_text=network_text, exchange=p.exchange,
            network=NetworkModel(float(f"{p.network.bandwidth:g}"), float(f"{p.network.latency:g}")),
            worker_speeds=tuple(float(v) for v in (self.worker_speeds or [1.0] * self.workers)),
            device=resolve_device(self.device),
            name=self.name or (self.optimizer if self.strategy == "single" else self.strategy))

    def resolve(self) -> Config:
        """A validated copy with every default made explicit (as written to config.json)."""
        return self.spec().to_config()

    def _parse(self) -> _Parsed:
        """Check every value (first error raised) and parse the structured ones."""
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
        if (self.schedule == "refined") != (self.refine_from is not None):
            raise ConfigError("schedule=refined and refine_from=RUN_DIR go together (got schedule="
                              f"{self.schedule!r}, refine_from={self.refine_from!r})")
        if self.refine_from is not None:
            from .optim.refine import grad_norms_of
            grad_norms_of(self.refine_from)  # a ConfigError unless the run logged gradient norms
        check_range("grad_clip", self.grad_clip, low=0)
        hp = optim.hyperparameters(self.optimizer, self.optimizer_args.get("base"))
        if self.io_adamw and "use_adamw" not in hp:
            with_it = [n for n in optim.registry.names() if "use_adamw" in optim.hyperparameters(n)]
            raise ConfigError(f"io_adamw=true needs an optimizer with a use_adamw group option ({', '.join(with_it)}"
                              f"), not {self.optimizer!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}; allowed: {', '.join(DEVICES)}")
        unknown = sorted(set(self.optimizer_args) - set(hp))
        if unknown:
            raise UnknownNameError(f"hyperparameter of optimizer {self.optimizer!r}", unknown[0], hp)
        for k, v in self.optimizer_args.items():
            _check_plain(f"optimizer_args.{k}", v)
        if "lr" in self.optimizer_args:
            raise ConfigError("set the learning rate with lr (or --lr), not optimizer_args.lr")
        optim.check(self.optimizer, {**self.optimizer_args, **({} if self.lr is None else {"lr": self.lr})})
        task_options = build_options(tasks.registry.get(self.task).Options, self.task_args,
                                     f"option of task {self.task!r}")
        check_range("workers", self.workers, low=1, integer=True)
        if self.strategy == "single" and self.workers != 1:
            others = ", ".join(n for n in strategies.registry.names() if n != "single")
            raise ConfigError(f"strategy 'single' trains one worker, got workers={self.workers}; choose a "
                              f"distributed strategy: {others}")
        if self.backend not in BACKENDS:
            raise UnknownNameError("backend", self.backend, BACKENDS)
        split = tasks.parse_split(self.data_split)
        network = NetworkModel.parse(self.network)
        if self.worker_speeds is not None:
            if len(self.worker_speeds) != self.workers:
                raise ConfigError(f"worker_speeds has {len(self.worker_speeds)} entries; it needs one per worker "
                                  f"(workers={self.workers})")
            for i, v in enumerate(self.worker_speeds):
                check_range(f"worker_speeds[{i}]", v, low=0, low_open=True)
                _check_finite(f"worker_speeds[{i}]", v)
        if self.step_time is not None:
            check_range("step_time", self.step_time, low=0, low_open=True)
            _check_finite("step_time", self.step_time)
        check_range("timeout", self.timeout, low=0, high=MAX_TIMEOUT, low_open=True)
        strategy_options = strategies.options(self.strategy, self.strategy_args)
        strategies.registry.get(self.strategy).check_workers(strategy_options, self.workers)
        exchange = self._exchange(strategy_options)
        dp = None if self.dp is None else DPOptions.parse(self.dp)
        if dp is not None:
            self._check_dp(dp, strategy_options, exchange)
        return _Parsed(hp, task_options, split, network, strategy_options, dp, exchange)

    def _exchange(self, strategy_options: Any) -> ExchangeSpec:
        given = {k: v for k, v in (("compress", self.compress), ("aggregate", self.aggregate),
                                   ("byzantine", self.byzantine), ("pre_aggregate", self.pre_aggregate))
                 if v is not None}
        if given and self.strategy == "single":
            raise ConfigError(f"{next(iter(given))} applies to the exchange of a distributed strategy; strategy "
                              "'single' exchanges nothing")
        spec = exchange_spec(strategy_options, ExchangeSpec(**given)).canonical()
        spec.check_workers(self.workers)  # count < workers, robust rules' bounds on f
        return spec

    def _check_dp(self, dp: DPOptions, strategy_options: Any, exchange: ExchangeSpec) -> None:
        if dp.unit == "example" and (self.workers != 1 or self.strategy != "single"):
            raise ConfigError(f"dp: DP-SGD (unit=example) runs on one worker with strategy 'single' (got "
                              f"strategy={self.strategy!r}, workers={self.workers}); for client-level DP of "
                              "localsgd or diloco add unit=client to dp")
        if dp.unit == "client":
            check_client_dp(strategies.registry.get(self.strategy), strategy_options, exchange)
            if self.steps < strategy_options.sync_every:
                raise ConfigError(f"dp unit=client: steps={self.steps} < sync_every={strategy_options.sync_every}, "
                                  "so no round ends and nothing is released; allowed: steps >= sync_every")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


class _Parsed(NamedTuple):
    hyperparameters: dict[str, Any]
    task_options: Any
    split: tuple[str, float | None]
    network: NetworkModel
    strategy_options: Any
    dp: DPOptions | None
    exchange: ExchangeSpec


@dataclass(frozen=True)
class RunSpec:
    """One run, resolved (:meth:`Config.spec`): typed, immutable, every value checked and parsed once.

    The runner builds the run from it and parses nothing again; :meth:`to_config` is the resolved
    :class:`Config` that ``config.json`` holds. Fields named as in :class:`Config` hold its resolved
    values; the structured settings are parsed: ``task_options`` and ``strategy_options`` (the task's and
    the strategy's options dataclasses), ``dp`` (:class:`~sgdlab.privacy.DPOptions`), ``network``
    (:class:`~sgdlab.distributed.NetworkModel`), ``split`` (the parsed ``data_split``). The options
    dataclasses are shared, not copied: treat them as read-only.
    """

    task: str
    task_options: Any
    data: str | None
    optimizer: str
    lr: float                          # the base learning rate (a strategy may scale it: lr_multiplier)
    optimizer_args: Mapping[str, Any]  # every other hyperparameter, frozen; optimizer_kwargs() to pass on
    io_adamw: bool
    steps: int
    batch_size: int
    seed: int
    eval_every: int
    log_every: int
    checkpoint_every: int
    schedule: str
    warmup_steps: int
    min_lr_ratio: float
    refine_from: str | None
    grad_clip: float
    dp: DPOptions | None
    strategy: str
    strategy_options: Any
    exchange: ExchangeSpec             # compressor (with feedback), aggregator, Byzantine workers; canonical
    workers: int
    backend: str
    data_split: str
    split: tuple[str, float | None]
    network: NetworkModel
    network_text: str                  # the network as config.json writes it
    worker_speeds: tuple[float, ...]
    step_time: float | None
    timeout: float
    tensorboard: bool
    device: str
    name: str
    out: str | None

    @property
    def dp_sgd(self) -> DPOptions | None:
        """The DP options when the run is DP-SGD (``unit=example``), else None."""
        return self.dp if self.dp is not None and self.dp.unit == "example" else None

    @property
    def client_dp(self) -> DPOptions | None:
        """The DP options when the run has client-level DP (``unit=client``), else None."""
        return self.dp if self.dp is not None and self.dp.unit == "client" else None

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The optimizer's hyperparameters but ``lr``, as a fresh dict (lists where config.json has them)."""
        return _thaw(self.optimizer_args)

    def placed(self, *, out: str | None = None, device: str | None = None) -> RunSpec:
        """The same run with its run directory or device decided (values that need no checking)."""
        changes = {k: v for k, v in (("out", out), ("device", device)) if v is not None}
        return dataclasses.replace(self, **changes)

    def to_config(self) -> Config:
        """The resolved :class:`Config` (what ``config.json`` holds; ``Config.resolve()`` returns it)."""
        return Config(**{k: getattr(self, k) for k in _PLAIN}, lr=self.lr, checkpoint_every=self.checkpoint_every,
                      device=self.device, dp=None if self.dp is None else self.dp.canonical(),
                      network=self.network_text, **self._exchange_fields(),
                      worker_speeds=list(self.worker_speeds), optimizer_args=self.optimizer_kwargs(),
                      task_args=_json_form(dataclasses.asdict(self.task_options)),
                      strategy_args=_json_form(dataclasses.asdict(self.strategy_options)))

    def _exchange_fields(self) -> dict[str, Any]:
        """compress/aggregate/byzantine as config.json writes them: None where the strategy's default holds
        (its precision and the mean), so configs from before these settings existed resume unchanged."""
        if self.strategy == "single":
            return {}
        ex, precision = self.exchange, getattr(self.strategy_options, "precision", "fp32")
        default = ExchangeSpec(precision).canonical()
        return {"compress": None if ex.compress == default.compress else ex.compress,
                "aggregate": None if ex.aggregate == default.aggregate else ex.aggregate,
                "byzantine": ex.byzantine, "pre_aggregate": ex.pre_aggregate}

    def to_dict(self) -> dict[str, Any]:
        return self.to_config().to_dict()

    def fingerprint(self) -> str:
        """A digest of the run's settings but the device (processes of one run must agree on it)."""
        settings = {k: v for k, v in self.to_dict().items() if k != "device"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# Config fields that RunSpec holds unchanged.
_PLAIN = ("task", "optimizer", "steps", "batch_size", "seed", "eval_every", "log_every", "schedule", "warmup_steps",
          "min_lr_ratio", "refine_from", "grad_clip", "io_adamw", "strategy", "workers", "backend", "data_split",
          "step_time", "timeout", "tensorboard", "data", "name", "out")


def describe(name: str) -> str:
    """The description of Config field ``name`` with its default (for ``--help``)."""
    f = {f.name: f for f in dataclasses.fields(Config)}[name]
    if f.default is None:
        none = f.metadata.get("none")
        return f.metadata["help"] + (f"; default: {none}" if none else "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return f"{f.metadata['help']}; default {str(default).lower() if isinstance(default, bool) else default}"


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return types.MappingProxyType({k: _freeze(x) for k, x in v.items()})
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


def _json_form(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples become lists, as after a trip through config.json, so saved and live configs compare equal."""
    return json.loads(json.dumps(d))


def _json_options(opts: Any) -> Any:
    """The options dataclass as rebuilt from config.json (tuples become lists), so a resumed run gets the same."""
    return type(opts)(**_json_form(dataclasses.asdict(opts)))


def _option_names(registry, name: str) -> list[str]:
    if name not in registry:
        return []
    return [f.name for f in dataclasses.fields(registry.get(name).Options)]


def _check_finite(name: str, value: Any) -> None:
    try:
        ok = math.isfinite(float(value))
    except OverflowError:
        ok = False
    if not ok:
        raise ConfigError(f"{name}={value!r:.40} is not finite; allowed: a finite number > 0")


def _check_plain(name: str, value: Any) -> None:
    """Numbers, strings, booleans and lists or tables of them (what config.json can hold)."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(f"{name}[{i}]", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(f"{name}.{k}", v)
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ConfigError(f"{name}={value!r} is a {type(value).__name__}; allowed: a number, string, boolean, or a "
                          "list or table of them")


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
