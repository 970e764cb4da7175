"""The event clock of strategies whose workers do not step in lockstep (asynchronous rounds, time-based syncs).

Runner step ``t`` is a slice of simulated time ``((t-1)·q, t·q]`` with ``q`` the fastest worker's step time
(``--step-time`` × the smallest ``--worker-speeds`` entry). In step ``t`` a worker takes its next local
step when that step ends within the slice: ``clock_i + s_i(k) <= t·q``, with ``clock_i`` its simulated
clock (compute, plus the time it waited on messages) and ``s_i(k)`` the time of its k-th local step. Since
``s_i(k) >= q``, a worker takes at most one step per slice; the fastest worker takes one in every slice
where it does not wait. What a strategy does when a worker's round ends is processed in order of the
simulated time at which it happens, so the order of events is exact even though the runner steps in
slices.

Random slowdowns (``slow_prob`` p, ``slow_factor`` f): each local step of each worker independently takes
f × its time with probability p (a straggling step). The draw depends only on the seed, the worker and the
step's index, so a run is deterministic and resumes bit-identically.

Step times must be fixed (``--step-time``): measured times differ from run to run, and with them the
order of the rounds and the result.
"""

from __future__ import annotations

import random
from typing import Any

from ..errors import ConfigError, check_range

#: relative tolerance of "ends within the slice" (clocks are sums of floats)
_TOL = 1e-9


def check_slowdown(slow_prob: float, slow_factor: float) -> None:
    check_range("slow_prob", slow_prob, low=0.0, high=1.0)
    check_range("slow_factor", slow_factor, low=1.0)
    if slow_factor == float("inf"):
        raise ConfigError("slow_factor=inf; allowed: a finite number >= 1")


class EventClock:
    """Per-worker step times with seeded slowdowns, and which workers step in a runner step."""

    def __init__(self, strategy_name: str, step_seconds: list[float] | None, slow_prob: float = 0.0,
                 slow_factor: float = 1.0, seed: int = 0):
        if step_seconds is None:
            raise ConfigError(f"strategy {strategy_name} runs on an event clock and needs a fixed step time: pass "
                              "--step-time SECONDS (and --worker-speeds for heterogeneous workers); measured step "
                              "times would change the order of the rounds from run to run")
        self.seconds = list(step_seconds)
        self.quantum = min(self.seconds)
        self.slow_prob, self.slow_factor, self.seed = slow_prob, slow_factor, seed

    def slowed(self, rank: int, k: int) -> bool:
        """Whether worker ``rank``'s ``k``-th local step (1-based) straggles."""
        if self.slow_prob <= 0 or self.slow_factor == 1.0:
            return False
        return random.Random(f"{self.seed}/{rank}/{k}").random() < self.slow_prob

    def step_time(self, rank: int, k: int) -> float:
        """Seconds of worker ``rank``'s ``k``-th local step."""
        return self.seconds[rank] * (self.slow_factor if self.slowed(rank, k) else 1.0)

    def extra(self, rank: int, k: int) -> float:
        """What a slowed step adds to the nominal time the runner advances the clock by."""
        return self.step_time(rank, k) - self.seconds[rank]

    def slice_end(self, step: int) -> float:
        return step * self.quantum

    def fits(self, clock: float, rank: int, k: int, step: int) -> bool:
        """Whether worker ``rank``'s ``k``-th step, starting at ``clock``, ends within runner step ``step``."""
        end = self.slice_end(step)
        return clock + self.step_time(rank, k) <= end + _TOL * max(1.0, end)

    def info(self) -> dict[str, Any]:
        return {"step_seconds": self.seconds, "slow_prob": self.slow_prob, "slow_factor": self.slow_factor}
