"""Client-level differential privacy for Local SGD and DiLoCo (SCOPE P3): ``--dp unit=client,...``.

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018
(arXiv:1710.06963), DP-FedAvg, with the fixed-denominator estimator. The protected unit is a worker (a
client) and *all* of its data: neighbouring runs differ by one worker's whole shard. Each round ``r``
(every ``H = sync_every`` inner steps):

1. **Participation**: every one of the ``N`` workers takes part independently with probability ``p``
   (``participation``). The draw comes from a generator seeded by the run's seed and ``r``, so every
   rank computes the same set ``S_r`` without talking.
2. **Clip**: a participating worker's update ``Δ_i = θ − θ_i`` (global parameters minus its parameters
   after the H local steps) is clipped as one vector: ``Δ̄_i = Δ_i · min(1, C / ‖Δ_i‖)``. Non-participants
   contribute zero.
3. **Noise and average**: ``Δ̃ = (Σ_{i∈S_r} Δ̄_i + N(0, σ² C² I)) / (p N)``. The sum is one all-reduce; the
   noise is drawn once per round from a shared generator (seeded by the seed and ``r``), i.e. added at
   aggregation. The divisor is the *expected* number of participants ``pN``, so one worker changes the
   sum by at most ``C`` whatever the others do.
4. The strategy applies ``Δ̃`` as its averaged update: Local SGD sets ``θ ← θ − Δ̃``, DiLoCo takes its
   outer step ``θ ← OuterOpt(θ, Δ̃)``; every worker restarts from the new ``θ``.

With ``σ = 0``, ``C = ∞`` and ``p = 1`` this is the strategy's ordinary average (tested). The accountant
(:mod:`sgdlab.privacy.accounting`, dp-accounting) composes ``R`` rounds of the Poisson-subsampled Gaussian
mechanism with sample rate ``p`` and noise multiplier ``σ``; ``R`` counts the rounds completed
(``step // H``). Only the global parameters are released; each worker's own parameters and inner
optimizer state never leave it.

Trust model: the noise is reproducible by every rank, which models a trusted aggregator (central DP);
against curious peers one would add secure aggregation and distributed noise, which sgdlab does not.
Non-participants still join the all-reduce with zeros (the bytes counted are those of a full round), and
they still compute their local steps; a deployment would skip both. The exchange must be lossless fp32
(quantising a clipped update could raise its norm above ``C``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import torch

from ..errors import ConfigError, check_range
from . import accounting
from .options import DPOptions


def _round_seed(seed: int, what: str, round_index: int) -> int:
    digest = hashlib.sha256(f"sgdlab-client-dp:{seed}:{what}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ClientDP:
    """The per-round mechanism and its accounting for ``num_clients`` workers.

    Args:
        noise_multiplier: σ (0 is allowed here, for tests and ablations; ε is then infinite).
        clip: C, the bound on each worker's update norm (``inf`` only with σ = 0).
        participation: p, each worker's probability of taking part in a round.
        num_clients: N, the number of workers.
        sync_every: H, inner steps per round (turns a step count into rounds for :meth:`epsilon`).
        seed: the run's seed (participation and noise derive from it and the round).
    """

    def __init__(self, *, noise_multiplier: float, clip: float, participation: float, num_clients: int,
                 sync_every: int, seed: int, delta: float = 1e-5, accountant: str = accounting.DEFAULT_ACCOUNTANT):
        check_range("noise_multiplier", noise_multiplier, low=0)
        check_range("clip", clip, low=0, low_open=True)
        if math.isinf(clip) and noise_multiplier > 0:
            raise ConfigError("clip=inf needs noise_multiplier=0 (the noise scale is σ·C)")
        check_range("participation", participation, low=0, high=1, low_open=True)
        check_range("num_clients", num_clients, low=1, integer=True)
        check_range("sync_every", sync_every, low=1, integer=True)
        self.noise_multiplier, self.clip = float(noise_multiplier), float(clip)
        self.participation = float(participation)
        self.num_clients, self.sync_every, self.seed = num_clients, sync_every, seed
        self.delta, self.accountant = delta, accountant
        self._eps: dict[int, float] = {}

    @classmethod
    def from_options(cls, options: DPOptions | str, *, num_clients: int, sync_every: int, steps: int,
                     seed: int) -> ClientDP:
        """Build from ``--dp``; ``target_epsilon`` is calibrated for the ``steps // sync_every`` rounds."""
        opts = DPOptions.parse(options) if isinstance(options, str) else options
        if opts.unit != "client":
            raise ConfigError(f"client-level DP needs unit=client in dp, got unit={opts.unit!r}")
        rounds = steps // sync_every
        if rounds < 1:
            raise ConfigError(f"client-level DP: steps={steps} < sync_every={sync_every}, so no round ends and "
                              "nothing is released; allowed: steps >= sync_every")
        if opts.delta >= 1 / num_clients:
            warnings.warn(f"dp delta={opts.delta:g} is not below 1/N = 1/{num_clients} (N workers, the protected "
                          "units): a mechanism that publishes one worker's update outright would meet it; "
                          "choose delta < 1/N", UserWarning, stacklevel=2)
        sigma = opts.noise
        if sigma is None:
            sigma = accounting.noise_multiplier(opts.target_epsilon, opts.participation, rounds, opts.delta,
                                                opts.accountant)
        return cls(noise_multiplier=sigma, clip=opts.clip, participation=opts.participation,
                   num_clients=num_clients, sync_every=sync_every, seed=seed, delta=opts.delta,
                   accountant=opts.accountant)

    # ---- the mechanism --------------------------------------------------------------------------
    def participants(self, round_index: int) -> torch.Tensor:
        """Boolean mask of the workers (by rank) that take part in round ``round_index`` (1, 2, ...)."""
        if self.participation >= 1:
            return torch.ones(self.num_clients, dtype=torch.bool)
        g = torch.Generator().manual_seed(_round_seed(self.seed, "participation", round_index))
        return torch.rand(self.num_clients, generator=g, dtype=torch.float64) < self.participation

    def noise(self, round_index: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Standard normal tensors shaped like ``like`` (drawn on the CPU, so every device agrees)."""
        g = torch.Generator().manual_seed(_round_seed(self.seed, "noise", round_index))
        return [torch.randn(t.shape, generator=g, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
                for t in like]

    def clip_(self, update: list[torch.Tensor]) -> float:
        """Scale ``update`` in place to norm ≤ C; returns its norm before clipping."""
        norm = float(torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(update)])))
        if norm > self.clip:
            torch._foreach_mul_(update, self.clip / norm)
        return norm

    def clip_round(self, updates: list[list[torch.Tensor]], ranks: list[int], step: int) -> None:
        """Exchange stage before the sum: clip each participant's update to C, zero the others'."""
        mask = self.participants(self.rounds(step))
        for rank, update in zip(ranks, updates, strict=True):
            if mask[rank]:
                self.clip_(update)
            else:
                torch._foreach_zero_(update)

    def finish_round(self, updates: list[list[torch.Tensor]], step: int) -> None:
        """Exchange stage after the mean (1/N) Σ_{i∈S} Δ̄_i: rescale to the expected number of participants
        and add the round's noise, in every local worker's tensors alike."""
        total = updates[0]
        n, expected = self.num_clients, self.participation * self.num_clients
        torch._foreach_mul_(total, n / expected)
        std = self.noise_multiplier * self.clip
        if std > 0:
            torch._foreach_add_(total, self.noise(self.rounds(step), total), alpha=std / expected)
        for other in updates[1:]:
            torch._foreach_copy_(other, total)

    def aggregate(self, group: Any, updates: list[list[torch.Tensor]], round_index: int) -> list[torch.Tensor]:
        """The noisy average ``Δ̃`` of round ``round_index`` of this process's workers' ``updates`` through a
        plain exchange (``updates[i]`` belongs to local worker ``group.local[i]``; they are overwritten)."""
        from ..exchange import Exchange

        Exchange(group, client_dp=self).mean_(updates, key="delta", step=round_index * self.sync_every)
        return updates[0]

    # ---- accounting -----------------------------------------------------------------------------
    def rounds(self, step: int) -> int:
        return step // self.sync_every

    def epsilon(self, step: int) -> float:
        """ε spent after ``step`` training steps (the rounds completed by then)."""
        r = self.rounds(step)
        if r not in self._eps:
            if r == 0:
                self._eps[r] = 0.0
            elif self.noise_multiplier == 0:
                self._eps[r] = math.inf
            else:
                self._eps[r] = accounting.epsilon(self.noise_multiplier, self.participation, r, self.delta,
                                                  self.accountant)
        return self._eps[r]

    def summary(self, step: int) -> dict[str, Any]:
        return {"epsilon": self.epsilon(step), "delta": self.delta, "accountant": self.accountant,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.participation,
                "dp_clip": self.clip, "dp_unit": "client", "dp_rounds": self.rounds(step)}

    def state_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier}  # the rest derives from the seed and the round

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise_multiplier = float(state["noise_multiplier"])
        self._eps.clear()
