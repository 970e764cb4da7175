r"""Shampoo with Distributed Shampoo's practical settings: blocking, grafting, epsilon, root frequency, start step.

References: Vineet Gupta, Tomer Koren, Yoram Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization",
ICML 2018, arXiv:1802.09568; Hao-Jun Michael Shi, Tsung-Hsien Lee, Shintaro Iwasaki, Jose Gallego-Posada,
Zhijing Li, Kaushik Rangadurai, Dheevatsa Mudigere, Michael Rabbat, "A Distributed Data-Parallel PyTorch
Implementation of the Distributed Shampoo Optimizer for Training Neural Networks At-Scale", arXiv:2309.06497;
code: github.com/facebookresearch/optimizers (``distributed_shampoo``).

Blocks. A gradient is viewed as Distributed Shampoo does by default: dimensions of size 1 are dropped and
neighbouring dimensions are merged (last ones first) while their product stays <= ``max_preconditioner_dim``
(``merge_dims=False`` keeps the shape), then every dimension is cut into blocks of at most
``max_preconditioner_dim``. So a 6x5 matrix is one 30-vector (a full 30x30 preconditioner) and a 4096x4096
one is 16 blocks of 1024x1024. Each block ``G`` of order ``k`` has one factor per dimension.

Step ``t`` of a parameter ``W`` with gradient ``g`` (``g + wd W`` first when ``decoupled_weight_decay=False``)::

    L_i <- beta2 L_i + (1 - beta2) G_(i) G_(i)^T        (beta2 = 1: L_i <- L_i + G_(i) G_(i)^T, AdaGrad sums)
    m   <- beta1 m + (1 - beta1) g,  m_hat = m / (1 - beta1^t)      (filtered gradient; beta1 = 0: m_hat = g)
    every precondition_frequency steps from start_preconditioning_step on (and at it):
        R_i = (L_i / (1 - beta2^t) + eps I)^{-1/(2k)}   by torch.linalg.eigh (bias correction when beta2 < 1)
    D_graft = m_hat / (sqrt(V / bc_graft) + grafting_epsilon)      the grafted diagonal method's direction
    D = D_graft                                              if t < start_preconditioning_step
    D = M_hat x_1 R_1 ... x_k R_k, rescaled per block to ||D_graft||  (||D_graft|| / (||D|| + 1e-16))  otherwise
    W <- (1 - lr wd) W - lr D

``G_(i)`` is the mode-``i`` unfolding (``G G^T`` and ``G^T G`` for a matrix). The grafting method's second
moment ``V`` is updated with ``g``: ``grafting="adagrad"`` ``V <- V + g^2``; ``"rmsprop"`` ``V <- b V + (1 - b)
g^2``; ``"adam"`` the same with ``bc_graft = 1 - b^t`` (``b = grafting_beta2``); ``"sgd"`` ``D_graft = m_hat``;
``"none"``: no rescaling, and before the start step the filtered gradient itself. Only the second moment is
grafted, the first moment is the shared ``m_hat``, as in Distributed Shampoo.

Inverse roots (Distributed Shampoo's default eigendecomposition with perturbation before the computation):
``A = L / bc + eps I = Q diag(l) Q^T``; where ``min(l) < eps`` the eigenvalues are shifted to ``l - min(l) +
eps``; ``R = Q diag(l^{-1/(2k)}) Q^T``. The eigendecompositions of same-sized factors run batched, in the
factors' dtype or in ``eigh_dtype`` (``"float64"`` is safer for fp32 parameters, at a cost on most GPUs).
Same-shaped blocks of a group are preconditioned together (``foreach``).

Defaults are Distributed Shampoo's constructor defaults -- ``lr=1e-2, betas=(0.9, 1.0), epsilon=1e-12,
max_preconditioner_dim=1024, precondition_frequency=1, start_preconditioning_step=-1`` (= the frequency),
bias correction on, decoupled weight decay -- except grafting: Distributed Shampoo's default is none; ours is
AdaGrad (``grafting_epsilon=1e-10``, its ``AdaGradPreconditionerConfig`` default), which fits ``beta2 = 1``.
Its README's recipe to replace Adam is ``betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=100,
max_preconditioner_dim=8192, grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8``.
Not implemented: ``beta3`` (ours is ``beta1``), iterate averaging / classic momentum configs, other root
methods (coupled Newton), eigenvalue-corrected Shampoo (SOAP), trace scaling, packed storage, failure
tolerance (a failed eigendecomposition raises), and distributed sharding of the preconditioner work.

``pytorch_optimizer.Shampoo`` (4.1.0) is the original Shampoo without grafting or blocking: factors start at
``matrix_eps I`` and sum ``G G^T`` (``beta2 = 1``), inverse ``2k``-th roots by SVD every
``preconditioning_compute_steps``, no dimension merging or squeezing, and a momentum that interpolates the new
gradient with the previous *preconditioned* step (and it modifies ``p.grad`` in place). With
``betas=(0, 1), grafting="none", merge_dims=False``, ``epsilon = matrix_eps``, a ``max_preconditioner_dim``
above every dimension and its ``momentum=0`` the two agree (tested, float64) -- the only difference being
that we add ``eps I`` when taking the root instead of starting the sum at it (the same matrix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import Optimizer, buckets, check_betas, check_flag, defaults_from, use_foreach

__all__ = ["Shampoo", "block_shape", "inverse_root", "split_blocks"]

GRAFTING = ("none", "sgd", "adagrad", "rmsprop", "adam")
EIGH_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64}


def block_shape(shape: Sequence[int], max_dim: int, merge: bool = True) -> tuple[int, ...]:
    """The shape a gradient is viewed in before blocking: without dimensions of size 1, neighbouring dimensions
    merged from the last one while the product stays <= ``max_dim`` (Distributed Shampoo's default with target
    dimensionality 1); ``merge=False``: ``shape`` itself (a scalar as ``(1,)``)."""
    if not merge:
        return tuple(shape) or (1,)
    dims = [d for d in reversed(shape) if d != 1] or [1]
    out = [dims[0]]
    for d in dims[1:]:
        if out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(reversed(out))


def split_blocks(t: torch.Tensor, max_dim: int) -> list[torch.Tensor]:
    """Views of ``t`` cut into blocks of at most ``max_dim`` along every dimension (row-major block order)."""
    blocks = [t]
    for dim in range(t.ndim):
        blocks = [b for blk in blocks for b in blk.split(max_dim, dim=dim)]
    return blocks


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """A batch ``(B, n_0, ..., n_{k-1})`` as ``(B, n_mode, rest)``."""
    return x.movedim(mode + 1, 1).reshape(x.shape[0], x.shape[mode + 1], -1)


def _mode_product(x: torch.Tensor, mode: int, mats: torch.Tensor) -> torch.Tensor:
    """``x x_mode M`` for a batch: ``mats`` ``(B, n, n)`` applied to dimension ``mode`` of each ``x[b]``."""
    moved = x.movedim(mode + 1, 1)
    y = mats @ moved.reshape(x.shape[0], x.shape[mode + 1], -1)
    return y.reshape(moved.shape).movedim(1, mode + 1)


def inverse_root(a: torch.Tensor, exponent: float, epsilon: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(A + eps I)^{-exponent}`` for a batch of symmetric PSD matrices ``(..., n, n)`` by ``torch.linalg.eigh``
    in ``dtype`` (default ``a.dtype``); eigenvalues below ``eps`` are shifted up by ``eps - min`` (Distributed
    Shampoo's perturbation). Returned in ``a.dtype``."""
    work = a.to(dtype or a.dtype)
    work = work + epsilon * torch.eye(a.shape[-1], dtype=work.dtype, device=a.device)
    vals, vecs = torch.linalg.eigh(work)
    low = vals.amin(dim=-1, keepdim=True)
    vals = torch.where(low < epsilon, vals - low + epsilon, vals)
    return ((vecs * vals.pow(-exponent).unsqueeze(-2)) @ vecs.mT).to(a.dtype)


class Shampoo(Optimizer):
    """Shampoo (Gupta et al., 2018) as Distributed Shampoo (Shi et al., 2023) runs it: blocked Kronecker-factored
    preconditioning, grafted to a diagonal method's step norm. See the module docstring for the rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        betas: (beta1, beta2): filtered-gradient EMA in [0, 1) and factor EMA in (0, 1] (1: sums).
        epsilon: added to each factor (``eps I``) before its inverse root; > 0.
        weight_decay: weight decay coefficient.
        decoupled_weight_decay: True (default): ``W <- (1 - lr wd) W``; False: L2, ``g <- g + wd W``.
        max_preconditioner_dim: largest factor size (blocking and merging threshold), an integer >= 1.
        precondition_frequency: recompute the inverse roots every this many steps (integer >= 1).
        start_preconditioning_step: first preconditioned step (before it: the grafting method alone); -1: equal
            to ``precondition_frequency``; otherwise at least ``precondition_frequency``.
        use_bias_correction: bias-correct the filtered gradient and (beta2 < 1) the factors.
        grafting: "none", "sgd", "adagrad", "rmsprop" or "adam": the step norm per block and the method before
            the start step.
        grafting_beta2: second-moment EMA of "rmsprop" / "adam" grafting, in (0, 1].
        grafting_epsilon: added to the grafting method's square root; > 0.
        merge_dims: merge small dimensions and drop size-1 ones (Distributed Shampoo's default) or keep the shape.
        eigh_dtype: dtype of the eigendecompositions: None (the factors'), "float32" or "float64".
        foreach: precondition same-shaped blocks together (None: when all parameters share a device type).
        maximize: ascend the objective.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Shampoo(model.parameters(), lr=1e-2, precondition_frequency=10, grafting="adam")
    """

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 1.0), epsilon: float = 1e-12,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = True, max_preconditioner_dim: int = 1024,
                 precondition_frequency: int = 1, start_preconditioning_step: int = -1,
                 use_bias_correction: bool = True, grafting: str = "adagrad", grafting_beta2: float = 0.999,
                 grafting_epsilon: float = 1e-10, merge_dims: bool = True, eigh_dtype: str | None = None, *,
                 foreach: bool | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a tuple of 2 decay rates (beta1, beta2), got {betas!r}")
        check_betas(betas[:1], "betas", n=1)
        check_range("betas[1]", betas[1], low=0.0, high=1.0, low_open=True)
        group["betas"] = (float(betas[0]), float(betas[1]))
        check_range("epsilon", group["epsilon"], low=0.0, low_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        check_range("max_preconditioner_dim", group["max_preconditioner_dim"], low=1, integer=True)
        check_range("precondition_frequency", group["precondition_frequency"], low=1, integer=True)
        start = check_range("start_preconditioning_step", group["start_preconditioning_step"], low=-1, integer=True)
        if start != -1 and start < group["precondition_frequency"]:
            raise ConfigError(f"start_preconditioning_step={start} is out of range; allowed: -1 (= "
                              f"precondition_frequency) or >= precondition_frequency={group['precondition_frequency']}")
        check_flag("use_bias_correction", group["use_bias_correction"])
        if group["grafting"] not in GRAFTING:
            raise ConfigError(f"grafting must be one of {GRAFTING}, got {group['grafting']!r}")
        check_range("grafting_beta2", group["grafting_beta2"], low=0.0, high=1.0, low_open=True)
        check_range("grafting_epsilon", group["grafting_epsilon"], low=0.0, low_open=True)
        check_flag("merge_dims", group["merge_dims"])
        if group["eigh_dtype"] not in EIGH_DTYPES:
            raise ConfigError(f"eigh_dtype must be one of {tuple(EIGH_DTYPES)}, got {group['eigh_dtype']!r}")

    # --- state ---------------------------------------------------------------------------------------
    def _blocks(self, group: dict[str, Any], t: torch.Tensor) -> list[torch.Tensor]:
        shape = block_shape(t.shape, group["max_preconditioner_dim"], group["merge_dims"])
        return split_blocks(t.reshape(shape), group["max_preconditioner_dim"])

    def _state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if st:
            return st
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        if group["betas"][0] > 0:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["grafting"] in ("adagrad", "rmsprop", "adam"):
            st["graft_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for b, blk in enumerate(self._blocks(group, p)):
            for i, n in enumerate(blk.shape):
                st[f"factor_{b}_{i}"] = torch.zeros(n, n, dtype=p.dtype, device=p.device)
                st[f"root_{b}_{i}"] = torch.eye(n, dtype=p.dtype, device=p.device)
        return st

    # --- the step ------------------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        freq = group["precondition_frequency"]
        start = group["start_preconditioning_step"]
        start = freq if start == -1 else start
        grafting, gb2 = group["grafting"], group["grafting_beta2"]
        states = [self._state(group, p) for p in params]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        ts = [int(s.item()) for s in steps]
        grads = []
        for p in params:
            g = -p.grad if group["maximize"] else p.grad
            if wd != 0 and not group["decoupled_weight_decay"]:
                g = g.add(p, alpha=wd)
            grads.append(g)
        foreach = use_foreach(group["foreach"], params)
        for idx in buckets(params, True, ts):  # parameters at one step count
            t = ts[idx[0]]
            ps, gs, sts = [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]
            filtered = self._filtered(gs, sts, beta1, t, group["use_bias_correction"])
            graft = self._graft(gs, filtered, sts, grafting, gb2, group["grafting_epsilon"], t)
            amortize = (t % freq == 0 and t > start) or t == start
            directions = self._precondition(group, ps, gs, filtered, graft, sts, t, t >= start, amortize, foreach)
            if t < start:  # the factors accumulate from the first step; the grafted method steps alone
                directions = graft if graft is not None else filtered
            if wd != 0 and group["decoupled_weight_decay"]:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, directions, alpha=-lr)

    def _filtered(self, gs: list, sts: list, beta1: float, t: int, bias_correction: bool) -> list[torch.Tensor]:
        if beta1 == 0:
            return list(gs)
        ms = [st["exp_avg"] for st in sts]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        return torch._foreach_div(ms, 1 - beta1 ** t) if bias_correction else list(ms)

    @staticmethod
    def _graft(gs: list, filtered: list, sts: list, grafting: str, beta2: float, eps: float,
               t: int) -> list[torch.Tensor] | None:
        """The grafting method's direction (its second moment updated with the gradient); None for "none"."""
        if grafting == "none":
            return None
        if grafting == "sgd":
            return list(filtered)
        vs = [st["graft_sq"] for st in sts]
        if grafting != "adagrad":
            torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 if grafting == "adagrad" else 1 - beta2)
        denom = torch._foreach_sqrt(vs)
        if grafting == "adam":
            torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
        torch._foreach_add_(denom, eps)
        return torch._foreach_div(filtered, denom)

    def _precondition(self, group: dict[str, Any], ps: list, gs: list, filtered: list, graft: list | None,
                      sts: list, t: int, apply: bool, amortize: bool, foreach: bool) -> list[torch.Tensor] | None:
        """Update the factors with ``gs``; with ``apply``: recompute the roots (``amortize``) and return the
        preconditioned, grafted ``filtered`` directions in the parameters' shapes (else None)."""
        beta2 = group["betas"][1]
        bc2 = 1 - beta2 ** t if group["use_bias_correction"] and beta2 < 1 else 1.0
        eigh_dtype = EIGH_DTYPES[group["eigh_dtype"]]
        # every block: (parameter index, block index, gradient block, filtered block, graft block)
        entries = []
        outs = []
        for j, p in enumerate(ps):
            out = torch.empty(block_shape(p.shape, group["max_preconditioner_dim"], group["merge_dims"]),
                              dtype=p.dtype, device=p.device)
            outs.append(out)
            gb, fb = self._blocks(group, gs[j]), self._blocks(group, filtered[j])
            ob = split_blocks(out, group["max_preconditioner_dim"])
            graft_b = self._blocks(group, graft[j]) if graft is not None else [None] * len(gb)
            entries += [(j, b, gb[b], fb[b], ob[b], graft_b[b]) for b in range(len(gb))]
        keys = [tuple(e[2].shape) for e in entries]
        for idx in buckets([e[2] for e in entries], foreach, keys):
            chunk = [entries[i] for i in idx]
            g = torch.stack([e[2] for e in chunk])
            x = torch.stack([e[3] for e in chunk])
            order = g.ndim - 1
            for mode in range(order):
                factors = [sts[e[0]][f"factor_{e[1]}_{mode}"] for e in chunk]
                u = _unfold(g, mode)
                outer = (u @ u.mT).unbind(0)
                if beta2 == 1:
                    torch._foreach_add_(factors, outer)
                else:
                    torch._foreach_mul_(factors, beta2)
                    torch._foreach_add_(factors, outer, alpha=1 - beta2)
                if not apply:
                    continue
                roots = [sts[e[0]][f"root_{e[1]}_{mode}"] for e in chunk]
                if amortize:
                    fresh = inverse_root(torch.stack(factors) / bc2, 1 / (2 * order), group["epsilon"], eigh_dtype)
                    torch._foreach_copy_(roots, fresh.unbind(0))
                    x = _mode_product(x, mode, fresh)
                else:
                    x = _mode_product(x, mode, torch.stack(roots))
            if not apply:
                continue
            if graft is not None:  # per block: ||D_graft|| / (||D|| + 1e-16)
                graft_norm = torch.stack([torch.linalg.vector_norm(e[5]) for e in chunk])
                norm = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
                x = x * (graft_norm / (norm + 1e-16)).reshape(-1, *([1] * order))
            torch._foreach_copy_([e[4] for e in chunk], x.unbind(0))
        return [out.reshape(p.shape) for out, p in zip(outs, ps, strict=True)] if apply else None
