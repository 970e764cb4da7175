"""``diloco``: Distributed Low-Communication training (SCOPE D3).

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023
(arXiv:2311.08105), Algorithm 1. Every worker starts a round from the global parameters θ and takes H
steps of its inner optimizer (default AdamW) on its own data, reaching θ_i. Then

    Δ = (1/N) Σ_i (θ − θ_i)          the averaged pseudo-gradient (one all-reduce)
    θ ← OuterOpt(θ, Δ)               the paper: SGD with Nesterov momentum 0.9, lr 0.7
    θ_i ← θ                          every worker restarts from the new global parameters

Inner optimizer state stays local to each worker; the outer state (momentum) is computed identically
on every worker. With outer SGD, lr 1 and no momentum this is Local SGD; with one worker it is plain
training with a lookahead-like outer step. The paper uses H = 500; ``sync_every`` defaults to 50 for
sgdlab's small runs. With client-level DP (``--dp unit=client,...``) Δ is the clipped, noised average of
:mod:`sgdlab.privacy.client` (DP-FedAvg with an outer optimizer).

Sync rule (``sync_rule``, :mod:`.qsr`): ``"fixed"`` (every H steps) or ``"qsr,alpha=A"``, the Quadratic
Synchronization Rule (Gu et al., 2023): each round lasts max(H, ⌊(α/η)²⌋) steps at the round's inner LR η.

Buffers (``buffers``, default ``"average"``): at each sync the model's floating buffers (BatchNorm running
statistics) are averaged exactly over workers (``"broadcast"``: rank 0's; ``"local"``: not synchronised),
outside the pseudo-gradient exchange and without an outer step; the evaluated model takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import optim
from ..errors import ConfigError, check_range
from .base import GlobalModelMixin, Strategy, Worker, check_buffers, check_precision
from .qsr import SYNC_RULE_HELP, SyncSchedule, check_rule


@dataclass
class DiLoCoOptions:
    sync_every: int = 50                    # H: inner steps per round
    outer_optimizer: str = "sgd"
    outer_lr: float = 0.7
    outer_args: dict | None = None          # default for sgd: momentum 0.9, nesterov true (the paper)
    precision: str = "fp32"                 # precision of the pseudo-gradient exchange
    buffers: str = "average"                # average | broadcast | local: floating buffers at each sync
    sync_rule: str = field(default="fixed", metadata={"help": SYNC_RULE_HELP})  # fixed | qsr,alpha=A[,gamma=G]

    def validate(self) -> None:
        check_range("sync_every", self.sync_every, low=1, integer=True)
        check_range("outer_lr", self.outer_lr, low=0)
        check_precision(self.precision)
        check_buffers(self.buffers)
        check_rule(self.sync_rule)
        optim.registry.entry(self.outer_optimizer)
        hp = optim.hyperparameters(self.outer_optimizer)
        unknown = sorted(set(self.resolved_outer_args()) - set(hp))
        if unknown:
            raise ConfigError(f"outer_args: optimizer {self.outer_optimizer!r} has no hyperparameter "
                              f"{unknown[0]!r}; valid: {', '.join(sorted(hp))}")

    def resolved_outer_args(self) -> dict[str, Any]:
        if self.outer_args is not None:
            return dict(self.outer_args)
        return {"momentum": 0.9, "nesterov": True} if self.outer_optimizer == "sgd" else {}


def make_outer(options: DiLoCoOptions, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return optim.create(options.outer_optimizer, params, lr=options.outer_lr, **options.resolved_outer_args())


def outer_step(outer: torch.optim.Optimizer, global_params: list[torch.Tensor], delta: list[torch.Tensor]) -> None:
    """θ ← OuterOpt(θ, Δ) with Δ used as θ's gradient."""
    for g, d in zip(global_params, delta, strict=True):
        g.grad = d
    outer.step()
    for g in global_params:
        g.grad = None


class DiLoCo(GlobalModelMixin, Strategy):
    name = "diloco"
    description = ("DiLoCo: H inner steps, averaged pseudo-gradient, Nesterov outer step "
                   "(Douillard et al., 2023)")
    Options = DiLoCoOptions
    supports_client_dp = True

    def setup(self, workers: list[Worker]) -> None:
        self.init_global(workers)
        self.outer = make_outer(self.options, self.global_params)
        o = self.options
        self.schedule = SyncSchedule(o.sync_rule, o.sync_every, self.total_steps, self.warmup_steps)
        self.schedule.start(0, workers)

    def after_step(self, workers: list[Worker], step: int) -> None:
        if not self.schedule.due(step):
            return
        deltas = self.pseudo_gradients(workers)
        self.exchange.mean_(deltas, key="delta", step=step)
        outer_step(self.outer, self.global_params, deltas[0])
        self.restart_from_global(workers)
        self.sync_buffers(workers)
        self.schedule.start(step, workers)

    def metrics(self) -> dict[str, float]:
        return self.schedule.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "outer": self.outer.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.outer.load_state_dict(state["outer"])
        if "schedule" in state:  # absent in checkpoints before sync rules
            self.schedule.load_state_dict(state["schedule"])
