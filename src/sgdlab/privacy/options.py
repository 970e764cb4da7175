"""The ``--dp`` setting: ``noise=SIGMA,clip=C[,delta=D][,accountant=rdp|pld][,clipping=flat|per_layer]
[,max_physical_batch=B][,grad_sample=auto|ghost|vmap]`` or ``target_epsilon=E,clip=C,delta=D[,...]``.

``grad_sample`` says how DP-SGD finds per-example gradient norms and the clipped sum (see
:mod:`sgdlab.privacy.dpsgd`): ``ghost`` from each layer's inputs and output gradients at about the cost of a
non-private step, ``vmap`` with ``torch.func`` for any model, ``auto`` (the default) ``ghost`` where the
model allows it.

``unit`` says what is protected: ``example`` (the default) is DP-SGD, one training example at a time, on
one worker; ``client`` is client-level DP for ``localsgd`` and ``diloco`` (a worker's whole update per
round, :mod:`sgdlab.privacy.client`), with ``participation=P``, the probability that a worker takes part
in a round (default 1). ``clipping``, ``max_physical_batch`` and ``grad_sample`` belong to ``example``;
``participation`` to ``client``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, UnknownNameError, check_range
from .accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT
from .dpsgd import CLIPPINGS, DEFAULT_GRAD_SAMPLE, DEFAULT_MAX_PHYSICAL_BATCH, GRAD_SAMPLES

DEFAULT_DELTA = 1e-5
_FLOATS = ("noise", "target_epsilon", "clip", "delta", "participation")
UNITS = ("example", "client")
_EXAMPLE_ONLY = ("clipping", "max_physical_batch", "grad_sample")


@dataclass
class DPOptions:
    """Parsed ``--dp``. Exactly one of ``noise`` (σ) and ``target_epsilon`` is set."""

    noise: float | None = None
    target_epsilon: float | None = None
    clip: float = 1.0
    delta: float = DEFAULT_DELTA
    accountant: str = DEFAULT_ACCOUNTANT
    clipping: str = "flat"
    max_physical_batch: int = DEFAULT_MAX_PHYSICAL_BATCH
    grad_sample: str = DEFAULT_GRAD_SAMPLE
    unit: str = "example"
    participation: float = 1.0

    @classmethod
    def parse(cls, text: str) -> DPOptions:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"dp={text!r}; expected e.g. 'noise=1.0,clip=1.0' or "
                              "'target_epsilon=8,clip=1.0,delta=1e-5'")
        keys = [f for f in cls.__dataclass_fields__]
        values: dict[str, object] = {}
        for item in text.split(","):
            key, eq, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not eq or not key or not raw:
                raise ConfigError(f"dp: expected KEY=VALUE items separated by commas, got {item.strip()!r} "
                                  f"in {text!r}")
            if key not in keys:
                raise UnknownNameError("dp key", key, keys)
            if key in values:
                raise ConfigError(f"dp: {key} is given twice in {text!r}")
            if key in _FLOATS or key == "max_physical_batch":
                try:
                    values[key] = int(raw) if key == "max_physical_batch" else float(raw)
                except ValueError:
                    kind = "an integer" if key == "max_physical_batch" else "a number"
                    raise ConfigError(f"dp: {key} must be {kind}, got {raw!r}") from None
            else:
                values[key] = raw
        if ("noise" in values) == ("target_epsilon" in values):
            raise ConfigError(f"dp={text!r}: give exactly one of noise=SIGMA (the noise multiplier) and "
                              "target_epsilon=E (calibrates the noise to reach E over the run)")
        if "clip" not in values:
            raise ConfigError(f"dp={text!r}: clip=C (the per-example gradient norm bound) is required")
        if "target_epsilon" in values and "delta" not in values:
            raise ConfigError(f"dp={text!r}: target_epsilon needs delta=D (e.g. delta=1e-5, below 1/N)")
        unit = values.get("unit", "example")
        if unit not in UNITS:
            raise UnknownNameError("dp unit", unit, UNITS)
        if unit == "client":
            given = [k for k in _EXAMPLE_ONLY if k in values]
            if given:
                raise ConfigError(f"dp={text!r}: {given[0]} applies to unit=example (DP-SGD); with unit=client "
                                  "each worker's whole update is clipped to clip=C")
        elif "participation" in values:
            raise ConfigError(f"dp={text!r}: participation applies to unit=client (the probability a worker "
                              "takes part in a round); add unit=client")
        opts = cls(**values)  # type: ignore[arg-type]
        opts.validate()
        return opts

    def validate(self) -> None:
        for key in _FLOATS:
            v = getattr(self, key)
            if v is None:
                continue
            if key == "delta":
                check_range("dp delta", v, low=0, high=1, low_open=True, high_open=True)
            elif key == "participation":
                check_range("dp participation", v, low=0, high=1, low_open=True)
            else:
                check_range(f"dp {key}", v, low=0, low_open=True)
            if math.isinf(v):
                raise ConfigError(f"dp {key} must be finite, got {v!r}")
        if self.unit not in UNITS:
            raise UnknownNameError("dp unit", self.unit, UNITS)
        if self.accountant not in ACCOUNTANTS:
            raise UnknownNameError("dp accountant", self.accountant, ACCOUNTANTS)
        if self.clipping not in CLIPPINGS:
            raise UnknownNameError("dp clipping", self.clipping, CLIPPINGS)
        if self.grad_sample not in GRAD_SAMPLES:
            raise UnknownNameError("dp grad_sample", self.grad_sample, GRAD_SAMPLES)
        check_range("dp max_physical_batch", self.max_physical_batch, low=1, integer=True)

    def canonical(self) -> str:
        """Every key spelled out (the form saved in config.json)."""
        head = (f"noise={self.noise!r}" if self.noise is not None else f"target_epsilon={self.target_epsilon!r}")
        if self.unit == "client":
            return (f"{head},clip={self.clip!r},delta={self.delta!r},accountant={self.accountant},unit=client,"
                    f"participation={self.participation!r}")
        return (f"{head},clip={self.clip!r},delta={self.delta!r},accountant={self.accountant},"
                f"clipping={self.clipping},max_physical_batch={self.max_physical_batch},"
                f"grad_sample={self.grad_sample}")
