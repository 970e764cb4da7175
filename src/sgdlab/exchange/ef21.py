"""``ef21``: EF21 (Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback", NeurIPS 2021, arXiv:2106.05203).

Each worker i keeps an estimate gᵢ of its vector, and every worker keeps the same aggregate g = mean gᵢ
(both zero at the start, per stream). Each round, with its vector xᵢ (a gradient ∇fᵢ in ``ddp``; an update
θ − θᵢ in ``localsgd``/``diloco``)::

    cᵢ = C(xᵢ − gᵢ)             the message: only the change of its estimate, compressed
    gᵢ ← gᵢ + D(cᵢ)             (D: the compressor's decode)
    g  ← g + mean_i D(cᵢ)       the aggregate the collective returns, added to the shared g

and the strategy receives g (so ``ddp`` steps θ ← θ − γ g, the paper's x^{t+1} = x^t − γ g^t with the
gradient of this step already folded into g). The first round sends C(xᵢ), the paper's g_i^0 = C(∇f_i(x^0)).
``g = mean gᵢ`` holds at every round up to float rounding (the sum of the means is not bit-for-bit the mean
of the sums) when the aggregate is the mean of the decoded messages; with the low-precision formats the
averaged chunks are quantised once more, so g then differs from mean gᵢ by that rounding. gᵢ is in the
per-worker ``memory``, g in the ``shared`` state: both are checkpointed. No options.
"""

from __future__ import annotations

import torch

from .base import Feedback


class EF21(Feedback):
    name = "ef21"
    description = "EF21: send C(x - g_i), g_i += decoded, every worker keeps g = mean g_i (Richtarik et al. 2021)"

    def message(self, x: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        return x - memory["g"] if "g" in memory else x

    def sent(self, message: torch.Tensor, decoded: torch.Tensor, memory: dict[str, torch.Tensor]) -> None:
        memory["g"] = memory["g"] + decoded if "g" in memory else decoded.clone()

    def result(self, aggregate: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        shared["g"] = shared["g"] + aggregate if "g" in shared else aggregate.clone()
        return shared["g"].clone()
