"""``localsgd``: Local SGD / FedAvg (SCOPE D2).

Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019 (arXiv:1805.09767); McMahan et al.,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017 (FedAvg).
Each worker takes H steps of its inner optimizer on its own data; then the parameters are averaged
over workers, ``θ_i ← (1/N) Σ_j θ_j`` (one all-reduce every H steps). Inner optimizer state stays local.
With H = 1 and plain SGD this is exactly synchronous data-parallel SGD.

With client-level DP (``--dp unit=client,...``, :mod:`sgdlab.privacy.client`) the round instead exchanges
the updates ``Δ_i = θ − θ_i`` and sets ``θ ← θ − Δ̃`` with ``Δ̃`` their clipped, noised average
(DP-FedAvg); without noise and clipping that is the same average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from .base import GlobalModelMixin, Strategy, Worker, check_precision


@dataclass
class LocalSGDOptions:
    sync_every: int = 50      # H: local steps between averages
    precision: str = "fp32"   # precision of the parameter exchange

    def validate(self) -> None:
        check_range("sync_every", self.sync_every, low=1, integer=True)
        check_precision(self.precision)


class LocalSGD(GlobalModelMixin, Strategy):
    name = "localsgd"
    description = "Local SGD / FedAvg: H local steps, then parameter averaging (Stich, 2019)"
    Options = LocalSGDOptions
    supports_client_dp = True

    def setup(self, workers: list[Worker]) -> None:
        self.init_global(workers)

    def after_step(self, workers: list[Worker], step: int) -> None:
        if step % self.options.sync_every:
            return
        if self.client_dp is not None:
            updates = [[g - p.detach() for g, p in zip(self.global_params, w.params, strict=True)] for w in workers]
            torch._foreach_sub_(self.global_params, self.average_updates(updates, step))
            with torch.no_grad():
                for w in workers:
                    torch._foreach_copy_([p.data for p in w.params], self.global_params)
            return
        params = [[p.data for p in w.params] for w in workers]
        self.group.all_reduce_mean(params, self.codec)
        for g, p in zip(self.global_params, workers[0].params, strict=True):
            g.copy_(p.data)
