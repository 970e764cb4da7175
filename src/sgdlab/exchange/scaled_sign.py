"""``scaled_sign``: the scaled sign compressor of EF-signSGD, C(x) = (‖x‖₁ / d)·sign(x) (Karimireddy,
Rebjock, Stich and Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML
2019, arXiv:1901.09847).

Update rule: C(x) = (‖x‖₁ / d)·sign(x) for a vector x of d elements; the paper's EF-signSGD wraps it in
error feedback, p = η·g + e, Δ = C(p), e ← p − Δ, x ← x − Δ (``feedback=ef``; the same compressor works
with the default feedback too, then it is scaled signSGD without memory, biased). Here the scale is per
tensor (``layerwise``, default on; as GRACE's efsignsgd and most implementations do); with
``layerwise=false``, or when the tensor shapes are unknown, one scale for the whole vector, as in the
paper's analysis. The paper's learning rate η sits in the strategy's optimizer: C is positively
homogeneous, C(η·p) = η·C(p), so with plain SGD at a constant η compressing g + e and stepping by η is
the paper's rule exactly (the memory holds e/η).
A zero element is sent as +1 (one bit has no third value).

Encoding: one bit per element (1 for ≥ 0), packed 8 per byte (``⌈n/8⌉`` bytes), plus one float32
scale per tensor; payloads are all-gathered and decoded by every worker in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _quant
from .base import Compressor


@dataclass
class ScaledSignOptions:
    layerwise: bool = True   # one scale ‖x‖₁/d per tensor (false: one for the whole vector)


class ScaledSign(Compressor):
    name = "scaled_sign"
    description = ("scaled sign (Karimireddy et al. 2019, EF-signSGD's compressor): ‖x‖₁/d · sign(x) per tensor, "
                   "1 bit per element + one float32 scale per tensor; meant for feedback=ef")
    Options = ScaledSignOptions

    def nbytes(self, n: int, tensors: int = 1) -> int:
        return _quant.packed_bytes(n, 1) + 4 * tensors

    def encode(self, x, slot=None, rank=0):
        sizes = _quant.segments(x.numel(), slot, self.options.layerwise)
        scale = _quant.per_segment(x.float().abs(), sizes, "sum") / torch.tensor(sizes, device=x.device)
        return [_quant.sign_bits(x), scale]

    def decode(self, payload, n, slot=None, rank=0):
        bits, scale = payload
        sizes = _quant.segments(n, slot, self.options.layerwise)
        return _quant.signs(bits, n) * _quant.spread(scale, sizes)
