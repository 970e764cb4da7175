"""A task with BatchNorm for the buffer tests (tests/test_buffers.py, tests/buffers_script.py): digits with a
BatchNorm MLP, and the run configuration both backends use."""

import torch
from torch import nn

from sgdlab import Config
from sgdlab.tasks.digits import Digits, DigitsOptions


class BNDigits(Digits):
    """digits with a BatchNorm MLP (running mean and variance: 16 + 16 floating buffer elements)."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).to(self.device)


def bn_task() -> BNDigits:
    return BNDigits(DigitsOptions(), torch.device("cpu"))


#: runner configurations: ddp, and localsgd whose last step is a sync; different data per worker
RUNS = {"ddp": {}, "localsgd": {"sync_every": 2}}


def bn_config(strategy: str, out: str, **kw) -> Config:
    return Config(task="digits", optimizer="sgd", lr=0.05, steps=4, batch_size=16, eval_every=4, log_every=1,
                  device="cpu", step_time=0.01, strategy=strategy, workers=2, strategy_args=RUNS[strategy],
                  data_split="dirichlet:0.3", out=out, **kw)
