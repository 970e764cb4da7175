"""PSPS: SGD with a preconditioned stochastic Polyak step size (no learning rate to tune).

Reference: Farshed Abdukhakimov, Chulu Xiang, Dmitry Kamzolov, Martin Takáč, "Stochastic Gradient Descent
with Preconditioned Polyak Step-size", arXiv:2310.02093 (Comput. Math. Math. Phys. 2024).

Update (f the minibatch loss at x, g its gradient, D a diagonal preconditioner)::

    Hutchinson (OASIS-style):  D <- beta D + (1 - beta) z * (H z),  z Rademacher, H the minibatch Hessian
    D^ = max(alpha, |D|)                       (preconditioner="none": D^ = I, i.e. SPS)
    n  = g^T D^^{-1} g
    x  <- x - lr * max(0, f - f*) / n * D^^{-1} g          (no step where n < 1e-13, as the reference)

``lr`` multiplies the Polyak step (1: the method as published). The step size is one scalar for the
whole model: n sums over every param group, and each group's ``lr`` scales its own part. At the first
step D is the mean of ``init_samples`` Hutchinson estimates (the reference's warm start uses 100), then
the EMA above once per step (one Hessian-vector product of the step's loss, about one more backward).

f* (``f_star``) defaults to 0 (the interpolation assumption, as the reference); our ``max(0, .)`` keeps a
loss below f* from stepping uphill. The step needs the loss value and its graph:
the optimizer declares ``step_closure = True`` (:mod:`sgdlab.optim.protocol`), so ``step(closure)`` takes
a closure that returns the minibatch loss with its graph (it must not call backward; the gradient in
``p.grad`` is the step's). Probes come from a generator owned by the optimizer (``seed``), saved in
``state_dict()``. Defaults beta=0.999 and alpha=1e-4 are our choice in the OASIS range (the reference sweeps
them). The reference's slack variants (L1/L2, after SPS with slack) and its Adam/AdaGrad preconditioners
are not implemented. Not in pytorch_optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError, check_range
from ._base import Optimizer
from ._rng import copy_states, device_generator, rademacher

__all__ = ["PSPS"]

PRECONDITIONERS = ("hutchinson", "none")
_CLOSURE_HELP = ("PSPS needs step(closure), where closure() recomputes the mini-batch loss with autograd "
                 "enabled and returns it without calling backward (sgdlab's runner does this)")


class PSPS(Optimizer):
    """SGD with preconditioned Polyak step size (Abdukhakimov et al., arXiv:2310.02093); module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: multiplier of the Polyak step (1 as published).
        preconditioner: "hutchinson" (diagonal Hessian estimate) or "none" (plain SPS).
        beta: EMA decay of the Hutchinson estimate, in [0, 1).
        alpha: floor of |D|, > 0.
        f_star: the assumed optimal minibatch loss f* (0: interpolation).
        init_samples: Hutchinson estimates averaged for D at the first step, >= 1.
        seed: seed of the optimizer's generator of probes (saved in ``state_dict``).
    """

    step_closure = True

    def __init__(self, params: Iterable[Any], lr: float = 1.0, preconditioner: str = "hutchinson",
                 beta: float = 0.999, alpha: float = 1e-4, *, f_star: float = 0.0, init_samples: int = 100,
                 seed: int = 0):
        check_range("f_star", f_star)
        check_range("init_samples", init_samples, low=1, integer=True)
        check_range("seed", seed, low=0, integer=True)
        self.f_star, self.init_samples, self.seed = float(f_star), init_samples, seed
        self._rng_states: dict[str, torch.Tensor] = {}
        super().__init__(params, dict(lr=lr, preconditioner=preconditioner, beta=beta, alpha=alpha))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        if group["preconditioner"] not in PRECONDITIONERS:
            raise ConfigError(f"preconditioner={group['preconditioner']!r} is not allowed; allowed: "
                              f"{', '.join(PRECONDITIONERS)}")
        check_range("beta", group["beta"], low=0.0, high=1.0, high_open=True)
        check_range("alpha", group["alpha"], low=0.0, low_open=True)

    extra_state_key = "psps"

    def _extra_state(self) -> dict[str, Any]:
        return {"rng_states": copy_states(self._rng_states)}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._rng_states = copy_states(extra["rng_states"])

    def _probe(self, p: torch.Tensor) -> torch.Tensor:
        with device_generator(self._rng_states, self.seed, p.device) as gen:
            return rademacher(p, gen)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One step; ``closure`` returns the minibatch loss with its graph (required). Returns the loss."""
        if closure is None:
            raise RuntimeError(_CLOSURE_HELP)
        groups = [(group, self._with_grad(group)) for group in self.param_groups]
        hutch = [(p, group["beta"]) for group, ps in groups if group["preconditioner"] == "hutchinson" for p in ps]
        # Hessian-vector products differentiate twice; fused attention kernels have no double backward
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
                raise RuntimeError(f"the closure returned {type(loss).__name__} without an autograd graph. "
                                   + _CLOSURE_HELP)
            if hutch:
                self._hutchinson(loss, hutch)
        if not any(ps for _, ps in groups):
            return loss.detach()
        parts = []  # (params, D^^{-1} g, lr) per group
        for group, ps in groups:
            if not ps:
                continue
            grads = [p.grad for p in ps]
            if group["preconditioner"] == "hutchinson":
                dhat = torch._foreach_abs([self.state[p]["hessian_diag"] for p in ps])
                torch._foreach_clamp_min_(dhat, group["alpha"])
                parts.append((ps, torch._foreach_div(grads, dhat), group["lr"]))
            else:
                parts.append((ps, grads, group["lr"]))
        flat_g = [p.grad for ps, _, _ in parts for p in ps]
        flat_d = [d for _, ds, _ in parts for d in ds]
        n = torch.stack(torch._foreach_norm(torch._foreach_mul(flat_g, flat_d), ord=1)).sum()  # g * d >= 0
        gap = (loss.detach() - self.f_star).clamp_min(0.0)
        size = torch.where(n >= 1e-13, gap / n.clamp_min(1e-13), torch.zeros_like(n))
        for ps, ds, lr in parts:
            torch._foreach_add_(ps, torch._foreach_mul(ds, -lr * size))
        return loss.detach()

    def _hutchinson(self, loss: torch.Tensor, hutch: list[tuple[torch.Tensor, float]]) -> None:
        """Update D (``hessian_diag``) of the parameters in ``hutch`` (with their group's beta) from
        Hessian-vector products of ``loss``: the mean of ``init_samples`` estimates where D is new."""
        ps = [p for p, _ in hutch]
        grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        rounds = self.init_samples if any("hessian_diag" not in self.state[p] for p in ps) else 1
        total = [torch.zeros_like(p) for p in ps]
        live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for r in range(rounds):
            zs = [self._probe(p) for p in ps]
            if live:
                hvps = torch.autograd.grad([g for _, g in live], [ps[i] for i, _ in live],
                                           grad_outputs=[zs[i] for i, _ in live], retain_graph=r + 1 < rounds,
                                           allow_unused=True)
                for (i, _), hv in zip(live, hvps, strict=True):
                    if hv is not None:
                        total[i].addcmul_(hv.detach(), zs[i])
        for (p, beta), est in zip(hutch, total, strict=True):
            st = self.state[p]
            est.div_(rounds)
            if "hessian_diag" not in st:
                st["hessian_diag"] = est
            else:
                st["hessian_diag"].lerp_(est, 1 - beta)
