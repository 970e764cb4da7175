"""``onebit``: 1-bit quantisation with per-sign means (1-bit SGD; Seide, Fu, Droppo, Li and Yu, "1-Bit
Stochastic Gradient Descent and its Application to Data-Parallel Distributed Training of Speech DNNs",
Interspeech 2014).

Update rule, per tensor: each element is sent as one bit, its sign (threshold 0; a zero counts as
positive), and it is reconstructed as the mean of the tensor's elements on its side::

    μ₊ = mean{x_k : x_k ≥ 0},   μ₋ = mean{x_k : x_k < 0},   C(x)_k = μ₊ if x_k ≥ 0 else μ₋

(an empty side's mean is 0). The paper quantises with error feedback ("delta-sigma" residual carried to
the next minibatch): use ``feedback=ef``; without it the compressor is biased. Differences from the paper
and CNTK's implementation: the two reconstruction values are per tensor here, there per column of each
weight matrix; one segment when the tensor shapes are unknown.

Encoding: one bit per element, packed 8 per byte (``⌈n/8⌉`` bytes), plus two float32 means per tensor
(``8·tensors`` bytes); payloads are all-gathered and decoded by every worker in rank order.
"""

from __future__ import annotations

import torch

from . import _quant
from .base import Compressor


class OneBit(Compressor):
    name = "onebit"
    description = ("1-bit SGD (Seide et al. 2014): the sign of each element, decoded as the mean of the tensor's "
                   "positive or negative entries (two float32 per tensor); meant for feedback=ef")

    def nbytes(self, n: int, tensors: int = 1) -> int:
        return _quant.packed_bytes(n, 1) + 8 * tensors

    def encode(self, x, slot=None, rank=0):
        sizes = _quant.segments(x.numel(), slot)
        x = x.float()
        pos = x >= 0
        positive = torch.where(pos, x, 0.0)
        sum_pos = _quant.per_segment(positive, sizes, "sum")
        sum_neg = _quant.per_segment(x - positive, sizes, "sum")
        cnt_pos = _quant.per_segment(pos, sizes, "sum")
        cnt_neg = torch.tensor(sizes, device=x.device, dtype=torch.float32) - cnt_pos
        means = torch.cat([sum_pos / cnt_pos.clamp(min=1), sum_neg / cnt_neg.clamp(min=1)])
        return [_quant.pack(pos.to(torch.uint8), 1), means]

    def decode(self, payload, n, slot=None, rank=0):
        bits, means = payload
        sizes = _quant.segments(n, slot)
        pos, neg = means.view(2, -1)
        return torch.where(_quant.unpack(bits, 1, n).bool(), _quant.spread(pos, sizes), _quant.spread(neg, sizes))
