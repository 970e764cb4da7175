"""NAG-GS: a semi-implicit (Gauss-Seidel) discretisation of an accelerated Nesterov-like gradient flow.

Reference: Valentin Leplat, Daniil Merkulov, Aleksandr Katrutsa, Daniel Bershatsky, Olga Tsymboi, Ivan
Oseledets, "NAG-GS: Semi-Implicit, Accelerated and Robust Stochastic Optimizer", arXiv:2209.14937 (2022).

State per parameter: ``v`` (``v_0 = x_0``, a copy of the parameter at its first step) and a scalar
``gamma`` (``gamma_0``). With ``alpha = lr``, the paper's iteration ``k`` is::

    a         = alpha / (1 + alpha)
    x_{k+1}   = (1 - a) x_k + a v_k
    gamma_{k+1} = (1 - a) gamma_k + a mu
    b         = alpha mu / (alpha mu + gamma_{k+1})
    v_{k+1}   = (1 - b) v_k + b x_{k+1} - (b / mu) grad f(x_{k+1})

A step here has the gradient at the current parameters, so it runs the loop shifted by half an iteration,
as the authors' PyTorch ``NAGGS.step`` does: ``b`` from the stored gamma, then the v-update with the
current gradient, then the gamma-update, then the x-update::

    b = alpha mu / (alpha mu + gamma);  v <- (1 - b) v + b x - (b / mu) g
    gamma <- (1 - a) gamma + a mu;       x <- (1 - a) x + a v

It equals the paper's loop except at the very first step (the paper's first x-step is a no-op since v_0 = x_0,
and its first b uses gamma_1): the first step here is SGD with lr ``a b / mu``, b = alpha mu / (alpha mu +
gamma_0). With gamma_0 = mu, gamma stays at mu (the authors' NAG4 with fixed gamma).

Defaults: lr (alpha) = 0.05, mu = 1.0, gamma = 1.5, the authors' README and JAX defaults (their PyTorch class
uses lr=1e-2, gamma=1.0). No weight decay (the paper has none). gamma is a Python float in each parameter's
state (parameters that took the same steps share it and are updated together). Not in pytorch_optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import ElementwiseOptimizer, buckets, defaults_from, use_foreach
from ._ops import FOREACH, SINGLE

__all__ = ["NAGGS"]


class NAGGS(ElementwiseOptimizer):
    """NAG-GS (Leplat et al., arXiv:2209.14937); see the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: the step alpha (> 0 in practice; NAG-GS tolerates large values).
        mu: the strong-convexity / momentum parameter, > 0.
        gamma: gamma_0, the initial value of the scalar gamma, > 0.
        foreach, maximize: as for every :class:`~sgdlab.optim._base.ElementwiseOptimizer` (no compiled kernel).
    """

    state_names = ("v",)
    counted = False
    uses_step = False

    def __init__(self, params: Iterable[Any], lr: float = 0.05, mu: float = 1.0, gamma: float = 1.5, *,
                 foreach: bool | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("mu", group["mu"], low=0.0, low_open=True)
        check_range("gamma", group["gamma"], low=0.0, low_open=True)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = []
        for p in params:
            st = self.state[p]
            if not st:  # v_0 = x_0
                st["v"], st["gamma"] = p.detach().clone(memory_format=torch.preserve_format), float(group["gamma"])
            states.append(st)
        grads = [p.grad for p in params]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        vs, gammas = [st["v"] for st in states], [st["gamma"] for st in states]
        batched = use_foreach(group["foreach"], params)
        ops = FOREACH if batched else SINGLE
        alpha, mu = group["lr"], group["mu"]
        a = alpha / (1 + alpha)
        for idx in buckets(params, batched, gammas):
            gamma = gammas[idx[0]]
            tensors = ([params[i] for i in idx], [grads[i] for i in idx], [vs[i] for i in idx]) if batched else \
                (params[idx[0]], grads[idx[0]], vs[idx[0]])
            self._update(group, gamma, *tensors, ops=ops)
            for i in idx:
                states[i]["gamma"] = (1 - a) * gamma + a * mu

    def _update(self, group, gamma, p, g, v, ops) -> None:
        alpha, mu = group["lr"], group["mu"]
        b = alpha * mu / (alpha * mu + gamma)
        ops.lerp_(v, p, b)
        ops.add_(v, g, alpha=-b / mu)
        ops.lerp_(p, v, alpha / (1 + alpha))
