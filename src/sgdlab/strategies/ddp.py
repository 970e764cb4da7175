"""``ddp``: synchronous data-parallel SGD (SCOPE D1).

Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017 (arXiv:1706.02677).
Every step, each worker's gradient is averaged over the N workers (one all-reduce of the gradient,
``2(N-1)/N · 4P`` bytes per worker for P fp32 parameters) and every worker takes the same optimizer
step, so the replicas stay identical: SGD on a batch N times larger.

LR scaling (off by default): ``lr_scaling="linear"`` multiplies the learning rate by N (the paper's
linear scaling rule; pair it with gradual warm-up, ``--warmup-steps``, as the paper does over its first
5 epochs); ``"sqrt"`` multiplies by √N, the square-root rule usually used for Adam-type optimizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnknownNameError
from .base import Strategy, Worker, check_precision


@dataclass
class DDPOptions:
    lr_scaling: str = "none"  # none | linear | sqrt
    precision: str = "fp32"   # precision of the gradient exchange

    def validate(self) -> None:
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise UnknownNameError("lr_scaling", self.lr_scaling, ["none", "linear", "sqrt"])
        check_precision(self.precision)


class DDP(Strategy):
    name = "ddp"
    description = "synchronous data-parallel SGD: gradients averaged every step (Goyal et al., 2017)"
    Options = DDPOptions

    def lr_multiplier(self) -> float:
        n = self.group.world
        return {"none": 1.0, "linear": float(n), "sqrt": math.sqrt(n)}[self.options.lr_scaling]

    def after_backward(self, workers: list[Worker], step: int) -> None:
        grads = []
        for w in workers:
            for p in w.params:
                if p.grad is None:  # keep every worker's message the same shape
                    p.grad = torch.zeros_like(p)
            grads.append([p.grad for p in w.params])
        self.exchange.mean_(grads, key="grad", step=step)
