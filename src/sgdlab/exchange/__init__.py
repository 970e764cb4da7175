"""The exchange pipeline and its stages by name (``sgdlab list compressors|aggregators -v``).

Every strategy hands each round's tensors to one :class:`Exchange`; its stages come from four
registries, and a new compressor, error-feedback rule, aggregator or attack is one file plus one line
here::

    compressors.register(MyCompressor.name, MyCompressor, MyCompressor.description)

A compressor spec is ``NAME[,key=value...][,feedback=RULE[,feedback.key=value...]]`` (``int8,block=64``,
``topk,ratio=0.01,feedback=econtrol,feedback.eta=0.5``); an aggregator spec is
``NAME[,key=value...]`` (``krum,f=3,m=5``), and so is a pre-aggregation spec (``nnm,f=3``: applied to the
vectors before the aggregator); a Byzantine spec is ``count=F,attack=NAME[,key=value...]`` (the last F workers
send the attack's vector). :class:`ExchangeSpec` parses and checks them once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .arc import ARC
from .attack_alie import ALIE
from .attack_gaussian import Gaussian
from .attack_ipm import IPM
from .attack_labelflip import LabelFlip
from .attack_mimic import Mimic
from .attack_nan import NaNWorker
from .attack_signflip import SignFlip
from .base import (
    Aggregator,
    Attack,
    Chained,
    Compressor,
    Feedback,
    PreAggregator,
    Slot,
    build_stage,
    canonical,
    parse_spec,
)
from .bucketing import Bucketing
from .cclip import CClip
from .dgc import DGC
from .econtrol import EControl
from .ef import ErrorFeedback
from .ef21 import EF21
from .geomed import GeoMed
from .krum import Krum
from .mda import MDA
from .mean import Mean
from .median import Median
from .nnm import NNM
from .onebit import OneBit
from .pipeline import Exchange, flatten, unflatten_into
from .powersgd import PowerSGD
from .precision import PRECISION_COMPRESSORS, PRECISIONS
from .qsgd import QSGD
from .randk import RandK
from .scaled_sign import ScaledSign
from .signsgd import SignSGD
from .terngrad import TernGrad
from .topk import TopK
from .trimmed_mean import TrimmedMean

__all__ = ["Exchange", "ExchangeSpec", "Compressor", "Feedback", "Aggregator", "PreAggregator", "Attack", "Slot",
           "compressors", "feedback", "aggregators", "pre_aggregators", "attacks", "PRECISIONS", "flatten",
           "unflatten_into"]

compressors: Registry[type[Compressor]] = Registry("compressor")
feedback: Registry[type[Feedback]] = Registry("error-feedback rule")
aggregators: Registry[type[Aggregator]] = Registry("aggregator")
pre_aggregators: Registry[type[PreAggregator]] = Registry("pre-aggregator")
attacks: Registry[type[Attack]] = Registry("attack")

for _cls in PRECISION_COMPRESSORS:
    compressors.register(_cls.name, _cls, _cls.description)
feedback.register(Feedback.name, Feedback, Feedback.description)
for _cls in (ErrorFeedback, EF21, EControl):  # error-feedback rules
    feedback.register(_cls.name, _cls, _cls.description)
aggregators.register(Mean.name, Mean, Mean.description)
for _cls in (Median, TrimmedMean, Krum, GeoMed, CClip, MDA):  # Byzantine-robust aggregators
    aggregators.register(_cls.name, _cls, _cls.description)
for _cls in (NNM, Bucketing, ARC):  # pre-aggregation rules
    pre_aggregators.register(_cls.name, _cls, _cls.description)
compressors.register(PowerSGD.name, PowerSGD, PowerSGD.description)
for _cls in (TopK, RandK, DGC):  # sparsifiers
    compressors.register(_cls.name, _cls, _cls.description)
for _cls in (QSGD, TernGrad, SignSGD, ScaledSign, OneBit):
    compressors.register(_cls.name, _cls, _cls.description)
for _cls in (SignFlip, LabelFlip, Gaussian, ALIE, IPM, Mimic, NaNWorker):  # Byzantine attacks
    attacks.register(_cls.name, _cls, _cls.description)


@dataclass(frozen=True)
class ExchangeSpec:
    """A strategy's exchange, parsed and checked once: ``compress``, ``aggregate``, ``byzantine`` and
    ``pre_aggregate`` specs. Bounds that need the number of workers (a robust rule's f) are checked by
    :meth:`check_workers` and :meth:`build`."""

    compress: str = "fp32"
    aggregate: str = "mean"
    byzantine: str | None = None
    pre_aggregate: str | None = None

    def __post_init__(self) -> None:
        self.stages()  # bad names or keys fail here, before anything runs

    def attack(self, world: int | None = None) -> tuple[Attack | None, int]:
        """The Byzantine workers' attack and their number (``None, 0`` without ``byzantine``)."""
        if self.byzantine is None:
            return None, 0
        _, values, extra = parse_spec(self.byzantine, None, "byzantine", reserved=("count", "attack"))
        if "attack" not in extra or "count" not in extra:
            raise ConfigError(f"byzantine={self.byzantine!r}: expected count=F,attack=NAME[,key=value...] "
                              f"(attacks: {', '.join(attacks.names()) or 'none registered'})")
        if not attacks.names():
            raise ConfigError(f"byzantine={self.byzantine!r}: no attack is registered (`sgdlab list attacks`)")
        count = extra["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or (world is not None and
                                                                                count >= world):
            allowed = f"0 <= count < workers={world}" if world is not None else "an integer >= 0"
            raise ConfigError(f"byzantine count={count!r} is out of range; allowed: {allowed}")
        attack = build_stage(attacks, attacks.entry(str(extra["attack"])).name, values, "attack")
        if world is not None:
            attack.check(world, count)
        return attack, count

    def aggregation(self, world: int | None = None) -> tuple[PreAggregator | None, Aggregator]:
        """The pre-aggregation rule (None without ``pre_aggregate``) and the aggregator, checked against
        ``world`` workers when it is given."""
        pre = None
        if self.pre_aggregate is not None:
            name, values, _ = parse_spec(self.pre_aggregate, pre_aggregators, "pre_aggregate")
            pre = build_stage(pre_aggregators, name, values, "pre-aggregator")
        name, values, _ = parse_spec(self.aggregate, aggregators, "aggregate")
        aggregator = build_stage(aggregators, name, values, "aggregator")
        if world is not None:
            (aggregator if pre is None else Chained(pre, aggregator)).check_workers(world)
        return pre, aggregator

    def check_workers(self, world: int) -> None:
        """Raise ``ConfigError`` unless the exchange works with ``world`` workers (bounds on f, count)."""
        self.aggregation(world)
        self.attack(world)

    def stages(self, world: int | None = None) -> tuple[Compressor, Feedback, Aggregator]:
        name, values, extra = parse_spec(self.compress, compressors, "compress", reserved=("feedback", "feedback."))
        compressor = build_stage(compressors, name, values, "compressor")
        rule = extra.pop("feedback", "none")
        fb = build_stage(feedback, feedback.entry(str(rule)).name,
                         {k.removeprefix("feedback."): v for k, v in extra.items()}, "feedback rule")
        if rule != "none" and compressor.lossless:
            raise ConfigError(f"compress={self.compress!r}: feedback={rule} corrects a lossy compressor; "
                              f"{name} is lossless")
        if rule != "none" and compressor.refuses_feedback():
            raise ConfigError(f"compress={self.compress!r}: feedback={rule} does not apply; {name} with "
                              f"{compressor.refuses_feedback()}")
        if rule != "none" and compressor.own_feedback:
            raise ConfigError(f"compress={self.compress!r}: feedback={rule} does not apply; {name} keeps what it "
                              "did not send in its own accumulation")
        pre, aggregator = self.aggregation(world)
        self.attack()
        if pre is not None:
            aggregator = Chained(pre, aggregator)
        if compressor.mean_only and not aggregator.linear:
            raise ConfigError(f"compress={self.compress!r} needs aggregate=mean: {compressor.name} sums the workers' "
                              f"payloads and never decodes one alone; aggregate={aggregator.name} needs each "
                              "worker's vector")
        return compressor, fb, aggregator

    def canonical(self) -> ExchangeSpec:
        """The same spec with every key spelled out (as saved with a run)."""
        compressor, fb, _ = self.stages()
        pre, aggregator = self.aggregation()
        attack, count = self.attack()
        byzantine = None if attack is None else ",".join([f"count={count}", f"attack={canonical(attack)}"])
        rule = ",".join([f"feedback={fb.name}", *canonical(fb).split(",")[1:]]).replace(",", ",feedback.")
        return ExchangeSpec(canonical(compressor, "" if fb.name == "none" else rule),
                            canonical(aggregator), byzantine, None if pre is None else canonical(pre))

    @property
    def lossless(self) -> bool:
        compressor, fb, _ = self.stages()
        return compressor.lossless and fb.name == "none"

    def build(self, group: Any, client_dp: Any = None, seed: int = 0) -> Exchange:
        compressor, fb, aggregator = self.stages(group.world)
        attack, count = self.attack(group.world)
        return Exchange(group, compressor, fb, aggregator, client_dp=client_dp, seed=seed, attack=attack,
                        byzantine=count)
