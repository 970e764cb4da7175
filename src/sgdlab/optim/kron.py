r"""PSGD Kron: a Kronecker-factored preconditioner fitted on a Lie group (preconditioned SGD, Kron form).

Reference: Xi-Lin Li, "Stochastic Hessian Fittings with Lie Groups", arXiv:2402.11858 (2024), and the PSGD
line of work it builds on (Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018, arXiv:1512.04202);
code: github.com/lixilinx/psgd_torch (``psgd.py``) and Evan Walters' ``kron_torch``, which
``pytorch_optimizer.Kron`` follows.

The preconditioner is ``P = Q^T Q`` with ``Q = Q_1 (x) ... (x) Q_k`` for a parameter of order ``k``: each ``Q_i`` is
upper triangular (dense, ``n_i x n_i``) or diagonal. It is fitted to the whitening criterion
``E[h^T P h + v^T P^{-1} v]`` (``v ~ N(0, I)``), whose minimiser is ``P = E[h h^T]^{-1/2}``, by a normalised
gradient step on the group of such ``Q`` (update ``dQ = E Q``). Step ``t`` with gradient ``g``::

    m <- beta m + (1 - beta) g,  h = m / (1 - beta^t)                 (momentum = beta; 0: h = g)
    with probability p(t), update Q (h, or g if momentum_into_precond_update=False; v ~ N(0, I) like h):
        A = h x_1 Q_1 ... x_k Q_k,    B = v x_1 Q_1^{-T} ... x_k Q_k^{-T}    (triangular solves)
        T1_i = A_(i) A_(i)^T,  T2_i = B_(i) B_(i)^T                   (mode-i unfoldings; diagonals for diagonal Q_i)
        dense:    Q_i <- Q_i - precond_lr * triu(T1_i - T2_i) / ||T1_i + T2_i||_lb * Q_i
        diagonal: q_i <- q_i - precond_lr * (T1_i - T2_i) * q_i / max|T1_i + T2_i|
    D = h x_1 Q_1^T Q_1 ... x_k Q_k^T Q_k,    D <- D * min(1, 1.1 / (RMS(D) + 1e-6))      (trust region)
    theta <- theta - lr (D + wd theta)                               (decoupled decay, ndim >= 2 only)

``||.||_lb`` is the cheap lower bound of the spectral norm of the reference code (scale by the largest entry,
take the column of largest norm, one power step); ``eps = finfo(bfloat16).tiny`` guards both divisions. A
factor is diagonal when its dimension is 1 or above ``max_size_triangular``, when the tensor has fewer than
``min_ndim_triangular`` dimensions (so 1-D tensors are diagonal), or as ``memory_save_mode`` says ("one_diag":
the largest dimension; "smart_one_diag": it too if strictly largest; "all_diag": all). Factors start at
``precond_init_scale^{1/k} I``. On update steps, with probability ``balance_prob``, the factors of tensors with
``ndim >= 2`` are rescaled to the geometric mean of their infinity norms (``P`` is unchanged).

Update probability: ``p(t) = clamp(exp(-0.001 (t - 500)), 0.03, 1)`` by default (every step for the first 500,
then decaying to 3%), ``t`` the steps taken before this one; a number fixes it. The draws (update and
balance) come from the optimizer's own generator (``seed``), as do ``v`` (per device), all saved in
``state_dict()``.

Defaults: ``lr=1e-3, momentum=0.9, precond_lr=0.1, precond_init_scale=1, max_size_triangular=8192,
min_ndim_triangular=2, balance_prob=0.01`` (pytorch_optimizer's and kron_torch's). lixilinx's newest
``KronWhiten`` differs: momentum 0, whitening of the raw gradient, another geometry (``dQ = Q^{0.5} E Q^{1.5}``,
which recovers Newton-Schulz iterations for ``E[g g^T]^{-1/4}``), a step normalised by an EMA of Lipschitz
estimates (``betaL = 0.9``), ``damping = 1e-9`` and gradient clipping; that variant is not implemented here.

Differences from ``pytorch_optimizer.Kron`` (4.1.0): it decides updates by a counter (every ``ceil(1/p)``-th step)
instead of a random draw, takes ``v`` from the global generator and balancing draws from NumPy's, and computes
``B``'s triangular solves in float32 whatever the dtype; with update probability 1, no balancing and the same
``v`` the trajectories agree to float32 rounding (tested). It also keeps the weight-decay L2 option for
``ndim >= 2`` (``weight_decouple=False``), which we leave out.
Same-shaped parameters of a group are updated together (``foreach``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import Optimizer, buckets, check_flag, defaults_from, use_foreach
from ._rng import copy_states, device_generator

__all__ = ["Kron", "norm_lower_bound", "update_probability"]

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
_TINY = torch.finfo(torch.bfloat16).tiny


def update_probability(step: int, max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001,
                       flat_start: int = 500) -> float:
    """The default schedule ``clamp(max_prob * exp(-decay (step - flat_start)), min_prob, max_prob)``."""
    return min(max_prob, max(min_prob, max_prob * math.exp(-decay * (step - flat_start))))


def norm_lower_bound(a: torch.Tensor) -> torch.Tensor:
    """A lower bound of the spectral norm of each symmetric matrix of a batch ``(B, n, n)``: scaled by the largest
    entry, one power step from the column of largest norm."""
    scale = a.abs().amax(dim=(-2, -1), keepdim=True)
    a = a / torch.where(scale > 0, scale, torch.ones_like(scale))
    j = a.square().sum(dim=-2).argmax(dim=-1)  # column of largest norm
    col = a.gather(-1, j.reshape(-1, 1, 1).expand(-1, a.shape[-2], 1))  # (B, n, 1)
    x = (col.mT @ a)  # (B, 1, n)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return scale.reshape(-1) * torch.linalg.vector_norm(x @ a, dim=(-2, -1))


def _mode_apply(x: torch.Tensor, mode: int, q: torch.Tensor, diag: bool, transpose: bool = False) -> torch.Tensor:
    """``x x_mode Q`` (``Q^T`` with ``transpose``) for a batch ``x`` ``(B, n_0, ...)`` and factors ``q`` (``(B, n, n)``,
    or ``(B, n)`` when ``diag``)."""
    if diag:
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[mode + 1] = x.shape[mode + 1]
        return x * q.reshape(shape)
    moved = x.movedim(mode + 1, 1)
    y = (q.mT if transpose else q) @ moved.reshape(x.shape[0], x.shape[mode + 1], -1)
    return y.reshape(moved.shape).movedim(1, mode + 1)


def _mode_solve_t(x: torch.Tensor, mode: int, q: torch.Tensor, diag: bool) -> torch.Tensor:
    """``x x_mode Q^{-T}`` (a triangular solve with ``Q^T``; a division for diagonal ``Q``)."""
    if diag:
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[mode + 1] = x.shape[mode + 1]
        return x / q.reshape(shape)
    moved = x.movedim(mode + 1, 1)
    y = torch.linalg.solve_triangular(q.mT, moved.reshape(x.shape[0], x.shape[mode + 1], -1), upper=False)
    return y.reshape(moved.shape).movedim(1, mode + 1)


def _gram(x: torch.Tensor, mode: int, diag: bool) -> torch.Tensor:
    """``X_(mode) X_(mode)^T`` per batch entry (its diagonal when ``diag``)."""
    u = x.movedim(mode + 1, 1).reshape(x.shape[0], x.shape[mode + 1], -1)
    return u.square().sum(-1) if diag else u @ u.mT


def diagonal_dims(shape: tuple[int, ...], group: dict[str, Any]) -> tuple[bool, ...]:
    """Which factors of a tensor of ``shape`` are diagonal (module docstring)."""
    mode = group["memory_save_mode"]
    forced = [False] * len(shape)
    if mode == "all_diag":
        forced = [True] * len(shape)
    elif mode in ("one_diag", "smart_one_diag") and shape:
        largest = max(range(len(shape)), key=lambda i: (shape[i], -i))
        ordered = sorted(shape)
        if mode == "one_diag" or (len(shape) >= 2 and ordered[-1] > ordered[-2]):
            forced[largest] = True
    return tuple(n == 1 or n > group["max_size_triangular"] or len(shape) < group["min_ndim_triangular"] or f
                 for n, f in zip(shape, forced, strict=True))


class Kron(Optimizer):
    """PSGD Kron (Li, 2024, arXiv:2402.11858): SGD with momentum preconditioned by a Kronecker product of
    triangular/diagonal factors fitted on a Lie group. See the module docstring for the rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        momentum: EMA coefficient of the gradient in [0, 1) (bias-corrected).
        weight_decay: decoupled weight decay for parameters with ``ndim >= 2``.
        precond_lr: step size of the preconditioner fit, in (0, 1].
        precond_init_scale: ``Q`` starts at ``precond_init_scale^{1/k} I``; > 0.
        update_probability: probability of a preconditioner update per step, in (0, 1]; None: the default schedule.
        max_size_triangular: dimensions above this get a diagonal factor (an integer >= 1).
        min_ndim_triangular: tensors with fewer dimensions get diagonal factors only (an integer >= 1).
        memory_save_mode: None, "one_diag", "smart_one_diag" or "all_diag".
        momentum_into_precond_update: fit the preconditioner to the momentum (True) or to the gradient.
        balance_prob: probability of rebalancing the factors on an update step, in [0, 1].
        seed: seed of the optimizer's generator (update and balance draws, the vectors ``v``).
        foreach: update same-shaped parameters together (None: when all parameters share a device type).
        maximize: ascend the objective.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Kron(model.parameters(), lr=1e-3)
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 precond_lr: float = 0.1, precond_init_scale: float = 1.0, update_probability: float | None = None,
                 max_size_triangular: int = 8192, min_ndim_triangular: int = 2, memory_save_mode: str | None = None,
                 momentum_into_precond_update: bool = True, balance_prob: float = 0.01, seed: int = 0, *,
                 foreach: bool | None = None, maximize: bool = False):
        check_range("balance_prob", balance_prob, low=0.0, high=1.0)
        check_range("seed", seed, low=0, integer=True)
        if update_probability is not None:
            check_range("update_probability", update_probability, low=0.0, high=1.0, low_open=True)
        self.balance_prob, self.seed, self.update_probability = float(balance_prob), seed, update_probability
        self._kron_step = 0
        self._rng_states: dict[str, torch.Tensor] = {}
        defaults = defaults_from(locals())
        for key in ("balance_prob", "seed", "update_probability", "defaults"):
            defaults.pop(key, None)
        super().__init__(params, defaults)

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_range("precond_lr", group["precond_lr"], low=0.0, high=1.0, low_open=True)
        check_range("precond_init_scale", group["precond_init_scale"], low=0.0, low_open=True)
        check_range("max_size_triangular", group["max_size_triangular"], low=1, integer=True)
        check_range("min_ndim_triangular", group["min_ndim_triangular"], low=1, integer=True)
        if group["memory_save_mode"] not in MEMORY_SAVE_MODES:
            raise ConfigError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {group['memory_save_mode']!r}")
        check_flag("momentum_into_precond_update", group["momentum_into_precond_update"])

    # --- randomness and checkpointing ---------------------------------------------------------------
    def _uniform(self) -> float:
        """One draw in [0, 1) from the CPU generator (no device sync)."""
        with device_generator(self._rng_states, self.seed, torch.device("cpu")) as gen:
            return torch.rand((), generator=gen, dtype=torch.float64).item()

    def _noise(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``v ~ N(0, I)`` shaped like ``p`` from this device's generator."""
        with device_generator(self._rng_states, self.seed, p.device) as gen:
            return torch.randn(p.shape, generator=gen, dtype=dtype, device=p.device)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["kron"] = {"step": self._kron_step, "seed": self.seed, "balance_prob": self.balance_prob,
                      "update_probability": self.update_probability,
                      "rng_states": copy_states(self._rng_states)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kron", None)
        if extra is None:
            raise ConfigError("not a Kron state_dict: the 'kron' entry is missing")
        super().load_state_dict(state_dict)
        self._kron_step, self.seed = int(extra["step"]), int(extra["seed"])
        self.balance_prob, self.update_probability = float(extra["balance_prob"]), extra["update_probability"]
        self._rng_states = copy_states(extra["rng_states"])

    # --- the step ------------------------------------------------------------------------------------
    def _prepare(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """One decision per step for all groups: update the preconditioner? rebalance?"""
        self._update = self._balance = False
        if not any(ps for _, ps in groups):
            return
        prob = update_probability(self._kron_step) if self.update_probability is None else self.update_probability
        self._update = prob >= 1 or self._uniform() < prob
        self._balance = self._update and self.balance_prob > 0 and self._uniform() < self.balance_prob
        self._kron_step += 1

    @staticmethod
    def _qdtype(p: torch.Tensor) -> torch.dtype:
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32

    def _state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if st:
            return st
        shape = tuple(p.shape) or (1,)
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        scale = group["precond_init_scale"] ** (1 / len(shape))
        for i, (n, diag) in enumerate(zip(shape, diagonal_dims(shape, group), strict=True)):
            q = torch.ones(n, dtype=self._qdtype(p), device=p.device) if diag else \
                torch.eye(n, dtype=self._qdtype(p), device=p.device)
            st[f"Q{i}"] = q.mul_(scale)
        return st

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        states = [self._state(group, p) for p in params]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        ts = [int(s.item()) for s in steps]
        grads = [-p.grad if group["maximize"] else p.grad for p in params]
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_lerp_(bufs, grads, 1 - beta)
        foreach = use_foreach(group["foreach"], params)
        keys = [(ts[i], tuple(p.shape)) for i, p in enumerate(params)]
        for idx in buckets(params, foreach, keys):
            t, shape = keys[idx[0]]
            ps = [params[i] for i in idx]
            qdt = self._qdtype(ps[0])
            full = shape or (1,)
            h = torch.stack([bufs[i] for i in idx]).reshape(len(idx), *full).to(qdt) / (1 - beta ** t) \
                if beta > 0 else torch.stack([grads[i] for i in idx]).reshape(len(idx), *full).to(qdt)
            diag = diagonal_dims(full, group)
            qs = [torch.stack([states[i][f"Q{k}"] for i in idx]) for k in range(len(full))]
            if self._balance and len(shape) > 1:
                qs = self._balanced(qs)
            if self._update:
                fit = h if group["momentum_into_precond_update"] or beta == 0 else \
                    torch.stack([grads[i] for i in idx]).reshape(len(idx), *full).to(qdt)
                v = torch.stack([self._noise(params[i], qdt).reshape(full) for i in idx])
                qs = self._fit(qs, diag, fit, v, group["precond_lr"])
            if self._update or (self._balance and len(shape) > 1):
                for k, q in enumerate(qs):
                    torch._foreach_copy_([states[i][f"Q{k}"] for i in idx], q.unbind(0))
            d = h
            for k, q in enumerate(qs):  # P h = h x_k Q_k^T Q_k
                d = _mode_apply(_mode_apply(d, k, q, diag[k]), k, q, diag[k], transpose=True)
            rms = d.reshape(len(idx), -1).square().mean(-1).sqrt()
            d = d * torch.clamp(1.1 / (rms + 1e-6), max=1.0).reshape(-1, *([1] * len(full)))
            if wd != 0 and len(shape) >= 2:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, [x.reshape(shape).to(p.dtype) for x, p in zip(d.unbind(0), ps, strict=True)],
                                alpha=-lr)

    @staticmethod
    def _balanced(qs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Factors rescaled to the geometric mean of their infinity norms (their Kronecker product unchanged)."""
        norms = torch.stack([q.reshape(q.shape[0], -1).abs().amax(-1) for q in qs])  # (k, B)
        mean = norms.prod(0) ** (1 / len(qs))
        return [q * (mean / n).reshape(-1, *([1] * (q.ndim - 1))) for q, n in zip(qs, norms, strict=True)]

    @staticmethod
    def _fit(qs: list[torch.Tensor], diag: tuple[bool, ...], h: torch.Tensor, v: torch.Tensor,
             step: float) -> list[torch.Tensor]:
        """One normalised step of every factor towards whitening ``h`` (module docstring)."""
        a, b = h, v
        for k, q in enumerate(qs):
            a = _mode_apply(a, k, q, diag[k])
            b = _mode_solve_t(b, k, q, diag[k])
        out = []
        for k, q in enumerate(qs):
            t1, t2 = _gram(a, k, diag[k]), _gram(b, k, diag[k])
            if diag[k]:
                denom = (t1 + t2).abs().amax(-1, keepdim=True) + _TINY
                out.append(q - step * (t1 - t2) * q / denom)
            else:
                denom = (norm_lower_bound(t1 + t2) + _TINY).reshape(-1, 1, 1)
                out.append(q - step * (torch.triu(t1 - t2) / denom) @ q)
        return out
