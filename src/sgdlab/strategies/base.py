"""What a strategy is: hooks around every worker's optimizer step that decide when workers talk and
what they exchange. A strategy is written once, against :class:`sgdlab.distributed.group.Group`, and
runs unchanged on the in-process simulator and on ``torch.distributed``.

Per training step the runner calls, for the workers that live in this process::

    (every worker: forward, backward)   →  strategy.after_backward(workers, step)
    (every worker: optimizer.step())    →  strategy.after_step(workers, step)

``step`` counts completed steps (1, 2, ...). Inner optimizer state stays local to each worker. A
strategy decides when to talk and what to send; it hands those tensors to ``self.exchange``
(:class:`sgdlab.exchange.Exchange`), which compresses, communicates, aggregates and applies client-level
DP as configured, so every compressor and aggregator works with every strategy.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..distributed.group import Group
from ..errors import ConfigError, UnknownNameError
from ..exchange import PRECISIONS, ExchangeSpec


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


def exchange_spec(options: Any, spec: ExchangeSpec | None = None) -> ExchangeSpec:
    """The exchange a strategy with ``options`` uses: ``spec`` if given, else its ``precision`` option."""
    precision = getattr(options, "precision", "fp32")
    if spec is None:
        return ExchangeSpec(compress=precision)
    if precision == "fp32" or spec.compress.split(",")[0].strip() == precision:
        return spec
    if spec.compress != "fp32":
        raise ConfigError(f"precision={precision!r} and compress={spec.compress!r} both choose the compressor; "
                          "give one of them")
    return dataclasses.replace(spec, compress=precision)


def check_client_dp(cls: type[Strategy], options: Any, spec: ExchangeSpec | None = None) -> None:
    """Raise ``ConfigError`` unless strategy ``cls`` with ``options`` can run client-level DP."""
    if not cls.supports_client_dp:
        raise ConfigError(f"dp unit=client (client-level DP) works with strategies localsgd and diloco, not "
                          f"{cls.name!r}")
    spec = exchange_spec(options, spec)
    if not spec.lossless:
        raise ConfigError(f"dp unit=client needs precision=fp32 and a lossless compressor (got compress="
                          f"{spec.compress!r}): quantising a clipped update could raise its norm above clip")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)


class Strategy:
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    #: Whether the strategy exchanges per-round updates that client-level DP can clip and noise.
    supports_client_dp: ClassVar[bool] = False

    def __init__(self, options: Any, group: Group, exchange: ExchangeSpec | None = None, seed: int = 0):
        self.options, self.group = options, group
        self.exchange_spec = exchange_spec(options, exchange)
        self.exchange = self.exchange_spec.build(group, seed=seed)

    def enable_client_dp(self, client_dp: Any) -> None:
        """Clip and noise every round's updates with ``client_dp`` (:mod:`sgdlab.privacy.client`)."""
        check_client_dp(type(self), self.options, self.exchange_spec)
        self.exchange.client_dp = client_dp

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
        return {"exchange": self.exchange.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exchange.load_state_dict(state.get("exchange", {}))  # absent in checkpoints before 0.2


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
        return {**super().state_dict(), "global_params": [g.clone() for g in self.global_params]}  # type: ignore[misc]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # type: ignore[misc]
        for g, s in zip(self.global_params, state["global_params"], strict=True):
            g.copy_(s)

    def pseudo_gradients(self, workers: list[Worker], indices: list[int] | None = None) -> list[list[torch.Tensor]]:
        """Every local worker's θ − θ_i (of the parameters at ``indices``, default all)."""
        idx = range(len(self.global_params)) if indices is None else indices
        return [[self.global_params[i] - w.params[i].detach() for i in idx] for w in workers]

    def restart_from_global(self, workers: list[Worker]) -> None:
        """θ_i ← θ on every local worker."""
        with torch.no_grad():
            for w in workers:
                torch._foreach_copy_([p.data for p in w.params], self.global_params)
