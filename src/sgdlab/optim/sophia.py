"""Sophia: second-order clipped stochastic optimization.

Hong Liu, Zhiyuan Li, David Hall, Percy Liang, Tengyu Ma, "Sophia: A Scalable Stochastic Second-order
Optimizer for Language Model Pre-training", 2023 (ICLR 2024), arXiv:2305.14342.

Update (the paper's Algorithm 3, per coordinate, step ``t = 1, 2, ...``)::

    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
    if t mod k == 1:  h_t = beta2 * h_{t-k} + (1 - beta2) * h_hat_t      (h_{1-k} = 0)
    else:             h_t = h_{t-1}
    theta <- theta - lr * weight_decay * theta
    theta <- theta - lr * clip(m_t / max(gamma * h_t, eps), 1)           clip(z, 1) = max(-1, min(z, 1))

``h_hat_t`` estimates the diagonal of the Hessian at ``theta_t``:

* Sophia-H (``estimator="hutchinson"``, Algorithm 1): ``h_hat = u * (H u)`` with ``u ~ N(0, I)``
  (the paper's choice; ``probe="rademacher"`` draws +-1 instead). ``E[u * Hu] = diag(H)``.
* Sophia-G (``estimator="gnb"``, Gauss-Newton-Bartlett, Algorithm 2): sample labels ``y_hat_b`` from
  the model's own softmax, take ``g_hat`` = gradient of the MEAN cross-entropy over the ``B`` sampled
  labels, and ``h_hat = B * g_hat * g_hat``. Since ``g_hat = (1/B) sum_b grad l_b``,
  ``B * g_hat^2 = (sum_b grad l_b)^2 / B``; by Bartlett's identity its expectation over ``y_hat`` is the
  Gauss-Newton diagonal of the mean loss, which is what ``m_t`` (a mean-loss gradient) must be divided by.
  ``B`` is the number of sampled labels (tokens for a language model).

No bias correction; there is no second moment of gradients. No parameter is treated specially: biases,
norms and embeddings get the same element-wise rule (the paper applies it to every GPT-2 parameter).

Defaults. The paper's experimental setup uses beta1 = 0.96, beta2 = 0.99, eps = 1e-12 and a Hessian
update every k = 10 steps for all runs. gamma and lr are tuned per model there: ``gamma = 0.01`` is the
clip scale of the paper's first version and pytorch_optimizer's default (the official Sophia-G GPT-2 configs
use rho = gamma = 0.03-0.05); ``lr = 3e-4`` and ``weight_decay = 0.2`` are the official GPT-2 small (125M)
Sophia-G config. The clip caps every coordinate's move at ``lr`` per step, so tune ``lr`` per problem.

Differences from other implementations, on purpose:

* Official code (Liuhong99/Sophia, ``SophiaG``): keeps ``h`` as an EMA of ``g_hat^2`` and applies
  ``rho * bs * h + 1e-15`` in the step, with ``bs`` passed to ``step``. That is the paper's rule with
  ``gamma = rho`` and ``B = bs`` moved from the estimator into the step, and ``+eps`` instead of ``max``.
  We follow the paper: ``B`` enters through :meth:`Sophia.update_hessian` and the floor is ``max``.
* The paper's first version (v1) wrote ``theta - lr * clip(m / max(h, eps), rho)``; that equals the form
  above with ``gamma = rho``, ``lr_here = rho * lr_v1`` and ``eps_here = rho * eps_v1``.
  ``pytorch_optimizer.SophiaH`` uses the v1 form (its ``p`` is rho); it also draws probes from torch's
  global RNG and needs ``loss.backward(create_graph=True)`` on every step. Here the probe comes from a
  generator owned by the optimizer (``seed``), saved in ``state_dict()``, and the closure is called only on
  Hessian steps.

Both declare what they need from the training loop through the step protocol (:mod:`sgdlab.optim.protocol`):
Sophia-G a ``before_backward(ctx)`` hook (every ``k`` steps it back-propagates ``ctx.sampled_loss()`` into
:meth:`Sophia.update_hessian`), Sophia-H ``step_closure = True``. sgdlab's runner honours both; by hand:

Usage, Sophia-G (the training step is an ordinary ``backward(); step()``)::

    import torch
    import torch.nn.functional as F
    from sgdlab.optim.sophia import SophiaG, gnb_loss

    model = torch.nn.Linear(8, 3)
    opt = SophiaG(model.parameters(), lr=1e-2, k=10)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(20):
        if opt.hessian_due:                       # steps 1, k+1, 2k+1, ...
            opt.zero_grad()
            gnb_loss(model(x)).backward()         # labels sampled from the model's own softmax
            opt.update_hessian(batch_size=32)     # h <- beta2 h + (1 - beta2) * B * grad^2
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

Usage, Sophia-H (the closure returns the loss with its graph and does NOT call ``backward``)::

    opt = SophiaH(model.parameters(), lr=1e-2, k=10, seed=0)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(lambda: F.cross_entropy(model(x), y))   # called on Hessian steps only
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError, check_range
from ._base import ElementwiseOptimizer, buckets, check_betas, use_foreach
from ._compiled import Kernel
from ._rng import copy_states, device_generator, rademacher
from .protocol import StepContext

__all__ = ["Sophia", "SophiaG", "SophiaH", "gnb_loss"]

_ESTIMATORS = ("gnb", "hutchinson")
_PROBES = ("gaussian", "rademacher")

_CLOSURE_HELP = (
    "Sophia-H estimates the Hessian diagonal with Hessian-vector products, so on every k-th step it needs "
    "`optimizer.step(closure)`, where `closure()` recomputes the mini-batch loss with autograd enabled and "
    "RETURNS it without calling backward() (e.g. `lambda: loss_fn(model(x), y)`); the optimizer "
    "differentiates it twice itself. Gradients for the update still come from your usual loss.backward()."
)


def gnb_loss(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampled-label cross-entropy for Sophia-G's Gauss-Newton-Bartlett estimator.

    Draws ``y_hat ~ Categorical(softmax(logits))`` (classes along the last dimension, no gradient through
    the sampling) and returns the MEAN cross-entropy over all ``B = logits.numel() // logits.shape[-1]``
    positions. Back-propagate it and call ``Sophia.update_hessian(batch_size=B)``: the estimator is
    ``B * grad(mean loss)^2`` (paper, Algorithm 2).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probs = torch.softmax(flat.detach().float(), dim=-1)
        y_hat = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, y_hat, reduction="mean")


def _sophia_kernel(p, g, m, h, lr, decay, beta1: float, gamma: float, eps: float):
    m.lerp_(g, 1.0 - beta1)
    p.copy_(p * decay - lr * (m / (h * gamma).clamp_min(eps)).clamp(-1.0, 1.0))


class Sophia(ElementwiseOptimizer):
    """Sophia (Liu et al., 2023, arXiv:2305.14342); see the module docstring for the rule and defaults.

    Args:
        params: parameters or param groups.
        lr: learning rate ``eta`` (also the largest move of any coordinate per step).
        betas: ``(beta1, beta2)``, EMA rates of the gradient and of the Hessian-diagonal estimate.
        gamma: scale of the Hessian in the denominator ``max(gamma * h, eps)``.
        eps: floor of the denominator (> 0).
        weight_decay: decoupled weight decay ``lambda`` (multiplied by ``lr``).
        estimator: ``"gnb"`` (Sophia-G, feed it with :meth:`update_hessian`) or ``"hutchinson"``
            (Sophia-H, estimated inside ``step(closure)``).
        k: the Hessian estimate is refreshed on steps ``1, k+1, 2k+1, ...`` (:attr:`hessian_due`).
        probe: Hutchinson probe distribution, ``"gaussian"`` (paper) or ``"rademacher"``.
        seed: seed of the optimizer's own probe generator (saved in ``state_dict``).
        foreach, compiled: code path, as for every elementwise optimizer
            (:class:`~sgdlab.optim._base.ElementwiseOptimizer`).
    """

    state_names = ("exp_avg", "hessian")
    uses_step = False  # no bias correction
    kernel = Kernel(_sophia_kernel, "Sophia")

    def __init__(self, params, lr: float = 3e-4, betas: tuple[float, float] = (0.96, 0.99), gamma: float = 0.01,
                 eps: float = 1e-12, weight_decay: float = 0.2, *, estimator: str = "gnb", k: int = 10,
                 probe: str = "gaussian", seed: int = 0, foreach: bool | None = None,
                 compiled: bool | str | None = None):
        if estimator not in _ESTIMATORS:
            raise ConfigError(f"estimator={estimator!r} is not allowed; allowed: {', '.join(_ESTIMATORS)}")
        if probe not in _PROBES:
            raise ConfigError(f"probe={probe!r} is not allowed; allowed: {', '.join(_PROBES)}")
        check_range("k", k, low=1, integer=True)
        check_range("seed", seed, low=0, integer=True)
        self.estimator, self.k, self.probe, self.seed = estimator, k, probe, seed
        self._sophia_step = 0          # number of step() calls; drives the Hessian schedule
        self._rng_states: dict[str, torch.Tensor] = {}   # probe generator state per device
        super().__init__(params, dict(lr=lr, betas=betas, gamma=gamma, eps=eps, weight_decay=weight_decay,
                                      foreach=foreach, compiled=compiled))

    @classmethod
    def _validate(cls, group: dict) -> None:
        super()._validate(group)
        group["betas"] = check_betas(group["betas"])
        check_range("gamma", group["gamma"], low=0.0, low_open=True)
        check_range("eps", group["eps"], low=0.0, low_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)

    # --- the step protocol (sgdlab.optim.protocol) ---------------------------------------------------
    @property
    def before_backward(self) -> Callable[[StepContext], None] | None:
        """Sophia-G: the Gauss-Newton-Bartlett estimate, taken before the step's backward (None for Sophia-H)."""
        return self._gnb_estimate if self.estimator == "gnb" else None

    @property
    def step_closure(self) -> bool:
        """Sophia-H takes ``step(closure)`` (Hessian-vector products of the closure's loss)."""
        return self.estimator == "hutchinson"

    def _gnb_estimate(self, ctx: StepContext) -> None:
        """On Hessian steps: back-propagate ``ctx.sampled_loss()`` into :meth:`update_hessian`, leaving no grad."""
        if not self.hessian_due:
            return
        if ctx.sampled_loss is None:
            raise ConfigError("Sophia-G needs a loss against labels sampled from the model (StepContext."
                              "sampled_loss, e.g. from gnb_loss); this training loop provides none")
        loss, n = ctx.sampled_loss()
        loss.backward()
        self.update_hessian(batch_size=n)
        self.zero_grad(set_to_none=True)

    @property
    def hessian_due(self) -> bool:
        """True when the next :meth:`step` is a Hessian step (paper: ``t mod k == 1``)."""
        return self._sophia_step % self.k == 0

    extra_state_key = "sophia"

    def _extra_state(self) -> dict[str, Any]:
        return {"step": self._sophia_step, "rng_states": copy_states(self._rng_states)}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._sophia_step = int(extra["step"])
        self._rng_states = copy_states(extra["rng_states"])

    # ----------------------------------------------------------------------------------------------
    def _ema_hessian(self, group: dict, ps: list[torch.Tensor], h_hats: list[torch.Tensor]) -> None:
        """h <- beta2 * h + (1 - beta2) * h_hat for the params ``ps`` of ``group``."""
        hs = [self._state(p)["hessian"] for p in ps]
        for idx in buckets(ps, use_foreach(group["foreach"], ps)):
            torch._foreach_lerp_([hs[i] for i in idx], [h_hats[i] for i in idx], 1.0 - group["betas"][1])

    @torch.no_grad()
    def update_hessian(self, batch_size: int) -> None:
        """Sophia-G: fold ``h_hat = batch_size * grad**2`` into the Hessian EMA of every param with a grad.

        Call it every ``k`` steps (when :attr:`hessian_due`), right after back-propagating the MEAN
        sampled-label loss (:func:`gnb_loss`) over ``batch_size`` sampled labels, and before the next
        :meth:`step`. It does not move the parameters or the step counter. (:attr:`before_backward` does all
        this for loops that follow the step protocol.)
        """
        if self.estimator != "gnb":
            raise RuntimeError("update_hessian() is for Sophia-G (estimator='gnb'); Sophia-H estimates the "
                               "Hessian itself inside step(closure)")
        check_range("batch_size", batch_size, low=1, integer=True)
        for group in self.param_groups:
            ps = self._with_grad(group)
            if not ps:
                continue
            h_hats = torch._foreach_mul([p.grad for p in ps], [p.grad for p in ps])
            torch._foreach_mul_(h_hats, float(batch_size))
            self._ema_hessian(group, ps, h_hats)

    def _probe(self, p: torch.Tensor) -> torch.Tensor:
        with device_generator(self._rng_states, self.seed, p.device) as gen:
            if self.probe == "gaussian":
                return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
            return rademacher(p, gen)

    def _hutchinson(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One Hutchinson estimate ``u * (H u)`` at the current parameters; returns the closure's loss."""
        groups = [(group, self._with_grad(group)) for group in self.param_groups]
        ps = [p for _, g_ps in groups for p in g_ps]
        # Hessian-vector products differentiate twice; fused attention kernels (flash / memory-efficient)
        # have no double backward, so attention runs on the math kernel for this closure.
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
                raise RuntimeError(f"the closure returned {type(loss).__name__} without an autograd graph. "
                                   + _CLOSURE_HELP)
            if not ps:
                return loss.detach()
            try:
                grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
            except RuntimeError as e:
                raise RuntimeError(f"{e}\n{_CLOSURE_HELP}") from None
            probes = [self._probe(p) for p in ps]
            outs = [(g, u) for g, u in zip(grads, probes, strict=True) if g is not None and g.requires_grad]
            hvps = (torch.autograd.grad([g for g, _ in outs], ps, grad_outputs=[u for _, u in outs],
                                        allow_unused=True) if outs else [None] * len(ps))
        i = 0
        for group, g_ps in groups:
            h_hats = []
            for p in g_ps:
                hv, u = hvps[i], probes[i]
                h_hats.append(torch.zeros_like(p) if hv is None else hv.detach() * u)
                i += 1
            self._ema_hessian(group, g_ps, h_hats)
        return loss.detach()

    def _evaluate(self, closure: Callable[[], torch.Tensor] | None):
        """Sophia-H: on Hessian steps (:attr:`hessian_due`) ``closure`` gives a loss to take Hessian-vector
        products of; its loss is returned (otherwise ``None``). Sophia-G calls the closure, if given, like
        torch.optim (it may backward)."""
        loss = None
        if self.estimator == "gnb":
            loss = super()._evaluate(closure)
        elif self.hessian_due:
            if closure is None:
                raise RuntimeError(f"step {self._sophia_step + 1} is a Hessian step (every k={self.k}). "
                                   + _CLOSURE_HELP)
            loss = self._hutchinson(closure)
        self._sophia_step += 1
        return loss

    def _update(self, group, t, p, g, m, h, ops) -> None:
        lr, (beta1, _), gamma, eps, wd = (group["lr"], group["betas"], group["gamma"], group["eps"],
                                          group["weight_decay"])
        if wd != 0:
            ops.mul_(p, 1.0 - lr * wd)
        ops.lerp_(m, g, 1.0 - beta1)
        den = ops.mul(h, gamma)
        ops.clamp_min_(den, eps)
        ratio = ops.div(m, den)
        ops.clamp_(ratio, -1.0, 1.0)
        ops.add_(p, ratio, alpha=-lr)

    def _coefficients(self, group: dict, t: float) -> list[float]:
        return [group["lr"], 1.0 - group["lr"] * group["weight_decay"]]

    def _constants(self, group: dict) -> tuple:
        return group["betas"][0], group["gamma"], group["eps"]


class SophiaG(Sophia):
    """Sophia-G: :class:`Sophia` with the Gauss-Newton-Bartlett estimator (feed it via ``update_hessian``)."""

    def __init__(self, params, lr: float = 3e-4, betas: tuple[float, float] = (0.96, 0.99), gamma: float = 0.01,
                 eps: float = 1e-12, weight_decay: float = 0.2, *, k: int = 10, foreach: bool | None = None,
                 compiled: bool | str | None = None):
        super().__init__(params, lr, betas, gamma, eps, weight_decay, estimator="gnb", k=k, foreach=foreach,
                         compiled=compiled)


class SophiaH(Sophia):
    """Sophia-H: :class:`Sophia` with the Hutchinson estimator (needs ``step(closure)`` every ``k`` steps)."""

    def __init__(self, params, lr: float = 3e-4, betas: tuple[float, float] = (0.96, 0.99), gamma: float = 0.01,
                 eps: float = 1e-12, weight_decay: float = 0.2, *, k: int = 10, probe: str = "gaussian",
                 seed: int = 0, foreach: bool | None = None, compiled: bool | str | None = None):
        super().__init__(params, lr, betas, gamma, eps, weight_decay, estimator="hutchinson", k=k, probe=probe,
                         seed=seed, foreach=foreach, compiled=compiled)
