"""MARS-AdamW: AdamW preconditioning of a scaled stochastic recursive momentum (variance reduction).

Reference: Huizhuo Yuan, Yifeng Liu, Shuang Wu, Xun Zhou, Quanquan Gu, "MARS: Unleashing the Power of
Variance Reduction for Training Large Models", 2024 (ICML 2025), arXiv:2411.10438.

The paper's MARS-AdamW (its Algorithm 2) needs two gradients per step, ``grad f(x_t, xi_t)`` and
``grad f(x_{t-1}, xi_t)`` (the previous iterate on the *current* batch). Its practical variant
MARS-approx, which the paper uses for its large experiments and the authors' code runs by default,
replaces the second with the previous step's gradient ``g_{t-1} = grad f(x_{t-1}, xi_{t-1})``, so a
step costs one gradient like AdamW. This class implements MARS-approx. For one parameter with gradient
``g_t`` at step ``t = 1, 2, ...``::

    c_t     = g_t + gamma * beta1 / (1 - beta1) * (g_t - g_{t-1})       (g_0 = 0)
    c~_t    = c_t / ||c_t||_2   if ||c_t||_2 > 1   else c_t                (clip to norm 1)
    m_t     = beta1 * m_{t-1} + (1 - beta1) * c~_t
    v_t     = beta2 * v_{t-1} + (1 - beta2) * c~_t^2
    m_hat   = m_t / (1 - beta1^t) ;  v_hat = v_t / (1 - beta2^t)
    theta_t = theta_{t-1} - lr * ( m_hat / (sqrt(v_hat) + eps) + weight_decay * theta_{t-1} )

Notes on choices the paper leaves to the implementation:

* The norm in the clip is taken per parameter tensor (as in the authors' code); the pseudocode writes
  it for the whole parameter vector.
* ``g_0 = 0`` (the authors' code initialises the stored previous gradient to zero), so the first step
  uses ``c_1 = (1 + gamma * beta1 / (1 - beta1)) * g_1`` before clipping.
* MARS-AdamW is elementwise, so it is applied to every parameter: matrices, conv kernels, biases,
  norm gains and embeddings alike. The authors' code (and ``pytorch_optimizer.MARS``) by default
  instead updates 1-D parameters with plain AdamW (``optimize_1d=False``, with their own ``lr_1d``,
  ``betas_1d``, ``weight_decay_1d``); to get that split here, put the 1-D parameters in a
  ``torch.optim.AdamW``. Our behaviour equals theirs with ``optimize_1d=True``.
* ``gamma`` is constant (the paper allows a schedule ``gamma_t``; use a param-group update for that).

Defaults: ``betas = (0.95, 0.99)``, ``gamma = 0.025``, ``eps = 1e-8`` are the paper's settings for
GPT-2 (also the authors' code defaults); ``lr = 3e-3`` and ``weight_decay = 0`` are the authors' code
defaults (the paper's GPT-2 small run uses ``lr = 6e-3``, ``weight_decay = 1e-2``).

Differences from ``pytorch_optimizer.MARS`` (4.1) with ``mars_type="adamw"``, ``optimize_1d=True``:
it divides by ``(sqrt(v_t + 1e-15) + eps) / sqrt(1 - beta2^t)``, i.e. adds ``eps`` before the bias
correction, whereas the paper's update (and ours) uses ``sqrt(v_hat) + eps``. The two coincide at
``eps = 0`` up to the 1e-15 inside its square root; otherwise the trajectories are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import ConfigError, check_range
from ._compiled import Kernel, check_compiled, compiled_mode

__all__ = ["MARS"]


class MARS(torch.optim.Optimizer):
    """MARS-AdamW, approximate (one-gradient) variant (Yuan et al., 2024, arXiv:2411.10438).

    See the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate ``eta`` (>= 0).
        betas: ``(beta1, beta2)``: momentum and second-moment decay rates; beta1 in [0, 1), beta2 in [0, 1).
        gamma: scale of the variance-reduction correction (>= 0); 0 gives AdamW on the clipped gradient.
        eps: added to ``sqrt(v_hat)`` (>= 0).
        weight_decay: decoupled weight decay ``lambda`` (>= 0), multiplied by ``lr``.
        foreach: True: multi-tensor ``torch._foreach_*`` path; False: per-parameter loop; None: foreach
            when all of a group's parameters are on one device type.
        compiled: use the ``torch.compile``d kernel (one fused function per tensor); None picks it for groups
            of at least 4M elements (:mod:`sgdlab.optim._compiled`), else ``foreach`` decides.
        maximize: maximize the objective instead of minimizing it.
    """

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 gamma: float = 0.025, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, compiled: bool | None = None, maximize: bool = False):
        defaults = dict(lr=lr, betas=betas, gamma=gamma, eps=eps, weight_decay=weight_decay,
                        foreach=foreach, compiled=compiled, maximize=maximize)
        self._validate(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict) -> None:
        check_range("lr", group["lr"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a tuple (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            check_range(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        check_range("gamma", group["gamma"], low=0.0)
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        if group["foreach"] not in (None, True, False):
            raise ConfigError(f"foreach must be True, False or None, got {group['foreach']!r}")
        check_compiled(group.get("compiled"))
        if group["maximize"] not in (True, False):
            raise ConfigError(f"maximize must be True or False, got {group['maximize']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    def _init_group(self, group: dict) -> tuple[list, list, list, list, list, list]:
        params, grads, ms, vs, lasts, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MARS does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("MARS does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["last_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            lasts.append(state["last_grad"])
            steps.append(state["step"])
        return params, grads, ms, vs, lasts, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, vs, lasts, steps = self._init_group(group)
            if not params:
                continue
            mode = compiled_mode(group.get("compiled"), [*params, *grads, *ms, *vs, *lasts])
            if mode:
                _compiled(mode, params, grads, ms, vs, lasts, steps, group)
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in params}) == 1
            (_multi_tensor if foreach else _single_tensor)(params, grads, ms, vs, lasts, steps, group)
        return loss


def _single_tensor(params, grads, ms, vs, lasts, steps, group) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    scale = group["gamma"] * beta1 / (1.0 - beta1)
    for p, g, m, v, last, st in zip(params, grads, ms, vs, lasts, steps, strict=True):
        if group["maximize"]:
            g = -g
        st += 1
        step = int(st.item())
        c = torch.sub(g, last).mul_(scale).add_(g)
        c.div_(torch.linalg.vector_norm(c).clamp_min(1.0))
        m.lerp_(c, 1.0 - beta1)
        v.mul_(beta2).addcmul_(c, c, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(eps)
        if wd != 0.0:
            p.mul_(1.0 - lr * wd)
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))
        last.copy_(g)


def _multi_tensor(params, grads, ms, vs, lasts, steps, group) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    scale = group["gamma"] * beta1 / (1.0 - beta1)
    torch._foreach_add_(steps, 1.0)
    # Tensors that share device, dtype and step count share one set of scalar coefficients.
    buckets: dict[tuple, list[int]] = {}
    for i, (p, st) in enumerate(zip(params, steps, strict=True)):
        buckets.setdefault((p.device, p.dtype, int(st.item())), []).append(i)
    for (_, _, step), idx in buckets.items():
        ps, m, v, last = ([lst[i] for i in idx] for lst in (params, ms, vs, lasts))
        g = [grads[i] for i in idx]
        if group["maximize"]:
            g = torch._foreach_neg(g)
        c = torch._foreach_sub(g, last)
        torch._foreach_mul_(c, scale)
        torch._foreach_add_(c, g)
        norms = torch._foreach_norm(c)
        torch._foreach_clamp_min_(norms, 1.0)
        torch._foreach_div_(c, norms)
        torch._foreach_lerp_(m, c, 1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, c, c, value=1.0 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2 ** step))
        torch._foreach_add_(denom, eps)
        if wd != 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_addcdiv_(ps, m, denom, value=-lr / (1.0 - beta1 ** step))
        torch._foreach_copy_(last, g)


def _mars_kernel(p, g, m, v, last, step_size_bc2, eps_bc2, decay, scale: float, beta1: float, beta2: float):
    c = (g - last) * scale + g
    c = c * (1.0 / torch.linalg.vector_norm(c).clamp_min(1.0))  # one division per tensor, not per element
    m.lerp_(c, 1.0 - beta1)
    v.mul_(beta2).addcmul_(c, c, value=1.0 - beta2)
    # step_size m / (sqrt(v) / bc2 + eps) as step_size bc2 m / (sqrt(v) + eps bc2)
    p.copy_(p * decay - step_size_bc2 * m / (v.sqrt() + eps_bc2))
    last.copy_(g)


_KERNEL = Kernel(_mars_kernel, "MARS")


def _compiled(mode, params, grads, ms, vs, lasts, steps, group) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    scale = group["gamma"] * beta1 / (1.0 - beta1)
    if group["maximize"]:
        grads = torch._foreach_neg(grads)

    def coefficients(step: float) -> list[float]:
        bc2 = math.sqrt(1.0 - beta2 ** step)
        return [lr * bc2 / (1.0 - beta1 ** step), eps * bc2, 1.0 - lr * wd]

    _KERNEL.run_stepped(mode, list(zip(params, grads, ms, vs, lasts, strict=True)), steps, coefficients,
                        (scale, beta1, beta2))
