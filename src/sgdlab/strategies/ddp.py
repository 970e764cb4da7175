"""``ddp``: synchronous data-parallel SGD (SCOPE D1).

Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017 (arXiv:1706.02677).
Every step, each worker's gradient is averaged over the N workers (one all-reduce of the gradient,
``2(N-1)/N · 4P`` bytes per worker for P fp32 parameters) and every worker takes the same optimizer
step, so the replicas stay identical: SGD on a batch N times larger.

LR scaling (off by default): ``lr_scaling="linear"`` multiplies the learning rate by N (the paper's
linear scaling rule; pair it with gradual warm-up, ``--warmup-steps``, as the paper does over its first
5 epochs); ``"sqrt"`` multiplies by √N, the square-root rule usually used for Adam-type optimizers.

Buffers (``buffers``): after every step the model's floating buffers (BatchNorm running statistics) are
made equal on every worker, exactly and outside the gradient exchange: ``"average"`` (default) takes their
mean over workers (one all-reduce, ``2(N-1)/N · 4B`` bytes for B fp32 buffer elements), ``"broadcast"``
rank 0's (``DistributedDataParallel``'s ``broadcast_buffers``; ``(N-1)/N · 4B`` bytes on average),
``"local"`` leaves every worker its own (no bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, UnknownNameError
from ..optim import protocol
from .base import Strategy, Worker, check_buffers, check_precision


@dataclass
class DDPOptions:
    lr_scaling: str = "none"  # none | linear | sqrt
    precision: str = "fp32"   # precision of the gradient exchange
    buffers: str = "average"  # average | broadcast | local: floating buffers after every step

    def validate(self) -> None:
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise UnknownNameError("lr_scaling", self.lr_scaling, ["none", "linear", "sqrt"])
        check_precision(self.precision)
        check_buffers(self.buffers)


class DDP(Strategy):
    name = "ddp"
    description = "synchronous data-parallel SGD: gradients averaged every step (Goyal et al., 2017)"
    Options = DDPOptions

    def lr_multiplier(self) -> float:
        n = self.group.world
        return {"none": 1.0, "linear": float(n), "sqrt": math.sqrt(n)}[self.options.lr_scaling]

    def setup(self, workers: list[Worker]) -> None:
        need = protocol.needs(workers[0].optimizer) if workers[0].optimizer is not None else None
        if self.group.world > 1 and need is not None and not need.plain:
            raise ConfigError(
                f"strategy ddp averages the gradient of the ordinary backward only; optimizer "
                f"{type(workers[0].optimizer).__name__} needs {need.describe()}, which each worker would compute "
                "on its own batch, so the replicas would drift apart. Use localsgd or diloco (workers train on "
                "their own between rounds) or an optimizer that needs only backward(); step()")

    def after_backward(self, workers: list[Worker], step: int) -> None:
        grads = []
        for w in workers:
            for p in w.params:
                if p.grad is None:  # keep every worker's message the same shape
                    p.grad = torch.zeros_like(p)
            grads.append([p.grad for p in w.params])
        self.exchange.mean_(grads, key="grad", step=step)

    def after_step(self, workers: list[Worker], step: int) -> None:
        self.sync_buffers(workers)
