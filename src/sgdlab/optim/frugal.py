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
  singular vectors (``m x n`` is ``out x in``: a group with ``orientation="in_out"``, weights stored
  ``(in, out)`` as transformers' ``Conv1D``'s, is projected on the transpose). ``r = round(rho * min(m, n))``
  unless ``rank`` is given. If ``r = min(m, n)`` the
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

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import Optimizer, adam_denominator, buckets, check_adam, check_flag, use_foreach
from ._matrix import adamw_update, check_orientation, matrix_shape, matrix_view, unview

__all__ = ["FRUGAL"]

_PROJECTIONS = ("svd", "blocks")
_STATE_FREE = ("signsgd", "sgd")


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


class FRUGAL(Optimizer):
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
        orientation: ``"out_in"`` (matrices stored ``(out, in)``, as ``nn.Linear``'s) or ``"in_out"`` (stored
            ``(in, out)``, transformers' ``Conv1D``): the SVD projection then works on the transpose, so such a
            weight gets exactly the transposed update of the equivalent ``nn.Linear`` (which side is projected
            matters for square matrices). :func:`sgdlab.optim.param_groups` builds the groups for a model.
        seed: seed of the generator that draws the active blocks.
        foreach: use the multi-tensor path; None picks it when all parameters share one device type.
        maximize: ascend the objective instead of descending it.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rho: float = 0.25, update_gap: int = 200,
                 projection: str = "svd", state_free: str = "signsgd", state_free_lr: float | None = None,
                 rank: int | None = None, split: bool = True, orientation: str = "out_in", *, seed: int = 0,
                 foreach: bool | None = None, maximize: bool = False):
        check_range("seed", seed, low=0, integer=True)
        self._generator = torch.Generator().manual_seed(seed)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho,
                                      update_gap=update_gap, projection=projection, state_free=state_free,
                                      state_free_lr=state_free_lr, rank=rank, split=split, orientation=orientation,
                                      foreach=foreach, maximize=maximize))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_adam(group)
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
        check_flag("split", group["split"])
        check_orientation(group["orientation"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
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

    def _split_group(self, group: dict, params: list[torch.Tensor]) -> dict[str, list]:
        """Sort the group's parameters into Adam-on-the-whole-tensor, Adam-in-a-subspace and state-free parts.

        Refreshes projectors (and resets their Adam state) when due. Returns lists of equal length per part.
        """
        if group["projection"] == "blocks" and group["split"]:
            if group["block_step"] % group["update_gap"] == 0:
                self._draw_blocks(group)
            group["block_step"] += 1
        parts: dict[str, list] = {k: [] for k in ("params", "grads", "low_params", "low_grads", "projs",
                                                  "free_params", "free_grads", "low_steps", "low_exp_avgs",
                                                  "low_exp_avg_sqs")}
        for p in params:
            g = -p.grad if group["maximize"] else p.grad
            state = self.state[p]
            if not self._is_split(group, p) or (group["projection"] == "blocks" and bool(state.get("active", False))):
                parts["params"].append(p)  # AdamW (adamw_update creates its state)
                parts["grads"].append(g)
            elif group["projection"] == "blocks":  # an inactive block: state-free only
                parts["free_params"].append(p)
                parts["free_grads"].append(g)
            else:
                gm = matrix_view(g, group["orientation"])
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
                    rest = gm - _lift(low, state["proj"], gm.shape)
                    parts["free_grads"].append(unview(rest, p, group["orientation"]))
        return parts

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        parts = self._split_group(group, params)
        batched = use_foreach(group["foreach"], params)
        (beta1, beta2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
        if wd != 0:
            for idx in buckets(params, batched):
                torch._foreach_mul_([params[i] for i in idx], 1 - lr * wd)
        # Adam on whole tensors (decay done above), then in the subspaces, lifted back
        adamw_update(self, parts["params"], parts["grads"], lr=lr, betas=group["betas"], eps=eps, weight_decay=0.0,
                     foreach=batched)
        low, low_grads = parts["low_params"], parts["low_grads"]
        if low:
            steps = parts["low_steps"]
            torch._foreach_add_(steps, 1)
            ts = [s.item() for s in steps]
            for idx in buckets(low_grads, batched, ts):
                t = ts[idx[0]]
                denom = adam_denominator([parts["low_exp_avgs"][i] for i in idx],
                                         [parts["low_exp_avg_sqs"][i] for i in idx], [low_grads[i] for i in idx],
                                         t, beta1, beta2, eps)
                lows = torch._foreach_div([parts["low_exp_avgs"][i] for i in idx], denom)
                torch._foreach_mul_(lows, -lr / (1 - beta1 ** t))
                o = group["orientation"]
                for i, u in zip(idx, lows, strict=True):  # lifting is a matrix product per parameter
                    low[i].add_(unview(_lift(u, parts["projs"][i], matrix_shape(low[i], o)), low[i], o))
        sf_lr = lr if group["state_free_lr"] is None else group["state_free_lr"]
        for idx in buckets(parts["free_params"], batched):  # the state-free rest of the gradient
            rs = [parts["free_grads"][i] for i in idx]
            if group["state_free"] == "signsgd":
                rs = torch._foreach_sign(rs)
            torch._foreach_add_([parts["free_params"][i] for i in idx], rs, alpha=-sf_lr)
