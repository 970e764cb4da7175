"""The exchange: what every strategy calls to combine one round's tensors across workers.

For the tensors of every worker that lives in this process, in order::

    client-level DP clip (per worker)  →  flatten  →  error-feedback message
      →  Byzantine workers' attack (the last ``count`` ranks, when configured)  →  compressor encode
      →  collective  (all-reduce of the payloads when they add up and the aggregate is the mean,
                      all-gather of every worker's payload otherwise; bytes from the payload tensors)
      →  decode  →  aggregate (mean, or a robust rule, after an optional pre-aggregation rule)
      →  error-feedback result  →  unflatten into every local worker's tensors (a per-rank rule, such as
         MoNNA's nearest-neighbour averaging, gives each worker its own row)  →  client-level DP noise

The same code runs on both backends: :class:`~sgdlab.distributed.group.Group` provides the sum and the
gather of payload tensors, byte counting and simulated time. Per-worker and per-stream state (error
feedback memory, a stateful aggregator's state such as centered clipping's centre) is in
:meth:`Exchange.state_dict`, which strategies put in their checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SgdlabError
from .base import Aggregator, Attack, Compressor, Feedback, Slot
from .mean import Mean
from .precision import FP32


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


class Exchange:
    """One strategy's exchange over ``group``, built from its stages (defaults: fp32, no feedback, mean)."""

    def __init__(self, group: Any, compressor: Compressor | None = None, feedback: Feedback | None = None,
                 aggregator: Aggregator | None = None, client_dp: Any = None, seed: int = 0,
                 attack: Attack | None = None, byzantine: int = 0):
        self.group = group
        self.compressor = compressor or FP32()
        self.feedback = feedback or Feedback()
        self.aggregator = aggregator or Mean()
        self.client_dp = client_dp
        self.seed = seed
        self.attack = attack
        self.byzantine = set(range(group.world - byzantine, group.world)) if attack is not None else set()
        self.memory: dict[str, dict[str, torch.Tensor]] = {}   # "<stream>/<rank>" → that worker's memory
        self.shared: dict[str, dict[str, torch.Tensor]] = {}   # "<stream>" → state every worker shares
        self.aggregator_state: dict[str, dict[str, torch.Tensor]] = {}  # "<stream>" → a stateful aggregator's

    def mean_(self, per_worker: list[list[torch.Tensor]], *, key: str, step: int, wait: bool = True) -> float:
        """Replace every local worker's tensors by the round's aggregate.

        ``per_worker[i]`` are local worker ``group.local[i]``'s tensors (same shapes on every worker);
        ``key`` names the stream (state is kept per stream), ``step`` the training step. The collective
        starts when the slowest worker arrives; returns the simulated time at which it completes. With
        ``wait=False`` the clocks are not advanced (the caller overlaps it and calls ``group.wait_until``).
        """
        group = self.group
        if len(per_worker) != len(group.local):
            raise ValueError(f"expected tensors of {len(group.local)} local workers, got {len(per_worker)}")
        slot = Slot(key, step, self.seed, tuple(t.shape for t in per_worker[0]), group.world)
        if self.client_dp is not None:
            self.client_dp.clip_round(per_worker, group.local, step)
        flats = [flatten(ts) for ts in per_worker]
        n = flats[0].numel()
        honest = None
        if self.attack is not None and self.attack.omniscient:
            every = group.gather_payloads([[x] for x in flats])
            honest = [p[0] for r, p in enumerate(every) if r not in self.byzantine]
        payloads, msgs = [], []
        for rank, x in zip(group.local, flats, strict=True):
            memory = self.memory.setdefault(f"{key}/{rank}", {})
            msg = self.feedback.message(x, memory)
            if rank in self.byzantine:
                msg = self.attack(msg, honest, slot, rank)
            payload = (self.compressor.encode(msg, slot, rank, memory=memory) if self.compressor.stateful
                       else self.compressor.encode(msg, slot, rank))
            if self.feedback.needs_own_decode:
                self.feedback.sent(msg, self.compressor.decode(payload, n, slot, rank), memory)
            payloads.append(payload)
            msgs.append(msg)
        rule = self.aggregator.bind(slot, self.aggregator_state.setdefault(key, {}))
        aggregate, sent, secs = self.compressor.communicate(payloads, group, n, slot, rule)
        if not bool(torch.isfinite(aggregate).all()):  # one reduction per round; the search only on failure
            raise self._non_finite(aggregate, msgs, slot)
        aggregate = self.feedback.result(aggregate, self.shared.setdefault(key, {}))
        for rank, ts in zip(group.local, per_worker, strict=True):  # a per-rank rule: row r for rank r
            unflatten_into(aggregate[rank] if self.aggregator.per_rank else aggregate, ts)
        if self.client_dp is not None:
            self.client_dp.finish_round(per_worker, step)
        return group.charge(sent, secs, wait)

    def _non_finite(self, aggregate: torch.Tensor, msgs: list[torch.Tensor], slot: Slot) -> NonFiniteError:
        """The error for a non-finite aggregate, naming the workers whose vector was not finite (their flags
        are gathered, so every process raises the same error)."""
        flags = [torch.tensor([0.0 if bool(torch.isfinite(m).all()) else 1.0], device=m.device) for m in msgs]
        every = self.group.gather_payloads([[f] for f in flags])
        ranks = [r for r, p in enumerate(every) if float(p[0][0]) > 0]
        value = float(aggregate[~torch.isfinite(aggregate)][0])
        return NonFiniteError(slot.step, slot.key, ranks, sorted(self.byzantine), self.aggregator.name, value,
                              self.aggregator.linear)

    def state_dict(self) -> dict[str, Any]:
        def copy(d):
            return {k: {n: t.clone() for n, t in v.items()} for k, v in d.items()}
        out = {"memory": copy(self.memory), "shared": copy(self.shared)}
        if self.aggregator.stateful:
            out["aggregator"] = copy(self.aggregator_state)
        if self.attack is not None and self.attack.state_dict():
            out["attack"] = self.attack.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = {k: dict(v) for k, v in state.get("memory", {}).items()}
        self.shared = {k: dict(v) for k, v in state.get("shared", {}).items()}
        self.aggregator_state = {k: dict(v) for k, v in state.get("aggregator", {}).items()}
        if self.attack is not None:
            self.attack.load_state_dict(state.get("attack", {}))


class NonFiniteError(SgdlabError, RuntimeError):
    """A round's aggregate is not finite (NaN or Inf): raised before it reaches any model."""

    def __init__(self, step: int, key: str, ranks: list[int], byzantine: list[int], aggregator: str, value: float,
                 linear: bool = True):
        self.step, self.key, self.ranks, self.value = step, key, ranks, value
        if ranks:
            names = ", ".join(f"{r}{' (Byzantine)' if r in byzantine else ''}" for r in ranks)
            who = f"worker{'s' if len(ranks) > 1 else ''} {names} sent NaN/Inf values"
        else:
            who = "every worker's vector is finite, but they overflow float32 together"
        self.what = f"the {aggregator} of the workers' vectors ({who})"
        if not ranks:
            self.hint = "Try a smaller --lr or --grad-clip."
        elif linear:
            self.hint = "A robust aggregator (--aggregate, see `sgdlab list aggregators -v`) discards such vectors."
        else:
            self.hint = f"aggregate={aggregator} let them through: it tolerates fewer Byzantine workers than this."
        super().__init__(f"exchange {key!r} at step {step}: {self.what} is {value}. {self.hint}")
