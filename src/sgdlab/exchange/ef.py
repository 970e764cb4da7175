"""``ef``: error feedback with residual memory (Seide et al., "1-Bit Stochastic Gradient Descent and its
Application to Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014; Karimireddy et al.,
"Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019, arXiv:1901.09847).

Each worker i keeps the residual eᵢ (zero at the start) of every stream and, each round, with its vector xᵢ
(a gradient in ``ddp``, an update θ − θᵢ in ``localsgd``/``diloco``)::

    mᵢ = xᵢ + eᵢ                 the message it compresses
    eᵢ ← mᵢ − D(C(mᵢ))          what its message lost (D(C(·)): the compressor's encode then decode)

and the strategy receives the aggregate of the D(C(mᵢ)). So ``xᵢ + old eᵢ = sent + new eᵢ`` exactly
(for every compressor here the subtraction is exact in float32: a decoded value is 0, the value itself or
within a factor 2 of it). The residual is kept in the units of the exchanged vector, before the optimizer's
learning rate (Seide's form); Karimireddy et al. compress γ·g + e, which is the same for a constant γ.
No options. Selectable for every lossy compressor: ``--compress NAME,...,feedback=ef``.
"""

from __future__ import annotations

import torch

from .base import Feedback


class ErrorFeedback(Feedback):
    name = "ef"
    description = "residual memory: compress x + e, keep e = (x + e) - decoded (Seide 2014; Karimireddy 2019)"

    def message(self, x: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        return x + memory["e"] if "e" in memory else x

    def sent(self, message: torch.Tensor, decoded: torch.Tensor, memory: dict[str, torch.Tensor]) -> None:
        memory["e"] = message - decoded
