"""The network model behind simulated time and the collective cost model behind byte counts.

α-β model with ring collectives among N workers (bandwidth β in bits/s, latency α in s):

* all-reduce of S bytes (reduce-scatter + all-gather): each worker sends ``2(N-1)/N · S`` bytes and it
  takes ``2(N-1)·α + 2(N-1)/N · 8S/β`` seconds;
* all-gather of s bytes from each worker: each worker sends ``(N-1)·s`` bytes, in
  ``(N-1)·α + (N-1) · 8s/β`` seconds.

With one worker nothing is sent and nothing costs time. Synchronous strategies wait for the slowest
worker before a collective starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

_BW_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_T_UNITS = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class NetworkModel:
    bandwidth: float = 1e9   # bits per second
    latency: float = 1e-3    # seconds per message

    @classmethod
    def parse(cls, spec: str | None) -> NetworkModel:
        """``"bandwidth=10G,latency=5ms"`` (bandwidth in bit/s with optional k/M/G/T; latency in s, ms, us)."""
        if not spec:
            return cls()
        values = {}
        for part in str(spec).split(","):
            key, eq, raw = part.partition("=")
            key, raw = key.strip(), raw.strip().lower()
            if key == "bandwidth":
                m = re.fullmatch(r"([0-9.eE+-]+)\s*([kmgt]?)(bit/s|bps|b/s)?", raw)
                scale = _BW_UNITS[m.group(2)] if m else None
            elif key == "latency":
                m = re.fullmatch(r"([0-9.eE+-]+)\s*(s|ms|us)?", raw)
                scale = _T_UNITS[m.group(2) or ""] if m else None
            else:
                raise ConfigError(f"--network: unknown key {key!r}; allowed: bandwidth, latency "
                                  "(e.g. bandwidth=1G,latency=1ms)")
            try:
                values[key] = float(m.group(1)) * scale  # type: ignore[union-attr]
            except (AttributeError, TypeError, ValueError):
                raise ConfigError(f"--network: cannot read {key}={raw!r} (e.g. bandwidth=10G, latency=5ms)") from None
        net = cls(**values)
        if not net.bandwidth > 0 or not net.latency >= 0:
            raise ConfigError(f"--network: bandwidth must be > 0 and latency >= 0, got {spec!r}")
        return net

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
