"""DoG and L-DoG: parameter-free SGD whose step is the distance from the start over the root gradient sum.

Reference: Maor Ivgi, Oliver Hinder, Yair Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step
Size Schedule", ICML 2023, arXiv:2302.12022.

Update rule (DoG: each param group taken as one vector x; t = 0 at the first step)::

    t = 0:   x_0 stored;  rbar_0 = r_eps = reps_rel (1 + ||x_0||);  G_0 = ||g_0||^2 + eps
    t > 0:   rbar_t = max(rbar_{t-1}, ||x_t - x_0||);  G_t = G_{t-1} + ||g_t||^2
    eta_t = lr * rbar_t / sqrt(G_t)
    x_{t+1} = x_t - eta_t g_t

with ``g = grad + weight_decay x`` (coupled L2, as in the authors' code). L-DoG applies the same rule to each
tensor separately (its own r_eps, rbar, G and eta). The norms are Euclidean over the group (DoG) or the
tensor (L-DoG), computed with ``torch._foreach_norm``; the scalars stay on the parameters' device (no host
sync). A group's parameters must share one device.

``lr`` is the paper's multiplier c: leave it at 1 (the method is parameter-free; an LR schedule multiplies
eta). Defaults reps_rel=1e-6 (1e-4 helps with BatchNorm models, 1e-8 for fine-tuning with large weights),
eps=1e-8, weight_decay=0: those of the authors' code (formll/dog, ``DoG``/``LDoG``). The paper's best results
average the iterates (their ``PolynomialDecayAverager``, gamma = 8); that averager is not part of this
optimizer, and neither is the code's ``init_eta`` override.

State per parameter: ``x0`` (the start), and 0-d tensors ``rbar``, ``G`` and ``eta`` (for DoG the group's
values, kept by every parameter of the group). A parameter whose gradient is still ``None`` at the group's
first step joins later with x_0 = its value then. Not in pytorch_optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import Optimizer, defaults_from

__all__ = ["DoG", "LDoG"]


class DoG(Optimizer):
    """DoG (Ivgi, Hinder & Carmon, ICML 2023, arXiv:2302.12022): one step size per param group.

    Args:
        params: parameters or param-group dicts.
        lr: the multiplier c of the step size (1: the paper's parameter-free method).
        reps_rel: r_eps relative to 1 + ||x_0||, the first step's distance; > 0.
        eps: added once to the first squared gradient norm; >= 0.
        weight_decay: L2 penalty added to the gradient; >= 0.
        maximize: ascend the objective (``p.grad`` is left as it is).
    """

    layerwise = False

    def __init__(self, params: Iterable[Any], lr: float = 1.0, reps_rel: float = 1e-6, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("reps_rel", group["reps_rel"], low=0.0, low_open=True)
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        states = [self.state[p] for p in params]
        for p, st in zip(params, states, strict=True):
            if not st:
                st["x0"] = p.detach().clone(memory_format=torch.preserve_format)
        x_norms = torch.stack(torch._foreach_norm(params))
        d_norms = torch.stack(torch._foreach_norm(torch._foreach_sub(params, [st["x0"] for st in states])))
        g_sq = torch.stack(torch._foreach_norm(grads)).square()
        known = [st for st in states if "rbar" in st]
        reps, eps, lr = group["reps_rel"], group["eps"], group["lr"]
        if not self.layerwise:  # the group as one vector
            if known:
                rbar = torch.maximum(known[0]["rbar"], torch.linalg.vector_norm(d_norms))
                big_g = known[0]["G"] + g_sq.sum()
            else:
                rbar = reps * (1 + torch.linalg.vector_norm(x_norms))
                big_g = g_sq.sum() + eps
            eta = lr * rbar / big_g.sqrt()
            torch._foreach_add_(params, torch._foreach_mul(grads, -eta))
            for st in states:
                st["rbar"], st["G"], st["eta"] = rbar, big_g, eta
            return
        if len(known) == len(states):  # every tensor on its own
            rbar = torch.maximum(torch.stack([st["rbar"] for st in states]), d_norms)
            big_g = torch.stack([st["G"] for st in states]) + g_sq
        else:
            new = torch.tensor(["rbar" not in st for st in states], device=x_norms.device)
            zero = x_norms.new_zeros(())
            prev_r = torch.stack([st.get("rbar", zero) for st in states])
            prev_g = torch.stack([st.get("G", zero) for st in states])
            rbar = torch.where(new, reps * (1 + x_norms), torch.maximum(prev_r, d_norms))
            big_g = torch.where(new, g_sq + eps, prev_g + g_sq)
        eta = lr * rbar / big_g.sqrt()
        torch._foreach_add_(params, torch._foreach_mul(grads, list((-eta).unbind())))
        for st, r, g, e in zip(states, rbar.unbind(), big_g.unbind(), eta.unbind(), strict=True):
            st["rbar"], st["G"], st["eta"] = r.clone(), g.clone(), e.clone()


class LDoG(DoG):
    """L-DoG (layer-wise DoG, Ivgi, Hinder & Carmon, ICML 2023): DoG's rule for each tensor on its own.

    Hyperparameters as for :class:`DoG`.
    """

    layerwise = True
