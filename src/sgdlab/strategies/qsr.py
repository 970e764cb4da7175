"""Sync rules of ``localsgd`` and ``diloco``: when a round ends (option ``sync_rule``; SCOPE D6).

``sync_rule="fixed"`` (default): a round is ``H = sync_every`` steps, rounds end at the multiples of H.

``sync_rule="qsr,alpha=A[,gamma=G]"``: the Quadratic Synchronization Rule of Gu, Lyu, Arora, Zhang &
Huang, "A Quadratic Synchronization Rule for Distributed Deep Learning", ICLR 2024 (arXiv:2310.14423).
A round that starts after ``t_s`` completed steps lasts

    H^(s) = max(H_base, ⌊(α / η_{t_s})^γ⌋)        H_base = sync_every, γ = 2 (the paper)

where ``η_{t_s}`` is the inner learning rate of the round's first step (the schedule's value; param group
0 of worker 0's optimizer). As the learning rate decays, rounds grow like 1/η²: fewer syncs late in
training, which the paper links to better generalisation. Only the parameters are averaged (each
strategy's usual round); optimizer states stay local, as in the paper's default runs.

Like the authors' code (hmgxr128/QSR, ``localopt.py``, ``adjust_h``): a round that starts during LR warm-up
(``t_s < warmup_steps``) lasts H_base; after warm-up H is capped at the steps left in the run (the last
round ends on the last step) and is at least 1; α = 0 is exactly the fixed rule. Their cosine scheduler
(``XCosineStepScheduler``) also rounds the learning rate to a power of 2, so their H jumps in steps of 4×;
sgdlab takes the schedule's learning rate as it is. The authors' ViT-B/AdamW setting: H_base = 4,
α = 0.0175, peak lr 0.008, cosine decay after 10K warm-up steps.

The current H is logged as ``sync_period`` in every metrics record.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, UnknownNameError, check_range
from ..exchange.base import parse_spec
from ..options import build_options

RULES = ("fixed", "qsr")
SYNC_RULE_HELP = ("round lengths: fixed (every sync_every steps) or qsr,alpha=A[,gamma=2] (Quadratic Synchronization "
                  "Rule: H = max(sync_every, floor((A/lr)^gamma)) at each round's start)")


@dataclass
class QSROptions:
    alpha: float | None = None   # α: required
    gamma: float = 2.0           # γ: exponent; the paper's rule is quadratic

    def validate(self) -> None:
        if self.alpha is None:
            raise ConfigError("sync_rule qsr needs alpha, e.g. sync_rule=qsr,alpha=0.02 (allowed: alpha >= 0; "
                              "H = max(sync_every, floor((alpha/lr)^2)))")
        check_range("sync_rule qsr alpha", self.alpha, low=0.0)
        check_range("sync_rule qsr gamma", self.gamma, low=0.0, low_open=True)
        if math.isinf(self.alpha) or math.isinf(self.gamma):
            raise ConfigError(f"sync_rule qsr: alpha={self.alpha!r}, gamma={self.gamma!r}; allowed: finite numbers")


def parse_rule(text: Any) -> tuple[str, QSROptions | None]:
    """``"fixed"`` → ("fixed", None); ``"qsr,alpha=A[,gamma=G]"`` → ("qsr", its options)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"sync_rule={text!r}; allowed: fixed, or qsr,alpha=A[,gamma=G]")
    name, _, rest = text.partition(",")
    name = name.strip()
    if name not in RULES:
        raise UnknownNameError("sync_rule", name, RULES)
    if name == "fixed":
        if rest.strip():
            raise ConfigError(f"sync_rule={text!r}: the fixed rule takes no keys (its period is sync_every)")
        return name, None
    _, values, _ = parse_spec(rest, None, "sync_rule qsr") if rest.strip() else (None, {}, {})
    return name, build_options(QSROptions, values, "sync_rule qsr key")


def check_rule(text: Any) -> None:
    parse_rule(text)


class SyncSchedule:
    """When the rounds of a strategy with ``sync_every = h_base`` and ``sync_rule = rule`` end."""

    def __init__(self, rule: str, h_base: int, total_steps: int | None = None, warmup_steps: int = 0):
        self.kind, self.qsr = parse_rule(rule)
        self.h_base, self.total_steps, self.warmup_steps = h_base, total_steps, warmup_steps
        self.period = h_base           # H of the current round
        self.next_sync = h_base        # the step that ends it

    @property
    def adaptive(self) -> bool:
        return self.qsr is not None

    def period_at(self, done: int, lr: float) -> int:
        """H of a round that starts after ``done`` steps at learning rate ``lr``."""
        q = self.qsr
        if q is None or not q.alpha or done < self.warmup_steps:
            return self.h_base  # as the authors' code: no cap at the run's end here
        try:
            x = (q.alpha / lr) ** q.gamma if lr > 0 else math.inf
        except OverflowError:
            x = math.inf
        h: float = max(self.h_base, math.floor(x) if math.isfinite(x) else math.inf)
        if self.total_steps is not None:
            h = min(h, self.total_steps - done)
        return int(max(min(h, sys.maxsize), 1))

    def start(self, done: int, workers: list[Any]) -> None:
        """A round of ``workers`` starts after ``done`` steps (its first step at their current inner LR)."""
        if self.adaptive and (self.total_steps is None or done < self.total_steps):  # none after the last step
            self.period = self.period_at(done, inner_lr(workers))
            self.next_sync = done + self.period

    def due(self, step: int) -> bool:
        """Whether the round ends after step ``step``."""
        if not self.adaptive:
            return step % self.h_base == 0
        return step >= self.next_sync  # (>=: a run resumed with more steps syncs at once, then goes on)

    def metrics(self) -> dict[str, float]:
        return {"sync_period": self.period} if self.adaptive else {}

    def state_dict(self) -> dict[str, int]:
        return {"period": self.period, "next_sync": self.next_sync}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.period, self.next_sync = int(state["period"]), int(state["next_sync"])


def inner_lr(workers: list[Any]) -> float:
    """The inner learning rate of the next step (param group 0 of the first local worker's optimizer)."""
    return float(workers[0].optimizer.param_groups[0]["lr"])
