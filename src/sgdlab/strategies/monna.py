"""``monna``: MoNNA, local Polyak momentum + nearest-neighbour averaging of the models (decentralised).

Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative Learning with Linear Gradient
Overhead", ICML 2023 (arXiv:2209.10931). There is no server: every worker i keeps its own model θ_i and

    m_i ← β m_i + (1 − β) g_i,        θ_i^{t+1/2} = θ_i − γ m_i          (local momentum step)
    θ_i^{t+1} = (1/(n − f)) Σ_{j ∈ N_i} θ_j^{t+1/2}                      (nearest-neighbour averaging)

where N_i are the n − f half-step models nearest (Euclidean) to worker i's own, its own included (ties
to the lower rank): the row i of nearest-neighbour mixing (:mod:`sgdlab.exchange.nnm`). Defined for
n > 2f. The local step is the inner optimizer's: the paper's is ``--optimizer sgd --set momentum=0.99
--set dampening=0.99`` (torch's SGD starts the buffer at g_1 instead of (1 − β) g_1; any other optimizer
works too). The paper's experiments (MNIST, n = 26): β = 0.99, lr 0.75 with hyperbolic decay, batch 25.

How the exchange does it: every step the workers' half-step models are all-gathered (the bytes of an
all-gather of the models are counted) and the exchange's aggregator is a *per-rank* rule that returns one
vector per worker, row i going to worker i; on ``torch`` each process computes all rows and keeps its own.
The paper's algorithm tolerates missing messages: a worker waits for n − f models and averages the n − 2f
nearest; here every worker receives all n models (synchronous) and averages n − f, as ByzFL's
``MoNNA(f, idx)``. The reference code (LPD-EPFL/robust-collaborative-learning, ``peerToPeer.py`` with the
``cva`` rule) simulates that by giving each honest worker a random subset of n − 2f honest models plus
all Byzantine ones. Byzantine workers (``--byzantine``, the last ranks) send the attack of their model.
Buffers (BatchNorm statistics) stay each worker's own; the evaluated model is worker 0's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, check_range
from ..exchange import PRECISIONS, Aggregator, ExchangeSpec
from ..exchange._robust import check_f, stack
from ..exchange.nnm import mix
from .base import Strategy, Worker, check_precision


@dataclass
class MoNNAOptions:
    f: int = field(default=1, metadata={"help": "Byzantine workers tolerated: each worker averages the n - f "
                                                "models nearest its own"})
    precision: str = "fp32"  # precision of the exchanged models

    def validate(self) -> None:
        check_range("monna f", self.f, low=0, integer=True)
        check_precision(self.precision)


@dataclass
class _NNAOptions:
    f: int = 1


class NearestNeighbourAveraging(Aggregator):
    """Per rank: row i is the mean of the n − f vectors nearest to vector i (NNM's row i)."""

    name = "nna"
    description = "per worker: the mean of the n-f vectors nearest its own"
    Options = _NNAOptions
    per_rank = True

    def check_workers(self, n: int) -> None:
        check_f("strategy monna", self.options.f, n, n > 2 * self.options.f, "n > 2f")

    def __call__(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return mix(stack(vectors), self.options.f)


class MoNNA(Strategy):
    name = "monna"
    description = "MoNNA: local momentum steps + nearest-neighbour averaging of models, decentralised (2023)"
    Options = MoNNAOptions

    def __init__(self, options, group, exchange: ExchangeSpec | None = None, seed: int = 0):
        super().__init__(options, group, exchange, seed)
        spec = self.exchange_spec
        if spec.aggregate.split(",")[0].strip() != "mean" or spec.pre_aggregate is not None:
            raise ConfigError(f"strategy monna mixes models by nearest-neighbour averaging (its option f); "
                              f"aggregate={spec.aggregate!r}, pre_aggregate={spec.pre_aggregate!r} do not apply: "
                              "leave them unset")
        compressor, fb, _ = spec.stages()
        if compressor.name not in PRECISIONS or fb.name != "none":
            raise ConfigError(f"strategy monna exchanges models, not updates: compress={spec.compress!r} is not "
                              f"allowed; allowed: one of {', '.join(PRECISIONS)} without feedback")
        rule = NearestNeighbourAveraging(_NNAOptions(options.f))
        rule.check_workers(group.world)
        self.exchange.aggregator = rule

    def after_step(self, workers: list[Worker], step: int) -> None:
        with torch.no_grad():
            self.exchange.mean_([w.params for w in workers], key="params", step=step)
