"""Coordinate-wise clipped SGD: SGD (with momentum) whose largest update coordinates are clipped.

Reference: Yan Pan, Yuanzhi Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers",
arXiv:2306.00204 (2023).

The paper measures the directional sharpness u^T H u of an update u and finds it far worse for SGD than
for Adam, caused by a few large coordinates; clipping them restores the local loss reduction. Update
(per param group, d = its number of elements, p = ``clip_fraction``)::

    u      = g + weight_decay theta;   with momentum: b <- momentum b + u (b_0 = 0), u = b
    k      = ceil(p d);   tau = the k-th largest |u_i| over the whole group (one threshold per group)
    u_i   <- sign(u_i) min(|u_i|, tau)                  (exactly k coordinates end at |u_i| = tau, no ties)
    theta <- theta - lr u

``clip_fraction=0`` is ``torch.optim.SGD`` with the same momentum and weight decay (no dampening, no
Nesterov), step for step. The threshold is a global quantile of the group, found with ``torch.kthvalue`` on
the concatenated |u| (a transient copy, 4 bytes per element; ``torch.quantile`` refuses large inputs).

Defaults: lr=0.1, momentum=0 (SGD); clip_fraction=0.01 is our choice: the paper stresses that only a small
fraction of the coordinates needs clipping but its per-experiment fractions were not confirmed here. The
paper applies the clipping to the update of other optimizers too (Adam); only the SGD(M) form is here.
Not in pytorch_optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import Optimizer, defaults_from

__all__ = ["CoordClipSGD"]


class CoordClipSGD(Optimizer):
    """Coordinate-wise clipped SGD(M) (Pan & Li, arXiv:2306.00204); see the module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        momentum: heavy-ball momentum in [0, 1) (torch.optim.SGD's buffer).
        weight_decay: L2 penalty added to the gradient; >= 0.
        clip_fraction: fraction p in [0, 1] of the group's coordinates that are clipped to the threshold.
        maximize: ascend the objective (``p.grad`` is left as it is).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 clip_fraction: float = 0.01, *, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_range("clip_fraction", group["clip_fraction"], low=0.0, high=1.0)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads, owned = [p.grad for p in params], False
        if group["maximize"]:
            grads, owned = torch._foreach_neg(grads), True
        if group["weight_decay"] != 0:
            grads, owned = torch._foreach_add(grads, params, alpha=group["weight_decay"]), True
        if group["momentum"] != 0:
            bufs = []
            for p in params:
                st = self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            grads, owned = bufs, False  # the buffer keeps the unclipped direction
        updates = grads if owned or group["clip_fraction"] == 0 else torch._foreach_mul(grads, 1.0)
        d = sum(u.numel() for u in updates)
        k = math.ceil(group["clip_fraction"] * d)
        if k > 0:
            flat = torch.cat([a.reshape(-1) for a in torch._foreach_abs(updates)])
            tau = torch.kthvalue(flat, d - k + 1).values  # the k-th largest |u_i|
            torch._foreach_minimum_(updates, [tau] * len(updates))
            torch._foreach_maximum_(updates, [-tau] * len(updates))
        torch._foreach_add_(params, updates, alpha=-group["lr"])
