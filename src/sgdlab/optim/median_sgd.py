"""Median SGD: SGD on an online estimate of the median gradient, a clipped (proximal-point) momentum.

Reference: Fabian Schaipp, Guillaume Garrigos, Umut Şimşekli, Robert Gower, "Tracking the Median of
Gradients with a Stochastic Proximal Point Method", TMLR 2025, arXiv:2402.12828 (v1: "SGD with Clipping is
Secretly Estimating the Median Gradient").

Momentum is an online estimate of the mean gradient. A stochastic proximal point step with step size tau on
the geometric-median objective E ||m - g|| is a clipping of the innovation ``g - m`` to radius tau, so
the estimate ``m`` tracks the median instead (robust to heavy-tailed gradient noise)::

    m_{t+1}     = m_t + min(1, tau / ||g_t - m_t||) (g_t - m_t)          (norm="group" or "tensor")
    m_{t+1}     = m_t + clamp(g_t - m_t, -tau, tau)                       (norm="coordinate": the l1 median)
    theta_{t+1} = theta_t - lr m_{t+1}

with m_0 = 0. ``norm="group"`` takes ||.|| over the whole param group (one vector, as
``torch.nn.utils.clip_grad_norm_``), ``"tensor"`` over each tensor. So ``||m_{t+1} - m_t|| <= tau``;
tau = inf is plain SGD, and the first step (from m_0 = 0) is SGD with the gradient clipped to norm tau.
Shrinking tau over the run (change ``group["tau"]``) makes m converge to the median of a stationary stream.

Hyperparameters: the paper tunes both lr and tau and gives no defaults; lr=0.1 and tau=1.0 here are only a
starting point. The paper's quantile and generalised-median variants and its across-minibatch sample median
are not implemented. Not in pytorch_optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import Optimizer, defaults_from

__all__ = ["MedianSGD"]

NORMS = ("group", "tensor", "coordinate")


class MedianSGD(Optimizer):
    """SGD on the clipped-momentum median estimate (Schaipp et al., arXiv:2402.12828); module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        tau: the clipping radius (the proximal step size), > 0; ``inf`` is plain SGD.
        norm: "group" (one norm per param group), "tensor" (one per tensor) or "coordinate" (per element).
        maximize: ascend the objective (``p.grad`` is left as it is).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, tau: float = 1.0, norm: str = "group", *,
                 maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("tau", group["tau"], low=0.0, low_open=True)
        if group["norm"] not in NORMS:
            raise ConfigError(f"norm={group['norm']!r} is not allowed; allowed: {', '.join(NORMS)}")

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        ms = []
        for p in params:
            st = self.state[p]
            if not st:
                st["median"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ms.append(st["median"])
        grads = [p.grad for p in params]
        if group["maximize"]:  # -g - m
            innovation = torch._foreach_add(grads, ms)
            torch._foreach_neg_(innovation)
        else:
            innovation = torch._foreach_sub(grads, ms)
        tau = group["tau"]
        if group["norm"] == "coordinate":
            torch._foreach_clamp_min_(innovation, -tau)
            torch._foreach_clamp_max_(innovation, tau)
        else:
            norms = torch._foreach_norm(innovation)
            if group["norm"] == "group":
                factor = (tau / torch.linalg.vector_norm(torch.stack(norms))).clamp_max(1.0)  # 1 at norm 0
                torch._foreach_mul_(innovation, factor)
            else:
                factors = (tau / torch.stack(norms)).clamp_max(1.0)
                torch._foreach_mul_(innovation, list(factors.unbind()))
        torch._foreach_add_(ms, innovation)
        torch._foreach_add_(params, ms, alpha=-group["lr"])
