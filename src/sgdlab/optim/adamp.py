r"""AdamP and SGDP: momentum optimizers that drop the radial part of the update on scale-invariant weights.

Paper: Byeongho Heo, Sanghyuk Chun, Seong Joon Oh, Dongyoon Han, Sangdoo Yun, Gyuwan Kim, Youngjung Uh,
Jung-Woo Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
ICLR 2021, arXiv:2006.08217.

A weight ``w`` that feeds a normalization layer (BN, LN, WN) is scale-invariant: the loss does not change
when ``w`` is rescaled. Momentum then keeps pushing along ``w`` itself, the norm ``||w||`` grows, and the
effective step size ``lr / ||w||^2`` decays too early. The paper's remedy is to remove the radial component
of the update whenever a weight looks scale-invariant:

    cos(a, b)  = |<a, b>| / (||a|| ||b||)
    Pi_w(x)    = x - <w_hat, x> w_hat,          w_hat = w / (||w|| + eps)
    q_t        = Pi_{w_t}(p_t)   if cos(w_t, g_t) < delta / sqrt(dim(w))      (scale-invariant)
               = p_t             otherwise
    w_{t+1}    = w_t - lr * q_t

where ``g_t`` is the gradient and ``p_t`` the update of the base optimizer (below). The test uses the
fact that the gradient of a scale-invariant weight is orthogonal to it; a random direction in ``dim``
dimensions has a cosine of order ``1 / sqrt(dim)`` with ``w``, and ``delta`` sets how much smaller it must be.
Bias correction, Nesterov and the weight-decay details follow the authors' code (clovaai/AdamP).

**Channel view and layer view.** Invariance can hold per output channel (BN: each row ``w[c]`` of the
weight reshaped to ``(out_channels, -1)``) or for the whole tensor (LN, WN); the paper covers both. As in
the authors' code, the channel view is tried first: if *every* channel passes its test with ``dim = fan-in``
(``w[c].numel()``), each channel's update is projected on its own ``w_hat[c]``. Otherwise the layer view is
tried (the flattened tensor, ``dim = w.numel()``) and the whole update is projected on ``w_hat``. If
neither passes, the update is left unchanged.

**Which parameters.** Only parameters with two or more dimensions (linear, conv and embedding weights)
are tested and projected. Parameters with fewer than two dimensions (biases, norm gains and shifts,
scalars) always get the plain Adam / SGD update and the full weight decay.

**Weight decay** is decoupled (AdamW style, as in the authors' code): ``w <- w * (1 - lr * wd * r)``
before the step, with ``r = wd_ratio`` on projected weights (their norm no longer grows, so they need less
decay) and ``r = 1`` otherwise. SGDP divides ``r`` by ``1 - momentum``, as the authors' code does.

AdamP base update (Adam with bias correction; ``nesterov`` uses the look-ahead numerator):

    m_t = beta1 m_{t-1} + (1 - beta1) g_t,      v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    p_t = (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps)
    nesterov: m_t is replaced by beta1 m_t + (1 - beta1) g_t in p_t

SGDP base update (heavy-ball momentum with dampening, optional Nesterov):

    b_t = momentum b_{t-1} + (1 - dampening) g_t
    p_t = b_t,    or   g_t + momentum b_t   with nesterov

Cosine similarity in code: ``|<a, b>| / (max(||a||, eps) max(||b||, eps))``.

**Defaults.** ``delta = 0.1`` and ``wd_ratio = 0.1`` are the paper's values, ``eps = 1e-8`` the authors'
code's. AdamP's ``lr = 1e-3``, ``betas = (0.9, 0.999)`` are Adam's, as in the authors' code. SGDP's
``lr = 0.1``, ``momentum = 0.9`` are the usual ImageNet SGD setting the paper's ResNet experiments start
from (the authors' code has no default lr and ``momentum = 0``; momentum 0 leaves nothing for the paper's
fix to act on). ``weight_decay`` defaults to 0 as in torch.optim.

**Difference from pytorch_optimizer (4.1).** Its AdamP computes ``sqrt(1 - beta2^t) / (sqrt(v_t) + eps)``,
i.e. it adds ``eps`` before the bias correction of ``v``; we follow Adam (and the authors' code) and add it
after: ``1 / (sqrt(v_t / (1 - beta2^t)) + eps)``. The two coincide for ``eps = 0``. Its SGDP has the same
update as ours.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import ElementwiseOptimizer, check_betas, check_flag, defaults_from
from ._compiled import Kernel

__all__ = ["AdamP", "SGDP"]


# --------------------------------------------------------------------------------------------------------
# Projection, one parameter at a time (eager path)
# --------------------------------------------------------------------------------------------------------

def _project_one(w: torch.Tensor, g: torch.Tensor, u: torch.Tensor, delta: float, eps: float) -> bool:
    """Remove the radial part of ``u`` in place if ``w`` passes the channel or the layer test."""
    if w.dim() < 2 or w.numel() == 0:
        return False
    for rows in (w.shape[0], 1):  # channel view first, then layer view
        w2, g2 = w.reshape(rows, -1), g.reshape(rows, -1)
        w_norm, g_norm = w2.norm(dim=1), g2.norm(dim=1)
        cos = (w2 * g2).sum(dim=1).abs() / (w_norm.clamp_min(eps) * g_norm.clamp_min(eps))
        if bool(cos.max() < delta / math.sqrt(w2.shape[1])):
            w_hat = w2 / (w_norm + eps).unsqueeze(1)
            u2 = u.view(rows, -1)
            u2.sub_(w_hat * (w_hat * u2).sum(dim=1, keepdim=True))
            return True
    return False


# --------------------------------------------------------------------------------------------------------
# Projection for a list of same-device, same-dtype parameters (fast path)
# --------------------------------------------------------------------------------------------------------

def _project_many(ws: list[torch.Tensor], gs: list[torch.Tensor], us: list[torch.Tensor], delta: float,
                  eps: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batched :func:`_project_one` over tensors with ``dim() >= 2``, without a per-tensor loop of compute.

    All tensors are flattened into one vector; per-row (channel) sums come from one ``segment_reduce``
    and per-tensor (layer) sums from a second one over the row sums. Returns the projected updates (new
    tensors, views of one buffer) and a bool tensor saying which tensors were projected.
    """
    dev = ws[0].device
    shapes = [w.shape for w in ws]
    numels = [w.numel() for w in ws]
    rows = [s[0] for s in shapes]
    cols = [n // r for n, r in zip(numels, rows, strict=True)]
    total, n_rows = sum(numels), sum(rows)
    rows_t = torch.tensor(rows, device=dev)
    row_len = torch.tensor(cols, device=dev).repeat_interleave(rows_t, output_size=n_rows)
    cols_t = torch.tensor(cols, device=dev, dtype=ws[0].dtype)
    numels_t = torch.tensor(numels, device=dev, dtype=ws[0].dtype)

    W = torch.cat([w.reshape(-1) for w in ws])
    G = torch.cat([g.reshape(-1) for g in gs])
    U = torch.cat([u.reshape(-1) for u in us])

    def row_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(x, "sum", lengths=row_len)

    def per_tensor(x: torch.Tensor, how: str = "sum") -> torch.Tensor:
        return torch.segment_reduce(x, how, lengths=rows_t)

    def expand_rows(x: torch.Tensor) -> torch.Tensor:  # one value per tensor -> one per row
        return x.repeat_interleave(rows_t, output_size=n_rows)

    ww, gg, wg, wu = row_sum(W * W), row_sum(G * G), row_sum(W * G), row_sum(W * U)

    def cosine(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
        return dot.abs() / (sq_a.sqrt().clamp_min(eps) * sq_b.sqrt().clamp_min(eps))

    # Channel view: every channel of the tensor must pass, with dim = fan-in.
    channel = per_tensor(cosine(wg, ww, gg), "max") < delta / cols_t.sqrt()
    # Layer view: the whole tensor, dim = numel.
    lww, lgg, lwg, lwu = per_tensor(ww), per_tensor(gg), per_tensor(wg), per_tensor(wu)
    layer = cosine(lwg, lww, lgg) < delta / numels_t.sqrt()

    # Radial part of u along w_hat = w / (||w|| + eps):  w * <w, u> / (||w|| + eps)^2, per row or per tensor.
    coef_channel = wu / (ww.sqrt() + eps) ** 2
    coef_layer = expand_rows(lwu / (lww.sqrt() + eps) ** 2)
    coef = torch.where(expand_rows(channel), coef_channel,
                       torch.where(expand_rows(layer), coef_layer, torch.zeros_like(coef_layer)))
    U = torch.addcmul(U, W, coef.repeat_interleave(row_len, output_size=total), value=-1.0)
    out = [part.view(s) for part, s in zip(U.split(numels), shapes, strict=True)]
    return out, channel | layer


def _split_by_ndim(params: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Indices of the (non-empty) tensors with ``dim() >= 2``, and of all the others."""
    mats = [i for i, t in enumerate(params) if t.dim() >= 2 and t.numel() > 0]
    others = [i for i, t in enumerate(params) if not (t.dim() >= 2 and t.numel() > 0)]
    return mats, others


def _projected_step_many(params: list[torch.Tensor], grads: list[torch.Tensor], updates: list[torch.Tensor],
                         step_sizes: list[float], *, delta: float, eps: float, decay: float,
                         wd_ratio: float) -> None:
    """Project the updates of matrix-shaped params, apply decoupled weight decay, then
    ``p -= step_size * update``. ``decay`` is ``lr * weight_decay`` (already divided by ``1 - momentum``
    for SGDP)."""
    mats, others = _split_by_ndim(params)
    updates = list(updates)
    if mats:
        projected_updates, projected = _project_many([params[i] for i in mats], [grads[i] for i in mats],
                                                     [updates[i] for i in mats], delta, eps)
        for i, u in zip(mats, projected_updates, strict=True):
            updates[i] = u
        if decay != 0.0:
            ref = params[mats[0]]  # factors in the params' dtype (a Python-scalar torch.where would be float32)
            factors = torch.where(projected, ref.new_tensor(1.0 - decay * wd_ratio), ref.new_tensor(1.0 - decay))
            torch._foreach_mul_([params[i] for i in mats], list(factors.unbind(0)))
    if others and decay != 0.0:
        torch._foreach_mul_([params[i] for i in others], 1.0 - decay)
    scaled = torch._foreach_mul(updates, [-s for s in step_sizes])
    torch._foreach_add_(params, scaled)


# --------------------------------------------------------------------------------------------------------
# Compiled kernels (sgdlab.optim._compiled): one parameter's whole step, projection included
# --------------------------------------------------------------------------------------------------------

def _projected_update(p, g, u, step_size, decay, decay_projected, threshold_channel, threshold_layer,
                      eps: float) -> None:
    """``p <- p * factor - step_size * q`` with ``q`` the update ``u`` projected as :func:`_project_one` decides
    (channel view, else layer view, else none; decided with tensor ops, no host sync) and ``factor``
    ``decay_projected`` if projected else ``decay``. Thresholds: ``delta / sqrt(fan-in)`` and
    ``delta / sqrt(numel)``."""
    if p.dim() < 2 or p.numel() == 0:
        p.copy_(p * decay - step_size * u)
        return
    rows = p.shape[0]
    w, gr, ur = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
    ww, gg, wg, wu = (w * w).sum(1), (gr * gr).sum(1), (w * gr).sum(1), (w * ur).sum(1)

    def cosine(dot, sq_a, sq_b):
        return dot.abs() / (sq_a.sqrt().clamp_min(eps) * sq_b.sqrt().clamp_min(eps))

    channel = cosine(wg, ww, gg).amax() < threshold_channel
    lww = ww.sum()
    layer = cosine(wg.sum(), lww, gg.sum()) < threshold_layer
    # radial part of u along w_hat = w / (||w|| + eps): w <w, u> / (||w|| + eps)^2, per row or for the tensor
    coef = torch.where(channel, wu / (ww.sqrt() + eps) ** 2,
                       torch.where(layer, wu.sum() / (lww.sqrt() + eps) ** 2, torch.zeros_like(wu)))
    factor = torch.where(channel | layer, decay_projected, decay)
    p.copy_((w * factor - step_size * (ur - w * coef.unsqueeze(1))).view(p.shape))


def _adamp_kernel(p, g, m, v, step_size, bc2, decay, decay_projected, threshold_channel, threshold_layer,
                  beta1: float, beta2: float, eps: float, nesterov: bool) -> None:
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    num = m * beta1 + g * (1 - beta1) if nesterov else m
    _projected_update(p, g, num / (v.sqrt() / bc2 + eps), step_size, decay, decay_projected, threshold_channel,
                      threshold_layer, eps)


def _sgdp_kernel(p, g, buf, lr, decay, decay_projected, threshold_channel, threshold_layer, momentum: float,
                 dampening: float, eps: float, nesterov: bool) -> None:
    buf.mul_(momentum).add_(g, alpha=1 - dampening)
    _projected_update(p, g, g + momentum * buf if nesterov else buf, lr, decay, decay_projected,
                      threshold_channel, threshold_layer, eps)


def _thresholds(p: torch.Tensor, delta: float) -> list[float]:
    """The channel and layer tests' thresholds ``delta / sqrt(dim)`` (unused for vectors)."""
    if p.dim() < 2 or p.numel() == 0:
        return [0.0, 0.0]
    return [delta / math.sqrt(p.numel() // p.shape[0]), delta / math.sqrt(p.numel())]


# --------------------------------------------------------------------------------------------------------
# The optimizers
# --------------------------------------------------------------------------------------------------------

class _Projected(ElementwiseOptimizer):
    """What AdamP and SGDP share: the projection, decoupled weight decay and the kernels' thresholds.

    ``foreach=None`` takes the multi-tensor path on CUDA only (one launch for many tensors): on the 2-core CPU
    the per-parameter path is 1.4x (0.45M parameters) to 5.8x (10M) faster than the multi-tensor path, whose
    per-channel reductions go through ``segment_reduce`` (BENCHMARKS.md)."""

    foreach_devices = ("cuda",)

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_range("delta", group["delta"], low=0.0)
        check_range("wd_ratio", group["wd_ratio"], low=0.0, high=1.0)
        check_range("eps", group["eps"], low=0.0)
        check_flag("nesterov", group["nesterov"])

    def _decay(self, group: dict[str, Any]) -> float:
        """``lr * weight_decay`` (SGDP: divided by ``1 - momentum``)."""
        return group["lr"] * group["weight_decay"]

    def _project_and_step(self, group, p, g, u, step_size: float) -> None:
        """Project the updates ``u`` of the scale-invariant weights, decay, then ``p -= step_size * u``."""
        _projected_step_many(p, g, u, [step_size] * len(p), delta=group["delta"], eps=group["eps"],
                             decay=self._decay(group), wd_ratio=group["wd_ratio"])

    def _compiled(self, mode, group, params, grads, states, columns) -> None:
        ts: list[Any] = [None] * len(params)
        if self.counted:
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1.0)
            ts = [s.item() for s in steps]
        coefs = [[*self._coefficients(group, t), *_thresholds(p, group["delta"])] for p, t in zip(params, ts,
                                                                                                   strict=True)]
        self.kernel.run(mode, list(zip(params, grads, *columns, strict=True)), coefs, self._constants(group))


class AdamP(_Projected):
    """Adam with the radial component removed on scale-invariant weights (Heo et al., ICLR 2021).

    See the module docstring for the update rule. Arguments: ``lr`` (default 1e-3), ``betas`` (0.9, 0.999),
    ``eps`` (1e-8; Adam denominator, cosine and projection guard), ``weight_decay`` (0, decoupled),
    ``delta`` (0.1, threshold of the scale-invariance test), ``wd_ratio`` (0.1, weight-decay multiplier on
    projected weights), ``nesterov`` (False), ``foreach`` (None: multi-tensor path when all params are on
    CUDA, per-parameter path otherwise), ``compiled`` (None: a compiled kernel per tensor for groups of at
    least 4M elements; True/"tensor", "group" or False, see :mod:`sgdlab.optim._compiled`), ``maximize`` (False).
    """

    state_names = ("exp_avg", "exp_avg_sq")
    kernel = Kernel(_adamp_kernel, "AdamP", flatten=False)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False,
                 *, foreach: bool | None = None, compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        group["betas"] = check_betas(group["betas"])

    def _update(self, group, t, p, g, m, v, ops) -> None:
        if not ops.batched:  # the per-parameter path (the CPU's default): the projection one tensor at a time
            self._update_one(group, t, p, g, m, v)
            return
        beta1, beta2 = group["betas"]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
        torch._foreach_add_(denom, group["eps"])
        num = m
        if group["nesterov"]:
            num = torch._foreach_mul(m, beta1)
            torch._foreach_add_(num, g, alpha=1 - beta1)
        self._project_and_step(group, p, g, torch._foreach_div(num, denom), group["lr"] / (1 - beta1 ** t))

    def _update_one(self, group, t, p, g, m, v) -> None:
        (beta1, beta2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        update = (m * beta1 + g * (1 - beta1) if group["nesterov"] else m) / denom
        projected = _project_one(p, g, update, group["delta"], eps)
        if wd != 0.0:
            p.mul_(1 - lr * wd * (group["wd_ratio"] if projected else 1.0))
        p.add_(update, alpha=-lr / (1 - beta1 ** t))

    def _coefficients(self, group: dict[str, Any], t: float) -> list[float]:
        (beta1, beta2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
        return [lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t), 1 - lr * wd, 1 - lr * wd * group["wd_ratio"]]

    def _constants(self, group: dict[str, Any]) -> tuple:
        return (*group["betas"], group["eps"], group["nesterov"])


class SGDP(_Projected):
    """SGD with momentum and the radial component removed on scale-invariant weights (Heo et al., ICLR 2021).

    See the module docstring for the update rule. Arguments: ``lr`` (default 0.1), ``momentum`` (0.9,
    in [0, 1)), ``dampening`` (0), ``weight_decay`` (0, decoupled, divided by ``1 - momentum``), ``nesterov``
    (False; needs momentum > 0 and dampening = 0), ``eps`` (1e-8; cosine and projection guard), ``delta``
    (0.1), ``wd_ratio`` (0.1), ``foreach`` (None: multi-tensor path when all params are on CUDA),
    ``compiled`` (as AdamP's), ``maximize`` (False).
    """

    state_names = ("momentum_buffer",)
    counted = False
    kernel = Kernel(_sgdp_kernel, "SGDP", flatten=False)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1, *, foreach: bool | None = None, compiled: bool | str | None = None,
                 maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        momentum, dampening = group["momentum"], group["dampening"]
        check_range("momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_range("dampening", dampening, low=0.0, high=1.0)
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ConfigError(f"nesterov=True requires momentum > 0 and dampening = 0, got momentum={momentum!r}, "
                              f"dampening={dampening!r}")

    def _decay(self, group: dict[str, Any]) -> float:
        return group["lr"] * group["weight_decay"] / (1 - group["momentum"])

    def _update(self, group, t, p, g, buf, ops) -> None:
        mom, damp, lr, wd = group["momentum"], group["dampening"], group["lr"], group["weight_decay"]
        if ops.batched:
            torch._foreach_mul_(buf, mom)
            torch._foreach_add_(buf, g, alpha=1 - damp)
            self._project_and_step(group, p, g, torch._foreach_add(g, buf, alpha=mom) if group["nesterov"] else buf,
                                   lr)
            return
        # the per-parameter path (the CPU's default)
        buf.mul_(mom).add_(g, alpha=1 - damp)
        update = g + mom * buf if group["nesterov"] else buf.clone()  # the projection works in place
        projected = _project_one(p, g, update, group["delta"], group["eps"])
        if wd != 0.0:
            p.mul_(1 - lr * wd * (group["wd_ratio"] if projected else 1.0) / (1 - mom))
        p.add_(update, alpha=-lr)

    def _coefficients(self, group: dict[str, Any], t: None) -> list[float]:
        decay = self._decay(group)
        return [group["lr"], 1 - decay, 1 - decay * group["wd_ratio"]]

    def _constants(self, group: dict[str, Any]) -> tuple:
        return group["momentum"], group["dampening"], group["eps"], group["nesterov"]
