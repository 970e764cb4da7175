"""The stages of an exchange, one small base class each, and the ``NAME[,key=value...]`` spec syntax.

A stage is a class with a ``name``, an ``Options`` dataclass (its keys in a spec, checked by type and by
``validate()``) and a one-line ``description``; registering it (:mod:`sgdlab.exchange`) makes it usable
by every strategy on both backends. Vectors are flat float32 tensors, one per worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..options import build_options, parse_value
from ..registry import Registry


@dataclass
class NoOptions:
    pass


@dataclass(frozen=True)
class Slot:
    """What is being exchanged: a stream (``"grad"``, ``"delta"``, ``"fragment1"``, ...) at a step, with the
    shapes of the tensors the flat vector holds (for compressors that work per matrix). State that lives
    across rounds (error-feedback memory, warm starts) is kept per stream; ``seed`` is the run's seed,
    for randomness every worker must draw alike; ``world`` the number of workers."""

    key: str
    step: int
    seed: int = 0
    shapes: tuple[torch.Size, ...] = ()
    world: int = 1


class Stage:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()


class Compressor(Stage):
    """Turns one worker's vector into the payload tensors actually sent, and back.

    ``summable``: payloads of different workers may be added element-wise and decoded once (the
    collective is then an all-reduce of the payloads); otherwise they are all-gathered and each is
    decoded. ``lossless``: ``decode(encode(x)) == x`` exactly. ``stateful``: ``encode`` also takes
    ``memory=``, the worker's dict of tensors for this stream (the one the feedback rule gets; prefix the
    keys), which the exchange checkpoints. ``own_feedback``: that state already keeps what was not sent
    (DGC's accumulation), so no error-feedback rule applies. ``mean_only``: its collective sums the workers'
    payloads and no worker's vector is ever decoded alone (PowerSGD), so only a ``linear`` aggregator works.
    """

    summable: ClassVar[bool] = False
    lossless: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    own_feedback: ClassVar[bool] = False
    mean_only: ClassVar[bool] = False

    def refuses_feedback(self) -> str | None:
        """Why no error-feedback rule applies to this compressor as configured (``None``: any may)."""
        return None

    @staticmethod
    def payload_bytes(payload: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in payload)

    def encode(self, x: torch.Tensor, slot: Slot | None = None, rank: int = 0) -> list[torch.Tensor]:
        raise NotImplementedError

    def decode(self, payload: list[torch.Tensor], n: int, slot: Slot | None = None, rank: int = 0) -> torch.Tensor:
        """The vector of ``n`` elements that worker ``rank`` sent (or, when summable, their sum: rank -1)."""
        raise NotImplementedError

    def communicate(self, payloads: list[list[torch.Tensor]], group: Any, n: int, slot: Slot,
                    aggregator: Aggregator) -> tuple[torch.Tensor, float, float]:
        """The collective: (aggregate, bytes sent per worker, seconds). Summable payloads under the mean
        are all-reduced and decoded once; otherwise every payload is all-gathered, decoded and aggregated.
        A compressor whose exchange takes several collectives (low-rank power iterations, a quantised
        reduce-scatter) overrides this."""
        nbytes = max(self.payload_bytes(p) for p in payloads)
        if self.summable and aggregator.linear:
            total = group.sum_payloads(payloads)
            sent, secs = group.network.all_reduce(nbytes, group.world)
            return self.decode(total, n, slot, -1).div_(group.world), sent, secs
        gathered = group.gather_payloads(payloads)
        sent, secs = group.network.all_gather(nbytes, group.world)
        return aggregator([self.decode(p, n, slot, r) for r, p in enumerate(gathered)]), sent, secs


class Feedback(Stage):
    """Per-worker memory around a lossy compressor (error feedback).

    ``message`` gives the vector the worker compresses, ``sent`` updates the worker's memory once it
    knows what its message decodes to, and ``result`` turns the aggregate of the decoded messages into
    what the strategy receives (with ``shared``, state every worker keeps identically). ``memory`` and
    ``shared`` are dicts of tensors that the exchange keeps per worker and stream and checkpoints.
    The default keeps nothing: the message is the vector itself.
    """

    name = "none"
    description = "no error feedback: each round compresses the vector itself"

    def message(self, x: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        return x

    def sent(self, message: torch.Tensor, decoded: torch.Tensor, memory: dict[str, torch.Tensor]) -> None:
        pass

    def result(self, aggregate: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        return aggregate

    @property
    def needs_own_decode(self) -> bool:
        return type(self).sent is not Feedback.sent


class Aggregator(Stage):
    """Combines every worker's decoded vector (rank order) into one. ``linear``: the aggregate is the
    mean, so summable payloads may be reduced before decoding and no worker's vector is seen alone.

    The exchange calls :meth:`aggregate` with the round's ``slot`` (for randomness every worker draws
    alike) and ``state``, a dict of tensors it keeps per stream and checkpoints (``stateful`` rules such as
    centered clipping keep their centre there); by default that is ``self(vectors)``. ``per_rank``: the
    result is one vector per worker (``n × d``, row r for rank r; a decentralised rule).
    :meth:`check_workers` raises ``ConfigError`` when the rule cannot run with ``n`` vectors (its bound on f)."""

    linear: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    per_rank: ClassVar[bool] = False

    def __call__(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, vectors: list[torch.Tensor], slot: Slot | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self(vectors)

    def check_workers(self, n: int) -> None:
        pass

    def bind(self, slot: Slot, state: dict[str, torch.Tensor]) -> BoundAggregator:
        """This rule with the round's slot and its stream's state, called with the vectors alone."""
        return BoundAggregator(self, slot, state)


class BoundAggregator:
    """An aggregator with one round's slot and state (what a compressor's ``communicate`` calls)."""

    def __init__(self, rule: Aggregator, slot: Slot, state: dict[str, torch.Tensor]):
        self.rule, self.slot, self.state = rule, slot, state
        self.name, self.linear, self.per_rank = rule.name, rule.linear, rule.per_rank

    def __call__(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return self.rule.aggregate(vectors, self.slot, self.state)


class PreAggregator(Stage):
    """Maps the workers' vectors to new vectors before a robust aggregator (``--pre-aggregate``):
    nearest-neighbour mixing, bucketing, adaptive clipping. :meth:`count` is how many vectors come out of
    ``n``; :meth:`check_workers` raises ``ConfigError`` when the rule cannot run with ``n`` vectors."""

    def __call__(self, vectors: list[torch.Tensor], slot: Slot | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def count(self, n: int) -> int:
        return n

    def check_workers(self, n: int) -> None:
        pass


class Chained(Aggregator):
    """``aggregator(pre(vectors))``: a pre-aggregation rule followed by an aggregator, as one non-linear
    aggregator (every worker's vector is gathered)."""

    def __init__(self, pre: PreAggregator, aggregator: Aggregator):
        super().__init__(aggregator.options)
        self.pre, self.aggregator = pre, aggregator
        self.name = f"{pre.name}+{aggregator.name}"  # type: ignore[misc]
        self.stateful = aggregator.stateful  # type: ignore[misc]

    def __call__(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return self.aggregate(vectors)

    def aggregate(self, vectors, slot=None, state=None):
        return self.aggregator.aggregate(self.pre(vectors, slot), slot, state)

    def check_workers(self, n: int) -> None:
        self.pre.check_workers(n)
        self.aggregator.check_workers(self.pre.count(n))


class Attack(Stage):
    """What a Byzantine worker sends instead of its own vector (for testing robust aggregators).

    ``omniscient`` attacks see the round's honest vectors (every worker's, gathered before the round's
    collective; that gather models the attacker's knowledge and is not counted as traffic).
    """

    omniscient: ClassVar[bool] = False
    #: a data attack changes the Byzantine workers' training batches (:meth:`poison`, applied by the runner)
    #: and sends the vector computed from them unchanged
    data_attack: ClassVar[bool] = False

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        raise NotImplementedError

    def check(self, world: int, count: int) -> None:
        """Raise ConfigError unless the attack works with ``count`` Byzantine workers out of ``world``."""

    def check_task(self, task: Any) -> None:
        """Raise ConfigError unless this data attack can poison ``task``'s batches."""

    def poison(self, task: Any, batch: Any) -> Any:
        """A data attack's version of a Byzantine worker's training batch (``task``: the run's task)."""
        return batch

    def state_dict(self) -> dict[str, Any]:
        """State kept across rounds (checkpointed with the exchange); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def parse_spec(text: Any, registry: Registry | None, what: str, reserved: tuple[str, ...] = ()
               ) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """``"NAME[,key=value...]"`` → (name, the stage's keys, the ``reserved`` keys), the name checked (a reserved
    key ending in ``.`` is a prefix: ``feedback.`` takes ``feedback.eta``, ...).
    With ``registry=None`` there is no leading name (``"key=value,..."``)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what}={text!r}; expected NAME[,key=value...], NAME one of: "
                          f"{', '.join(registry.names())}" if registry else f"{what}={text!r}; expected key=value,...")
    items = [s.strip() for s in text.split(",")]
    head = None
    if registry is not None:
        head = items.pop(0)
        registry.entry(head)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not key or not raw:
            raise ConfigError(f"{what}: expected key=value items{' after the name' if head else ''}, got {item!r} "
                              f"in {text!r}")
        target = extra if key in reserved or any(r.endswith(".") and key.startswith(r) for r in reserved) else values
        if key in target:
            raise ConfigError(f"{what}: {key} is given twice in {text!r}")
        target[key] = parse_value(raw)
    return head, values, extra


def build_stage(registry: Registry, name: str, values: dict[str, Any], what: str) -> Stage:
    cls = registry.get(name)
    return cls(build_options(cls.Options, values, f"{what} {name!r} key"))


def canonical(stage: Stage, extra: str = "") -> str:
    """``name,key=value,...`` with every option spelled out."""
    items = [f"{k}={_toml(v)}" for k, v in dataclasses.asdict(stage.options).items()]
    return ",".join([stage.name, *items, *([extra] if extra else [])])


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    return repr(v)
