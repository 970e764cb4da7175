"""``signsgd``: each worker sends the sign of its vector, 1 bit per element; the aggregate is the
majority vote or the mean of the signs (signSGD; Bernstein, Wang, Azizzadenesheli and Anandkumar,
"signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018, arXiv:1802.04434; Bernstein, Zhao,
Azizzadenesheli and Anandkumar, "signSGD with Majority Vote is Communication Efficient and Fault
Tolerant", ICLR 2019, arXiv:1810.05291).

Update rule (the papers' Algorithm with majority vote, M workers)::

    worker m sends   sign(g_m)                     (1 bit per element)
    vote=majority:   ĝ = sign(Σ_m sign(g_m))        (the papers' aggregate; a tie, possible only for an
                                                    even M, gives 0, torch.sign's convention)
    vote=mean:       ĝ = (1/M) Σ_m sign(g_m)        (the mean of the signs, in [−1, 1])

and the strategy's step is θ ← θ − η·ĝ: in ``ddp`` with plain SGD at learning rate η this is exactly
signSGD with majority vote (the papers' η). The exchanged vector has magnitude 1 per element whatever the
gradient's scale, so η must be chosen for sign steps (of the order of Adam's learning rates, not SGD's);
nothing rescales it. With ``localsgd``/``diloco`` the round's update θ − θᵢ is signed and the outer
learning rate scales it. Differences from the papers: a zero is sent as +1 (one bit has no third value);
momentum (Signum) in the papers is applied on each worker before the sign, while an sgdlab strategy's
inner optimizer acts on the aggregate. With a robust ``--aggregate`` the vote is the sign of that
aggregate of the workers' signs. Error feedback (``feedback=ef``) fits the scaled sign better
(``scaled_sign``): an unscaled ±1 message leaves residuals that grow while |x| > 1.

Encoding: one bit per element (1 for ≥ 0), packed 8 per byte, ``⌈n/8⌉`` bytes; the bits are
all-gathered (each worker sends (N−1)·⌈n/8⌉ bytes) and every worker counts the vote itself.

A worker whose vector holds NaN sends −1 there (NaN ≥ 0 is false) and +1 for +Inf: one bit cannot carry a
non-finite value, so the run does not stop; such a worker's influence is one vote per element, as for
any other Byzantine worker under the vote (the ICLR 2019 paper's fault tolerance). The other lossy
compressors send a non-finite value on (as a value, or as a non-finite scale of its block or tensor), so
the exchange sees it and stops the run under the mean, or leave the entry out (random-k, top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import _quant
from .base import Compressor

VOTES = ("majority", "mean")


@dataclass
class SignSGDOptions:
    vote: str = "majority"   # majority: sign of the sum of the signs; mean: the mean of the signs

    def validate(self) -> None:
        if self.vote not in VOTES:
            raise ConfigError(f"vote={self.vote!r}: signsgd's vote must be one of: {', '.join(VOTES)}")


class SignSGD(Compressor):
    name = "signsgd"
    description = ("signSGD (Bernstein et al. 2018/2019): 1 bit per element; `vote` majority (sign of the sum "
                   "of the workers' signs) or mean (their mean)")
    Options = SignSGDOptions

    def nbytes(self, n: int) -> int:
        return _quant.packed_bytes(n, 1)

    def encode(self, x, slot=None, rank=0):
        return [_quant.sign_bits(x)]

    def decode(self, payload, n, slot=None, rank=0):
        return _quant.signs(payload[0], n)

    def communicate(self, payloads, group, n, slot, aggregator):
        aggregate, sent, secs = super().communicate(payloads, group, n, slot, aggregator)
        if self.options.vote == "majority":
            aggregate = torch.sign(aggregate)
        return aggregate, sent, secs
