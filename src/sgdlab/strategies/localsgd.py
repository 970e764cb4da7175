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

Buffers (``buffers``, default ``"average"``): at each sync the model's floating buffers (BatchNorm running
statistics) are averaged exactly over workers (``"broadcast"``: rank 0's; ``"local"``: not synchronised),
outside the update exchange; the evaluated model takes the synchronised buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from .base import GlobalModelMixin, Strategy, Worker, check_buffers, check_precision


@dataclass
class LocalSGDOptions:
    sync_every: int = 50      # H: local steps between averages
    precision: str = "fp32"   # precision of the update exchange
    buffers: str = "average"  # average | broadcast | local: floating buffers at each sync

    def validate(self) -> None:
        check_range("sync_every", self.sync_every, low=1, integer=True)
        check_precision(self.precision)
        check_buffers(self.buffers)


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
        updates = self.pseudo_gradients(workers)
        self.exchange.mean_(updates, key="delta", step=step)
        torch._foreach_sub_(self.global_params, updates[0])
        self.restart_from_global(workers)
        self.sync_buffers(workers)
