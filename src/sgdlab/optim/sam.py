"""SAM: sharpness-aware minimization around any base optimizer (and its adaptive variant, ASAM).

References: Pierre Foret, Ariel Kleiner, Hossein Mobahi, Behnam Neyshabur, "Sharpness-Aware Minimization
for Efficiently Improving Generalization", ICLR 2021, arXiv:2010.01412 (Algorithm 1); ASAM: Jungmin Kwon,
Jeongseop Kim, Hyunseo Park, In Kwon Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning of Deep Neural Networks", ICML 2021, arXiv:2102.11600.

Each step, on one mini-batch with loss ``L``::

    g   = grad L(w)                                      (the loop's ordinary backward)
    e   = rho * g / (||g||_2 + eps)                      SAM: one global norm over every parameter
    e   = rho * w^2 * g / (||w * g||_2 + eps)            ASAM (adaptive=True), elementwise products
    g'  = grad L(w + e)                                  (the closure: a second forward and backward)
    w  <- w, then base_optimizer.step() with gradient g'

so a step costs two forward/backward passes. The norm is global (all groups, all parameters with a
gradient), so splitting a tensor into two does not change the step. ``rho`` is per group (a scheduler or a
group may set it). Memory: copies of ``w`` and ``e`` during the step (+8 B/param, transient) plus the
base's state. Defaults: ``rho = 0.05`` (the paper's CIFAR value; ASAM uses up to 2.0), ``eps = 1e-12``, and
the paper's base, SGD with momentum. ``rho = 0`` is exactly the base optimizer.

Differences from pytorch_optimizer's ``SAM`` (same rule, same defaults): there the loop calls
``first_step``/``second_step`` itself or passes a closure that calls ``backward``; here the closure returns the
loss with its graph and SAM back-propagates it (the step protocol's ``step_closure``,
:mod:`sgdlab.optim.protocol`), and ``step`` returns the loss at ``w + e``. ASAM's ``eta`` (a small offset
added to ``|w|``, Kwon et al.) is not implemented: ``adaptive=True`` is the rule above, as in
pytorch_optimizer and the authors' reference. pytorch_optimizer also takes the global norm in float32
whatever the parameters' dtype (here: their dtype), so float64 trajectories agree to about 1e-8 (tested), and
its base step updates a parameter that had no gradient at ``w`` with its gradient at ``w + e``; here such a
parameter is neither perturbed nor updated. Near a minimum the perturbation keeps length ``rho``, so SAM
settles within about ``rho`` of a minimiser rather than on it. With ``maximize=True`` in the base's groups,
``e`` points down the loss (the worst case for a maximiser).

Usage (sgdlab's runner does this through the step protocol)::

    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    loss_fn(model(x), y).backward()
    opt.step(lambda: loss_fn(model(x), y))     # the closure returns the loss, it does not backward
    opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import SparseGradientError, check_flag
from ._wrapper import Wrapper, check_plain_base

__all__ = ["SAM", "sam"]


class SAM(Wrapper):
    """SAM (Foret et al., ICLR 2021) around ``base_optimizer``; see the module docstring.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` taking plain ``backward(); step()``.
        rho: radius of the ascent step, >= 0 (default 0.05); stored in every param group.
        adaptive: ASAM's elementwise ``w^2`` scaling (default False).
        eps: added to the norm, > 0 (default 1e-12).
    """

    key = "sam"
    step_closure = True

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False,
                 eps: float = 1e-12):
        super().__init__(base_optimizer)
        check_plain_base("SAM", base_optimizer)
        check_range("rho", rho, low=0.0)
        check_flag("adaptive", adaptive)
        check_range("eps", eps, low=0.0, low_open=True)
        self.adaptive, self.eps = adaptive, float(eps)
        for group in self.param_groups:
            group.setdefault("rho", float(rho))
        self.defaults = {**base_optimizer.defaults, "rho": float(rho)}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rho" in param_group:
            check_range("rho", param_group["rho"], low=0.0)
        param_group.setdefault("rho", self.defaults["rho"])
        super().add_param_group(param_group)

    def __repr__(self) -> str:
        return f"SAM(rho={self.defaults['rho']}, adaptive={self.adaptive}, base_optimizer={self.base_optimizer!r})"

    @torch.no_grad()
    def _perturbation(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(p, e)`` for every parameter with a gradient (e = 0 where rho = 0)."""
        pairs = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse and self.adaptive:
                    raise SparseGradientError("SAM(adaptive=True)", p.shape)
                rho = -group["rho"] if group.get("maximize") else group["rho"]  # ascent on the maximised objective
                pairs.append((rho, p, p.grad.coalesce().values() if p.grad.is_sparse else p.grad))
        if not pairs:
            return []
        scaled = [g * p if self.adaptive else g for _, p, g in pairs]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        out = []
        for (rho, p, _), s in zip(pairs, scaled, strict=True):
            g = p.grad
            if self.adaptive:
                e = s * p * (rho / (norm + self.eps))  # rho * w^2 g / ||w g||
            else:
                e = (g.to_dense() if g.is_sparse else g) * (rho / (norm + self.eps))
            out.append((p, e))
        return out

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> Any:  # type: ignore[override]
        """Ascend to ``w + e``, recompute the gradient with ``closure``, restore ``w``, take the base step.
        Returns the closure's loss (at ``w + e``)."""
        if closure is None:
            raise RuntimeError("SAM.step needs a closure that recomputes the mini-batch loss and returns it "
                               "without calling backward(), e.g. opt.step(lambda: loss_fn(model(x), y))")
        pairs = self._perturbation()
        saved = [p.detach().clone() for p, _ in pairs]  # restored exactly: w + e - e is not w in floating point
        with torch.no_grad():
            for p, e in pairs:
                p.add_(e)
        self.base_optimizer.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                loss = closure()
                loss.backward()
            had = {id(p) for p, _ in pairs}
            for p in self._params():  # parameters without a gradient at w are skipped, as by every optimizer
                if id(p) not in had:
                    p.grad = None
        finally:
            with torch.no_grad():
                for (p, _), w in zip(pairs, saved, strict=True):
                    p.copy_(w)
        self.base_optimizer.step()
        return loss.detach()


def sam(params: Iterable[Any], base: str = "sgd", rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12,
        **base_hyperparameters: Any) -> SAM:
    """SAM around the sgdlab optimizer registered as ``base``, built with ``base_hyperparameters``.

    >>> model = torch.nn.Linear(4, 2)
    >>> opt = sam(model.parameters(), base="sgd", rho=0.05, lr=0.1, momentum=0.9)
    """
    from . import create  # lazy: sgdlab.optim imports this module for its registry

    return SAM(create(base, params, **base_hyperparameters), rho=rho, adaptive=adaptive, eps=eps)
