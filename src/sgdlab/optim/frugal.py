r"""FRUGAL: full-rank updates with gradient splitting (Adam in a small subspace, signSGD/SGD elsewhere).

Paper: Philip Zmushko, Aleksandr Beznosikov, Martin Takáč, Samuel Horváth, "FRUGAL: Memory-Efficient
Optimization by Reducing State Overhead for Scalable Training", arXiv:2411.07837 (2024; ICML 2025).

Every ``update_gap`` (T) steps a projector ``P`` onto a low-dimensional "state-full" subspace is chosen for
each split parameter. With gradient ``G_k`` (the paper's Algorithm 1, state-full = Adam, state-free =
signSGD or SGD)::

    G_low  = P(G_k)                                  (coordinates in the state-full subspace)
    G_free = G_k - P^{-1}(G_low)                     (the rest of the gradient)
    m = beta1 m + (1 - beta1) G_low,   v = beta2 v + (1 - beta2) G_low^2      (state lives in the subspace)
    U_full = - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    U_free = - state_free_lr * sign(G_free)          (signSGD; ``state_free="sgd"``: - state_free_lr * G_free)
    theta  = theta (1 - lr * weight_decay) + P^{-1}(U_full) + U_free

so the update is full-rank although the Adam state has only the subspace's size. ``t`` counts steps since the
state was last (re)initialised.

Subspaces (``projection``):

- ``"svd"`` (GaLore-style): a matrix ``G`` of shape ``m x n`` (a conv weight ``(out, in, kh, kw)`` is viewed
  as ``(out, in*kh*kw)``) is projected on its smaller side with the top-``r`` singular vectors of the
  gradient at the refresh step: if ``m >= n``, ``P(G) = G Q`` with ``Q`` the first ``r`` right singular
  vectors (``n x r``) and ``P^{-1}(X) = X Q^T``; otherwise ``P(G) = U^T G`` with ``U`` the first ``r`` left
  singular vectors. ``r = round(rho * min(m, n))`` unless ``rank`` is given. If ``r = min(m, n)`` the
  residual is zero in exact arithmetic and no state-free step is taken.
- ``"blocks"`` (BAdam-style): whole tensors are the blocks. Every T steps ``round(rho * N)`` of the group's
  ``N`` split matrices are drawn uniformly at random (a fresh draw each time, as the authors' default
  ``block_order="random"``) from a ``torch.Generator`` owned by the optimizer (seeded by ``seed``; its state
  is in ``state_dict()``); they get Adam, the others the state-free step and hold no Adam state at all.

State on a subspace change: the Adam state (m, v and the bias-correction count) is reset to zero, the
authors' default (``reset_statistics=True`` in their code; keeping the old state unprojected is GaLore's
choice, not FRUGAL's). So with ``projection="blocks", rho=1`` split matrices follow exactly AdamW restarted
every ``update_gap`` steps (vectors are never split, so never reset), and AdamW itself when ``update_gap``
exceeds the run; with ``rho=0`` (either projection) split matrices follow plain signSGD/SGD with
``state_free_lr``.

Parameters that are not split: the paper keeps Embeddings, RMSNorms and the output layer (Logits) state-full
and splits only the Linear layers of the transformer blocks. Here every parameter with fewer than two
dimensions (biases, norm gains) is always updated by AdamW with the group's lr, and a param group with
``split=False`` is AdamW throughout: put embeddings and the output layer in such a group to follow the paper.

Decoupled weight decay ``theta <- theta (1 - lr * weight_decay)`` applies to every parameter, as in the
authors' code. Defaults: ``rho=0.25``, ``update_gap=200``, ``state_free="signsgd"`` and a state-free lr equal
to the Adam lr are the paper's main pre-training settings (it uses 0.1 x lr for the state-free part when
fine-tuning); ``lr=1e-3`` is the lr of the authors' pre-training scripts; ``betas``, ``eps`` and
``weight_decay=0`` are torch.optim.AdamW's defaults.

Memory: Adam state of a split ``m x n`` matrix (``m >= n``) is ``2 m r`` numbers plus the ``n x r``
projector for ``"svd"`` (0.28 x AdamW's for ``m = 4n, rho = 0.25``; 0.375 x for square matrices) and
``2 m n`` for the active blocks only for ``"blocks"`` (about ``rho`` x AdamW's).
No ``pytorch_optimizer`` equivalent exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ..errors import ConfigError, check_range
from .auon import matrix_view

__all__ = ["FRUGAL"]

_PROJECTIONS = ("svd", "blocks")
_STATE_FREE = ("signsgd", "sgd")


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_range("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_range("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return float(betas[0]), float(betas[1])


def _svd_rank(shape: torch.Size, group: dict) -> int:
    short = min(shape)
    if group["rank"] is not None:
        return min(group["rank"], short)
    return round(group["rho"] * short)


def _project(g: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Coordinates of matrix ``g`` in the subspace: ``g Q`` (right side) or ``U^T g`` (left side)."""
    return g @ proj if g.shape[0] >= g.shape[1] else proj.mT @ g


def _lift(low: torch.Tensor, proj: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Back to the ``m x n`` matrix space: ``X Q^T`` or ``U X``."""
    return low @ proj.mT if shape[0] >= shape[1] else proj @ low


def _svd_projector(g: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` singular vectors of ``g`` on its smaller side (``n x r`` right, or ``m x r`` left)."""
    m, n = g.shape
    if r == 0:
        return g.new_zeros((n if m >= n else m, 0))
    work = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
    u, _, vh = torch.linalg.svd(work, full_matrices=False)
    proj = vh[:r].mT if m >= n else u[:, :r]
    return proj.to(g.dtype).contiguous()


class FRUGAL(torch.optim.Optimizer):
    """FRUGAL (Zmushko et al., 2024, arXiv:2411.07837); see the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate of the state-full (Adam) part and of weight decay (paper: 1e-3 for pre-training).
        betas: Adam's (beta1, beta2).
        eps: added to the bias-corrected sqrt of the second moment.
        weight_decay: decoupled weight decay, ``theta <- theta (1 - lr * weight_decay)`` for every parameter.
        rho: fraction of each matrix's rank (``"svd"``) or of the group's matrices (``"blocks"``) that is
            state-full, in [0, 1] (paper: 0.25).
        update_gap: steps between subspace refreshes, T (paper: 200).
        projection: ``"svd"`` (GaLore-style top singular vectors) or ``"blocks"`` (BAdam-style tensors).
        state_free: ``"signsgd"`` (paper's default) or ``"sgd"`` for the rest of the gradient.
        state_free_lr: learning rate of the state-free part; None uses ``lr`` (and follows lr schedules).
        rank: explicit subspace rank for ``"svd"`` (clipped to the matrix's smaller side); overrides ``rho``.
        split: False makes every parameter of the group plain AdamW (the paper's treatment of embeddings and
            the output layer).
        seed: seed of the generator that draws the active blocks.
        foreach: use the multi-tensor path; None picks it when all parameters share one device type.
        maximize: ascend the objective instead of descending it.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rho: float = 0.25, update_gap: int = 200,
                 projection: str = "svd", state_free: str = "signsgd", state_free_lr: float | None = None,
                 rank: int | None = None, split: bool = True, *, seed: int = 0, foreach: bool | None = None,
                 maximize: bool = False):
        check_range("seed", seed, low=0, integer=True)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho, update_gap=update_gap,
                        projection=projection, state_free=state_free, state_free_lr=state_free_lr, rank=rank,
                        split=split, foreach=foreach, maximize=maximize)
        self._validate(defaults)
        self._generator = torch.Generator().manual_seed(seed)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], low=0.0)
        group["betas"] = _check_betas(group["betas"])
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_range("rho", group["rho"], low=0.0, high=1.0)
        check_range("update_gap", group["update_gap"], low=1, integer=True)
        if group["projection"] not in _PROJECTIONS:
            raise ConfigError(f"projection must be one of {_PROJECTIONS}, got {group['projection']!r}")
        if group["state_free"] not in _STATE_FREE:
            raise ConfigError(f"state_free must be one of {_STATE_FREE}, got {group['state_free']!r}")
        if group["state_free_lr"] is not None:
            check_range("state_free_lr", group["state_free_lr"], low=0.0)
        if group["rank"] is not None:
            check_range("rank", group["rank"], low=0, integer=True)
        for name in ("split", "maximize"):
            if not isinstance(group[name], bool):
                raise ConfigError(f"{name} must be True or False, got {group[name]!r}")
        if group["foreach"] not in (None, True, False):
            raise ConfigError(f"foreach must be None, True or False, got {group['foreach']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate(merged)
        if "betas" in param_group:
            param_group["betas"] = merged["betas"]
        param_group.setdefault("block_step", 0)  # group steps taken, drives the block refresh schedule
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["generator_state"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("generator_state", None)
        if gen_state is not None:
            self._generator.set_state(gen_state)
        super().load_state_dict(state_dict)

    def _is_split(self, group: dict, p: torch.Tensor) -> bool:
        return group["split"] and p.ndim >= 2

    def _draw_blocks(self, group: dict) -> None:
        """Pick the state-full blocks for the next ``update_gap`` steps and drop every block's Adam state."""
        mats = [p for p in group["params"] if self._is_split(group, p)]
        chosen = set(torch.randperm(len(mats), generator=self._generator)[:round(group["rho"] * len(mats))].tolist())
        for i, p in enumerate(mats):
            state = self.state[p]
            state.clear()
            state["active"] = torch.tensor(i in chosen)

    @staticmethod
    def _adam_state(state: dict, like: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _split_group(self, group: dict) -> dict[str, list]:
        """Sort the group's parameters into Adam-on-the-whole-tensor, Adam-in-a-subspace and state-free parts.

        Refreshes projectors (and resets their Adam state) when due. Returns lists of equal length per part.
        """
        if group["projection"] == "blocks" and group["split"]:
            if group["block_step"] % group["update_gap"] == 0:
                self._draw_blocks(group)
            group["block_step"] += 1
        parts: dict[str, list] = {k: [] for k in ("params", "grads", "low_params", "low_grads", "projs",
                                                  "free_params", "free_grads", "steps", "exp_avgs", "exp_avg_sqs",
                                                  "low_steps", "low_exp_avgs", "low_exp_avg_sqs")}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ConfigError("FRUGAL does not support sparse gradients; use dense gradients "
                                  "(e.g. torch.nn.Embedding(..., sparse=False))")
            g = -p.grad if group["maximize"] else p.grad
            state = self.state[p]
            if not self._is_split(group, p) or (group["projection"] == "blocks" and bool(state.get("active", False))):
                if "exp_avg" not in state:
                    self._adam_state(state, p)
                parts["params"].append(p)
                parts["grads"].append(g)
                parts["steps"].append(state["step"])
                parts["exp_avgs"].append(state["exp_avg"])
                parts["exp_avg_sqs"].append(state["exp_avg_sq"])
            elif group["projection"] == "blocks":  # an inactive block: state-free only
                parts["free_params"].append(p)
                parts["free_grads"].append(g)
            else:
                gm = matrix_view(g)
                if "proj" not in state or state["step"].item() % group["update_gap"] == 0:
                    state["proj"] = _svd_projector(gm, _svd_rank(gm.shape, group))
                    self._adam_state(state, _project(gm, state["proj"]))
                low = _project(gm, state["proj"])
                parts["low_params"].append(p)
                parts["low_grads"].append(low)
                parts["projs"].append(state["proj"])
                parts["low_steps"].append(state["step"])
                parts["low_exp_avgs"].append(state["exp_avg"])
                parts["low_exp_avg_sqs"].append(state["exp_avg_sq"])
                if state["proj"].shape[1] < min(gm.shape):
                    parts["free_params"].append(p)
                    parts["free_grads"].append((gm - _lift(low, state["proj"], gm.shape)).view_as(p))
        return parts

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (None without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not any(p.grad is not None for p in group["params"]):
                continue
            parts = self._split_group(group)
            all_params = [p for p in group["params"] if p.grad is not None]
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in all_params}) == 1
            kernel = _foreach_frugal if foreach else _single_tensor_frugal
            kernel(all_params, parts, group)
        return loss


def _hyper(group: dict) -> tuple:
    (beta1, beta2), lr = group["betas"], group["lr"]
    sf_lr = lr if group["state_free_lr"] is None else group["state_free_lr"]
    return lr, beta1, beta2, group["eps"], group["weight_decay"], sf_lr


def _single_tensor_frugal(all_params: list, parts: dict, group: dict) -> None:
    lr, beta1, beta2, eps, wd, sf_lr = _hyper(group)
    if wd != 0:
        for p in all_params:
            p.mul_(1 - lr * wd)
    adam = zip(parts["params"] + parts["low_params"], parts["grads"] + parts["low_grads"],
               parts["exp_avgs"] + parts["low_exp_avgs"], parts["exp_avg_sqs"] + parts["low_exp_avg_sqs"],
               parts["steps"] + parts["low_steps"], strict=True)
    n_direct = len(parts["params"])
    for i, (p, g, m, v, step_t) in enumerate(adam):
        step_t += 1
        t = step_t.item()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        if i < n_direct:
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        else:
            low = m / denom * (-lr / (1 - beta1 ** t))
            p.add_(_lift(low, parts["projs"][i - n_direct], matrix_view(p).shape).view_as(p))
    for p, r in zip(parts["free_params"], parts["free_grads"], strict=True):
        p.add_(r.sign() if group["state_free"] == "signsgd" else r, alpha=-sf_lr)


def _foreach_frugal(all_params: list, parts: dict, group: dict) -> None:
    lr, beta1, beta2, eps, wd, sf_lr = _hyper(group)
    if wd != 0:
        for (ps,), _ in _group_tensors_by_device_and_dtype([all_params]).values():
            torch._foreach_mul_(ps, 1 - lr * wd)
    for prefix in ("", "low_"):
        params, grads = parts[prefix + "params"], parts[prefix + "grads"]
        if not params:
            continue
        m_, v_, s_ = parts[prefix + "exp_avgs"], parts[prefix + "exp_avg_sqs"], parts[prefix + "steps"]
        torch._foreach_add_(s_, 1)
        grouped = _group_tensors_by_device_and_dtype([grads, m_, v_, s_], with_indices=True)
        for (g_, ms, vs, ss), ii in grouped.values():
            ts = [s.item() for s in ss]
            torch._foreach_lerp_(ms, g_, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, g_, g_, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
            torch._foreach_add_(denom, eps)
            step_sizes = [-lr / (1 - beta1 ** t) for t in ts]
            if not prefix:
                torch._foreach_addcdiv_([params[i] for i in ii], ms, denom, step_sizes)
                continue
            lows = torch._foreach_div(ms, denom)
            torch._foreach_mul_(lows, step_sizes)
            for i, low in zip(ii, lows, strict=True):  # lifting is a matrix product per parameter
                p = params[i]
                p.add_(_lift(low, parts["projs"][i], matrix_view(p).shape).view_as(p))
    if parts["free_params"]:
        free = _group_tensors_by_device_and_dtype([parts["free_params"], parts["free_grads"]])
        for (ps, rs), _ in free.values():
            if group["state_free"] == "signsgd":
                rs = torch._foreach_sign(rs)
            torch._foreach_add_(ps, rs, alpha=-sf_lr)
