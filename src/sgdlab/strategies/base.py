"""What a strategy is: hooks around every worker's optimizer step that decide when workers talk and
what they exchange. A strategy is written once, against :class:`sgdlab.distributed.group.Group`, and
runs unchanged on the in-process simulator and on ``torch.distributed``.

Per training step the runner calls, for the workers that live in this process::

    (every worker: forward, backward)   →  strategy.after_backward(workers, step)
    (every worker: optimizer.step())    →  strategy.after_step(workers, step)

``step`` counts completed steps (1, 2, ...). Inner optimizer state stays local to each worker.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..distributed.compress import PRECISIONS, Codec
from ..distributed.group import Group
from ..errors import ConfigError, UnknownNameError


@dataclass
class Worker:
    """One replica: its model, its parameters (in ``model.parameters()`` order) and inner optimizer."""

    rank: int
    model: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())


@dataclass
class NoOptions:
    pass


def check_client_dp(cls: type[Strategy], options: Any) -> None:
    """Raise ``ConfigError`` unless strategy ``cls`` with ``options`` can run client-level DP."""
    if not cls.supports_client_dp:
        raise ConfigError(f"dp unit=client (client-level DP) works with strategies localsgd and diloco, not "
                          f"{cls.name!r}")
    precision = getattr(options, "precision", "fp32")
    if precision != "fp32":
        raise ConfigError(f"dp unit=client needs precision=fp32 (got {precision!r}): quantising a clipped update "
                          "could raise its norm above clip")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)


class Strategy:
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    #: Whether the strategy exchanges per-round updates that client-level DP can clip and noise.
    supports_client_dp: ClassVar[bool] = False

    def __init__(self, options: Any, group: Group):
        self.options, self.group = options, group
        self.codec = Codec(getattr(options, "precision", "fp32"))
        self.client_dp: Any = None  # a sgdlab.privacy.client.ClientDP, set by enable_client_dp

    def enable_client_dp(self, client_dp: Any) -> None:
        """Clip and noise every round's updates with ``client_dp`` (:mod:`sgdlab.privacy.client`)."""
        check_client_dp(type(self), self.options)
        self.client_dp = client_dp

    def average_updates(self, updates: list[list[torch.Tensor]], step: int) -> list[torch.Tensor]:
        """The averaged update of a round: the mean over workers, or with client-level DP the clipped,
        noised estimate. ``updates[i]`` are local worker i's tensors (overwritten)."""
        if self.client_dp is None:
            self.group.all_reduce_mean(updates, self.codec)
            return updates[0]
        return self.client_dp.aggregate(self.group, updates, step // self.options.sync_every, self.codec)

    def lr_multiplier(self) -> float:
        """Factor applied to the inner learning rate (e.g. linear scaling for large batches)."""
        return 1.0

    def setup(self, workers: list[Worker]) -> None:
        pass

    def after_backward(self, workers: list[Worker], step: int) -> None:
        pass

    def after_step(self, workers: list[Worker], step: int) -> None:
        pass

    def eval_model(self, workers: list[Worker]) -> nn.Module:
        """The model that represents the run at this point (what is evaluated and reported)."""
        return workers[0].model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GlobalModelMixin:
    """Keeps ``self.global_params``, the last synchronised parameters, and a model replica to evaluate."""

    global_params: list[torch.Tensor]

    def init_global(self, workers: list[Worker]) -> None:
        self.global_params = [p.detach().clone() for p in workers[0].params]
        self._eval_model = copy.deepcopy(workers[0].model)

    def eval_model(self, workers: list[Worker]) -> nn.Module:
        with torch.no_grad():
            for p, g in zip(self._eval_model.parameters(), self.global_params, strict=True):
                p.copy_(g)
        return self._eval_model

    def state_dict(self) -> dict[str, Any]:
        return {"global_params": [g.clone() for g in self.global_params]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g, s in zip(self.global_params, state["global_params"], strict=True):
            g.copy_(s)
