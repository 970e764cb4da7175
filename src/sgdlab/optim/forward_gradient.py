"""Forward gradients: SGD on the forward-mode estimate (grad f . v) v, without a backward pass.

Reference: Atılım Güneş Baydin, Barak A. Pearlmutter, Don Syme, Frank Wood, Philip Torr, "Gradients without
Backpropagation", arXiv:2202.08587 (2022), Algorithm 1.

Each step, on the mini-batch loss ``f``::

    v ~ N(0, I)                         one tangent the shape of theta (all parameters)
    d = grad f(theta) . v               one forward-mode pass: f and its directional derivative together
    g_hat = d v                         the forward gradient, unbiased since E[v v^T] = I
    theta <- theta - lr * g_hat         (optionally heavy-ball momentum and coupled weight decay, as SGD)

With ``tangents = k`` the estimate is the mean of ``k`` such ``d_i v_i`` (``k`` forward passes).
``E||g_hat||^2 = (d + 2) ||grad f||^2`` for ``d`` parameters, so the step size must be far smaller than
SGD's. On a quadratic ``d`` equals MeZO's central difference for the same ``v``.

Defaults: ``lr = 1e-3`` (the paper tunes it per model; its MNIST runs use 2e-5 to 2e-4 with a decay),
``momentum = 0``, ``weight_decay = 0``, one tangent.

How it is computed. ``torch.func.jvp`` needs the loss as a pure function of the parameters, i.e.
``functional_call`` over the model; the step protocol's closure instead reads the parameters from wherever
the loop keeps them (a module, or bare tensors). So the tangents are attached to the parameter tensors
themselves with ``torch.autograd.forward_ad`` (the forward-mode engine under ``torch.func.jvp``): inside a
dual level each parameter is overwritten, under ``torch.no_grad``, by a dual tensor of its own value and
tangent ``v``; the closure's loss then carries ``d`` as its tangent; leaving the level drops the tangents and
the values are unchanged. No autograd graph is built and nothing is kept for a reverse pass; the extra
memory is ``v`` (4 B/param, reused as the gradient) plus the forward-mode duals of the activations. The tests
check ``d`` against ``torch.func.jvp(functional_call(model, ...))`` and against ``grad f . v``.

Through the step protocol (:mod:`sgdlab.optim.protocol`) it declares ``before_backward`` (which writes
``g_hat`` into ``p.grad``, so strategies that average gradients, gradient clipping and DP see it like a
gradient) and ``step_backward = False``; ``step()`` is then an SGD step on ``p.grad``. Every parameter with
``requires_grad`` gets a tangent, whether or not the loss depends on it. The loop's own loss (for the log)
is one more forward without a graph. Operations without a forward-mode formula raise in the closure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import check_range
from ._base import Optimizer
from ._rng import copy_states, device_generator
from .protocol import StepContext

__all__ = ["ForwardGradient", "directional_derivative"]


def directional_derivative(loss, params: list[torch.Tensor], tangents: list[torch.Tensor]) -> tuple[float, float]:
    """``(f, grad f . v)`` for ``f = loss()`` at the current ``params`` and tangents ``v``, by forward mode
    (the parameters' values are left as they were)."""
    # fused attention kernels (flash / memory-efficient) have no forward-mode formula: the math kernel does
    with fwAD.dual_level(), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        for p, v in zip(params, tangents, strict=True):
            p.copy_(fwAD.make_dual(p.detach().clone(), v))
        out = loss()
        primal, tangent = fwAD.unpack_dual(out)
        d = 0.0 if tangent is None else float(tangent)
        value = float(primal)
    return value, d


class ForwardGradient(Optimizer):
    """SGD on forward gradients (Baydin et al., 2022, arXiv:2202.08587); see the module docstring.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        momentum: heavy-ball momentum in [0, 1) on the forward gradient (default 0, the paper's plain rule).
        weight_decay: coupled weight decay added to the estimate, >= 0 (default 0).
        tangents: tangents averaged per step, an integer >= 1 (default 1).
        seed: seed of the optimizer's own tangent generator, an integer >= 0 (state saved in ``state_dict``).
    """

    step_backward = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, tangents: int = 1, seed: int = 0):
        check_range("tangents", tangents, low=1, integer=True)
        check_range("seed", seed, low=0, integer=True)
        self.tangents, self.seed = tangents, seed
        self._rng_states: dict[str, torch.Tensor] = {}
        self.last_directional: list[float] = []  # grad f . v_i of the last estimate
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)

    def _tangent(self, p: torch.Tensor) -> torch.Tensor:
        with device_generator(self._rng_states, self.seed, p.device) as gen:
            return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)

    def before_backward(self, ctx: StepContext) -> None:
        """Write the forward gradient of ``ctx.loss`` into ``p.grad`` of every parameter (step protocol)."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            return
        estimate: list[torch.Tensor] | None = None
        self.last_directional = []
        for _ in range(self.tangents):
            vs = [self._tangent(p) for p in params]
            _, d = directional_derivative(ctx.loss, params, vs)
            self.last_directional.append(d)
            torch._foreach_mul_(vs, d / self.tangents)
            estimate = vs if estimate is None else torch._foreach_add(estimate, vs)
        for p, g in zip(params, estimate, strict=True):
            p.grad = g

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            d = p.grad if not wd else p.grad.add(p, alpha=wd)
            if mu:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mu).add_(d)
                d = buf
            p.add_(d, alpha=-lr)

    extra_state_key = "forward_gradient"

    def _extra_state(self) -> dict[str, Any]:
        return {"rng_states": copy_states(self._rng_states), "seed": self.seed, "tangents": self.tangents}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._rng_states = copy_states(extra["rng_states"])
        self.seed, self.tangents = int(extra["seed"]), int(extra["tangents"])
