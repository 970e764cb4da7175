"""The network model behind simulated time and the collective cost model behind byte counts.

α-β model with ring collectives among N workers (bandwidth β in bits/s, latency α in s):

* all-reduce of S bytes (reduce-scatter + all-gather): each worker sends ``2(N-1)/N · S`` bytes and it
  takes ``2(N-1)·α + 2(N-1)/N · 8S/β`` seconds;
* all-gather of s bytes from each worker: each worker sends ``(N-1)·s`` bytes, in
  ``(N-1)·α + (N-1) · 8s/β`` seconds;
* broadcast of S bytes from one worker (pipelined along the ring: every worker but the last forwards
  it): ``(N-1)/N · S`` bytes per worker on average, in ``(N-1)·α + 8S/β`` seconds;
* point-to-point (:meth:`NetworkModel.send`): k messages of s bytes from one worker, sent one after
  another on its link: ``k·s`` bytes in ``k·(α + 8s/β)`` seconds.

With one worker nothing is sent and nothing costs time. Synchronous strategies wait for the slowest
worker before a collective starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError

_BW_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_T_UNITS = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6}
# a decimal number in ASCII digits: optional sign, fraction and exponent (no nan, inf, 0x, _)
_NUMBER = r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)"
# key -> (pattern of the lower-cased value, unit scales, what the error message says is allowed)
_FORMS = {
    "bandwidth": (_NUMBER + r"\s*([kmgt]?)(?:bit/s|bps|b/s)?", _BW_UNITS,
                  "a number of bit/s with an optional k, M, G or T suffix, e.g. 10G or 100Mbps"),
    "latency": (_NUMBER + r"\s*(s|ms|us)?", _T_UNITS, "a number of seconds with an optional s, ms or us suffix, "
                "e.g. 5ms"),
}
_BASE = {"bandwidth": "bit/s", "latency": "s"}
#: named networks (``--network cross-region``): link bandwidth and per-message latency
NETWORKS = {"datacenter": "bandwidth=100G,latency=10us", "cross-region": "bandwidth=1G,latency=30ms",
            "wan": "bandwidth=100M,latency=100ms"}


@dataclass(frozen=True)
class NetworkModel:
    bandwidth: float = 1e9   # bits per second
    latency: float = 1e-3    # seconds per message

    @classmethod
    def parse(cls, spec: str | None) -> NetworkModel:
        """``"bandwidth=10G,latency=5ms"`` (bandwidth in bit/s with optional k/M/G/T; latency in s, ms, us),
        or a name of :data:`NETWORKS` (``datacenter``, ``cross-region``, ``wan``).

        Either key may be left out (defaults 1G and 1ms); each may be given once. Bandwidth must be a finite
        number > 0 and latency a finite number >= 0 after applying the unit."""
        if not spec:
            return cls()
        spec = NETWORKS.get(str(spec).strip().lower(), spec)
        if "=" not in str(spec) and str(spec).strip():
            import difflib

            close = difflib.get_close_matches(str(spec).strip().lower(), NETWORKS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--network: unknown network {spec!r}.{hint} Allowed: {', '.join(NETWORKS)}, or "
                              "bandwidth=B,latency=L (e.g. bandwidth=1G,latency=1ms)")
        values: dict[str, float] = {}
        for part in str(spec).split(","):
            key, eq, raw = part.partition("=")
            key, raw = key.strip(), raw.strip()
            if key not in _FORMS:
                if not key and not eq:
                    raise ConfigError(f"--network: empty item in {spec!r}; expected KEY=VALUE items separated by "
                                      "commas, e.g. bandwidth=1G,latency=1ms")
                raise ConfigError(f"--network: unknown key {key!r}; allowed: bandwidth, latency "
                                  f"(e.g. bandwidth=1G,latency=1ms), or a named network: {', '.join(NETWORKS)}")
            if key in values:
                raise ConfigError(f"--network: {key} is given twice in {spec!r}")
            pattern, units, allowed = _FORMS[key]
            m = re.fullmatch(pattern, raw.lower())
            try:
                value = float(m.group(1)) * units[m.group(2) or ""]  # type: ignore[union-attr]
            except (AttributeError, ValueError):
                raise ConfigError(f"--network: cannot read {key}={raw!r}; allowed: {allowed}") from None
            low_ok = value > 0 if key == "bandwidth" else value >= 0
            if not (low_ok and math.isfinite(value)):
                bound = "> 0" if key == "bandwidth" else ">= 0"
                raise ConfigError(f"--network: {key}={raw!r} is {value!r} {_BASE[key]}; allowed: a finite "
                                  f"{key} {bound}")
            values[key] = value + 0.0  # -0.0 -> 0.0
        return cls(**values)

    def describe(self) -> str:
        """The network's name in :data:`NETWORKS`, else its bandwidth and latency in words."""
        name = next((k for k, v in NETWORKS.items() if NetworkModel.parse(v) == self), None)
        bw = next(f"{self.bandwidth / s:g} {u}bit/s" for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3),
                                                                    ("", 1)) if self.bandwidth >= s or s == 1)
        lat = next(f"{self.latency / s:g} {u}" for u, s in (("s", 1), ("ms", 1e-3), ("us", 1e-6))
                   if self.latency >= s or s == 1e-6)
        return f"{name} ({bw}, {lat})" if name else f"{bw}, {lat}"

    def canonical(self) -> str:
        """The spec that :meth:`parse` reads back to exactly this model (every key, shortest exact floats)."""
        return f"bandwidth={self.bandwidth!r},latency={self.latency!r}"

    def all_reduce(self, nbytes: float, n: int) -> tuple[float, float]:
        """(bytes sent per worker, seconds) of a ring all-reduce of ``nbytes`` among ``n`` workers."""
        if n <= 1:
            return 0.0, 0.0
        sent = 2 * (n - 1) / n * nbytes
        return sent, 2 * (n - 1) * self.latency + 8 * sent / self.bandwidth

    def all_gather(self, nbytes: float, n: int) -> tuple[float, float]:
        """(bytes sent per worker, seconds) of a ring all-gather of ``nbytes`` from each of ``n`` workers."""
        if n <= 1:
            return 0.0, 0.0
        sent = (n - 1) * nbytes
        return sent, (n - 1) * self.latency + 8 * sent / self.bandwidth

    def broadcast(self, nbytes: float, n: int) -> tuple[float, float]:
        """(bytes sent per worker, on average, seconds) of a pipelined ring broadcast of ``nbytes`` from one
        worker to ``n``: N - 1 of the N workers each send the payload once."""
        if n <= 1:
            return 0.0, 0.0
        return (n - 1) / n * nbytes, (n - 1) * self.latency + 8 * nbytes / self.bandwidth

    def send(self, nbytes: float, messages: int = 1) -> tuple[float, float]:
        """(bytes sent, seconds) of ``messages`` point-to-point messages of ``nbytes`` each from one worker,
        sent one after another on its link (each pays the latency)."""
        if messages <= 0:
            return 0.0, 0.0
        return messages * nbytes, messages * (self.latency + 8 * nbytes / self.bandwidth)
