r"""AuON and Hybrid-AuON: linear-time alternatives to Muon's orthogonalised momentum.

Paper: Dipan Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
arXiv:2509.24320 (2025; v1). Code: github.com/ryyzn9/AuON.

Update rule for a matrix parameter ``W`` (shape ``m x n``; a conv weight ``(out, in, kh, kw)`` is
viewed as ``(out, in*kh*kw)``), with gradient ``g_t``::

    M_t   = beta M_{t-1} + (1 - beta) g_t                       (momentum buffer, as in Muon)
    V_t   = (1 - beta) g_t + beta M_t   if nesterov else M_t
    G_t   = V_t / (||V_t||_F + 1e-7)                            (unit Frobenius norm)
    U_t   = G_t / (sqrt(mean_ij cosh(G_t)_ij^2) + 1e-8)         (cosh-RMS "brake", linear time)
    W_t   = (1 - lr wd) W_{t-1} - lr sqrt(max(1, m/n)) U_t

Since ``||G_t||_2 <= ||G_t||_F = 1`` and ``cosh >= 1``, ``||U_t||_2 < 1``: the step stays inside a
spectral-norm trust region without any matrix factorisation; the cosh RMS grows with heavy-tailed
entries and so shrinks spiky updates harder.

Hybrid-AuON applies one quintic Newton-Schulz step (Muon's coefficients
``(a, b, c) = (3.4445, -4.7750, 2.0315)``) to the normalised momentum before the cosh-RMS scaling::

    X = V_t / (||V_t||_F + 1e-7);   X <- a X + (b X X^T + c (X X^T)^2) X   (on the short side)
    then G_t = X / (||X||_F + 1e-7) and U_t as above.

Non-matrix parameters (biases, norm gains, anything with ``ndim < 2``) and every parameter of a group
with ``use_adamw=True`` (the paper's and the reference code's choice for embeddings and the output
head) are updated by AdamW with the same betas/eps semantics as ``torch.optim.AdamW`` and learning rate
``lr * adamw_lr_ratio``. The reference code trains small parameters with Adam at lr 0.008 next to AuON
at lr 0.08, hence ``adamw_lr_ratio=0.1``.

Defaults: ``lr=0.08, momentum=0.95, weight_decay=0.01`` come from the repository's README example;
``nesterov=True`` and the ``1e-7``/``1e-8`` constants from the paper's description and code;
``adamw_betas=(0.8, 0.95)`` from the README's Adam for small parameters.
Difference from the reference repository's ``optimizer.py``: that file multiplies the normalised
momentum by an extra ``gamma=1.5`` inside ``cosh`` and divides the *unnormalised* momentum by the RMS;
we follow the paper's formula above (unit-Frobenius ``G_t`` inside and outside ``cosh``).
No ``pytorch_optimizer`` equivalent exists.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..errors import ConfigError, check_range

__all__ = ["AuON", "HybridAuON"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NORM_EPS = 1e-7
_RMS_EPS = 1e-8


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix: ``(out, in*kh*kw)`` for conv weights, unchanged for 2-D tensors."""
    return t.reshape(t.shape[0], -1)


def newton_schulz5_step(x: torch.Tensor) -> torch.Tensor:
    """One quintic Newton-Schulz step ``a X + (b A + c A^2) X`` with ``A = X X^T`` on the short side.

    ``x`` has shape ``(..., m, n)``; a batch of same-shaped matrices is handled in one call.
    """
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # fused baddbmm: one rounding per product in low precision, as torch.optim.Muon
    gram = x @ x.mT
    x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a).reshape(shape)
    return x.mT if tall else x


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


def _check_betas(name: str, betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, low=0.0, high=1.0, high_open=True)
    return float(betas[0]), float(betas[1])


def check_adamw_args(adamw_lr_ratio, adamw_betas, adamw_eps):
    check_range("adamw_lr_ratio", adamw_lr_ratio, low=0.0)
    betas = _check_betas("adamw_betas", adamw_betas)
    check_range("adamw_eps", adamw_eps, low=0.0, low_open=True)
    return betas


def use_foreach(foreach: bool | None, params: list[torch.Tensor]) -> bool:
    if foreach is not None:
        return foreach
    return len({p.device.type for p in params}) <= 1


def collect_grads(optimizer: torch.optim.Optimizer, group: dict) -> tuple[list, list]:
    """Parameters of ``group`` that have a gradient, and their (possibly negated) gradients."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
        params.append(p)
        grads.append(-p.grad if group["maximize"] else p.grad)
    return params, grads


def adamw_update(optimizer: torch.optim.Optimizer, params: list, grads: list, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, foreach: bool) -> None:
    """AdamW (decoupled weight decay, bias-corrected) on ``params``; state: step, exp_avg, exp_avg_sq."""
    if not params:
        return
    beta1, beta2 = betas
    states = [optimizer.state[p] for p in params]
    for p, st in zip(params, states, strict=True):
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if not foreach:
        for p, g, st in zip(params, grads, states, strict=True):
            st["step"] += 1
            t = st["step"].item()
            p.mul_(1 - lr * weight_decay)
            st["exp_avg"].lerp_(g, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
        return
    steps = [st["step"] for st in states]
    exp_avgs = [st["exp_avg"] for st in states]
    exp_avg_sqs = [st["exp_avg_sq"] for st in states]
    torch._foreach_add_(steps, 1)
    ts = [s.item() for s in steps]
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1 ** t) for t in ts])


def split_matrix_params(group: dict, params: list, grads: list):
    """(matrix params, their grads), (AdamW params, their grads) for ``group``."""
    mat, mat_g, vec, vec_g = [], [], [], []
    for p, g in zip(params, grads, strict=True):
        if p.ndim >= 2 and not group["use_adamw"]:
            mat.append(p)
            mat_g.append(g)
        else:
            vec.append(p)
            vec_g.append(g)
    return (mat, mat_g), (vec, vec_g)


def by_shape(tensors: list[torch.Tensor]) -> dict:
    """Indices of ``tensors`` grouped by (matrix shape, device, dtype), for batching."""
    out: dict = defaultdict(list)
    for i, t in enumerate(tensors):
        out[(tuple(matrix_view(t).shape), t.device, t.dtype)].append(i)
    return out


def momentum_matrix_step(optimizer: torch.optim.Optimizer, params: list, grads: list, *, lr: float,
                         weight_decay: float, momentum: float, nesterov: bool, scales: list[float], direction,
                         foreach: bool) -> None:
    """Shared matrix step of AuON and Muon; state: ``momentum_buffer``. With ``V`` the (Nesterov) momentum::

        M <- lerp(M, g, 1 - momentum);  V = lerp(g, M, momentum) if nesterov else M
        W <- (1 - lr wd) W - lr * scale * direction(matrix_view(V))

    ``direction`` maps a batch ``(..., m, n)`` to same-shaped updates; same-shaped matrices are batched
    when ``foreach``.
    """
    bufs = []
    for p in params:
        st = optimizer.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs.append(st["momentum_buffer"])
    if not foreach:
        for p, g, buf, s in zip(params, grads, bufs, scales, strict=True):
            buf.lerp_(g, 1 - momentum)
            v = g.lerp(buf, momentum) if nesterov else buf
            u = direction(matrix_view(v))
            p.mul_(1 - lr * weight_decay)
            p.add_(u.view_as(p).to(p.dtype), alpha=-lr * s)
        return
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    vs = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    updates: list = [None] * len(params)
    for idx in by_shape(vs).values():  # batch same-shaped matrices
        u = direction(torch.stack([matrix_view(vs[i]) for i in idx]))
        for j, i in enumerate(idx):
            updates[i] = u[j].view_as(params[i]).to(params[i].dtype)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_mul_(updates, [-lr * s for s in scales])
    torch._foreach_add_(params, updates)


class AuON(torch.optim.Optimizer):
    """AuON (Maity, 2025, arXiv:2509.24320): momentum normalised to unit Frobenius norm, then divided by
    the RMS of its elementwise cosh; AdamW for non-matrix parameters. See the module docstring."""

    _hybrid = False

    def __init__(self, params, lr: float = 0.08, momentum: float = 0.95, weight_decay: float = 0.01,
                 nesterov: bool = True, adamw_lr_ratio: float = 0.1, adamw_betas: tuple[float, float] = (0.8, 0.95),
                 adamw_eps: float = 1e-8, use_adamw: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False):
        check_range("lr", lr, low=0.0)
        check_range("momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", weight_decay, low=0.0)
        _check_bool("nesterov", nesterov)
        adamw_betas = check_adamw_args(adamw_lr_ratio, adamw_betas, adamw_eps)
        _check_bool("use_adamw", use_adamw)
        _check_bool("maximize", maximize)
        if foreach is not None:
            _check_bool("foreach", foreach)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        adamw_lr_ratio=adamw_lr_ratio, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                        use_adamw=use_adamw, foreach=foreach, maximize=maximize)
        super().__init__(params, defaults)

    def _direction(self, v: torch.Tensor) -> torch.Tensor:
        """``U`` from the (batched, ``(..., m, n)``) momentum direction ``v``."""
        if self._hybrid:
            v = newton_schulz5_step(v / (torch.linalg.matrix_norm(v, keepdim=True) + _NORM_EPS))
        g = v / (torch.linalg.matrix_norm(v, keepdim=True) + _NORM_EPS)
        rms = torch.cosh(g).square().mean(dim=(-2, -1), keepdim=True).sqrt()
        return g / (rms + _RMS_EPS)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = collect_grads(self, group)
            foreach = use_foreach(group["foreach"], params)
            (mat, mat_g), (vec, vec_g) = split_matrix_params(group, params, grads)
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            adamw_update(self, vec, vec_g, lr=lr * group["adamw_lr_ratio"], betas=group["adamw_betas"],
                         eps=group["adamw_eps"], weight_decay=wd, foreach=foreach)
            if not mat:
                continue
            scales = [math.sqrt(max(1.0, matrix_view(p).shape[0] / matrix_view(p).shape[1])) for p in mat]
            momentum_matrix_step(self, mat, mat_g, lr=lr, weight_decay=wd, momentum=beta, nesterov=group["nesterov"],
                                 scales=scales, direction=self._direction, foreach=foreach)
        return loss


class HybridAuON(AuON):
    """Hybrid-AuON (Maity, 2025, arXiv:2509.24320): AuON with one quintic Newton-Schulz step applied to
    the Frobenius-normalised momentum before the cosh-RMS scaling. See the module docstring."""

    _hybrid = True
