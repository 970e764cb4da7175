"""``localsgd``: Local SGD / FedAvg (SCOPE D2).

Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019 (arXiv:1805.09767); McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017 (FedAvg).
Each worker takes H steps of its inner optimizer on its own data; then the parameters are averaged
over workers, ``θ_i ← (1/N) Σ_j θ_j`` (one all-reduce every H steps). Inner optimizer state stays local.
With H = 1 and plain SGD this is synchronous data-parallel SGD.

The round exchanges the updates ``Δ_i = θ − θ_i`` and sets ``θ ← θ − Δ`` with ``Δ`` their aggregate:
the same average (up to rounding), and what a compressor, an aggregator or client-level DP
(``--dp unit=client,...``, :mod:`sgdlab.privacy.client`; DP-FedAvg) must act on — an update, not the
parameters themselves.

Sync rule (``sync_rule``, :mod:`.qsr`): ``"fixed"`` (every H steps) or ``"qsr,alpha=A"``, the Quadratic
Synchronization Rule (Gu et al., 2023): each round lasts max(H, ⌊(α/η)²⌋) steps at the round's inner LR η.

Buffers (``buffers``, default ``"average"``): at each sync the model's floating buffers (BatchNorm running
statistics) are averaged exactly over workers (``"broadcast"``: rank 0's; ``"local"``: not synchronised),
outside the update exchange; the evaluated model takes the synchronised buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import check_range
from .base import GlobalModelMixin, Strategy, Worker, check_buffers, check_precision
from .qsr import SYNC_RULE_HELP, SyncSchedule, check_rule


@dataclass
class LocalSGDOptions:
    sync_every: int = 50      # H: local steps between averages
    precision: str = "fp32"   # precision of the update exchange
    buffers: str = "average"  # average | broadcast | local: floating buffers at each sync
    sync_rule: str = field(default="fixed", metadata={"help": SYNC_RULE_HELP})  # fixed | qsr,alpha=A[,gamma=G]

    def validate(self) -> None:
        check_range("sync_every", self.sync_every, low=1, integer=True)
        check_precision(self.precision)
        check_buffers(self.buffers)
        check_rule(self.sync_rule)


def average_parameters(strategy: Any, workers: list[Worker], step: int) -> None:
    """One round's end: θ ← θ − mean_i(θ − θ_i), every worker restarts from θ, buffers synchronised
    (``strategy``: a :class:`GlobalModelMixin` strategy; also DES-LOC's parameter sync)."""
    updates = strategy.pseudo_gradients(workers)
    strategy.exchange.mean_(updates, key="delta", step=step)
    torch._foreach_sub_(strategy.global_params, updates[0])
    strategy.restart_from_global(workers)
    strategy.sync_buffers(workers)


class LocalSGD(GlobalModelMixin, Strategy):
    name = "localsgd"
    description = "Local SGD / FedAvg: H local steps, then parameter averaging (Stich, 2019)"
    Options = LocalSGDOptions
    supports_client_dp = True

    def setup(self, workers: list[Worker]) -> None:
        self.init_global(workers)
        o = self.options
        self.schedule = SyncSchedule(o.sync_rule, o.sync_every, self.total_steps, self.warmup_steps)
        self.schedule.start(0, workers)

    def after_step(self, workers: list[Worker], step: int) -> None:
        if not self.schedule.due(step):
            return
        self.average(workers, step)
        self.schedule.start(step, workers)

    def average(self, workers: list[Worker], step: int) -> None:
        average_parameters(self, workers, step)

    def metrics(self) -> dict[str, float]:
        return self.schedule.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "schedule" in state:  # absent in checkpoints before sync rules
            self.schedule.load_state_dict(state["schedule"])
