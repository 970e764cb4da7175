"""MT-DAO's inner optimizer: AdamW with several first moments at different time scales (``mtdao``).

Reference: Alex Iacob, Andrej Jovanović, Mher Safaryan et al., "MT-DAO: Multi-Timescale Distributed
Adaptive Optimizers with Local Updates", ICLR 2026 (arXiv:2510.05361). MT-DAO is this optimizer run
under infrequent synchronisation: the strategy ``desloc`` averages the parameters every K_x steps and
each moment on its own period (``exp_avg``, ``exp_avg_2``, ... take ``sync_u`` or a ``state_sync`` entry,
``exp_avg_sq`` takes ``sync_v``); the paper's main runs use K_x = K_j = K_v = 32 (from third-party notes;
not confirmed in the paper's text).

Update for one parameter ``x`` with gradient ``g`` at step ``t = 1, 2, ...``; N first moments with decay
rates ``beta_j`` and weights ``w_j`` (sum w_j <= 1), one second moment with decay ``beta2``::

    u_j = beta_j u_j + (1 - beta_j) g                 for j = 1..N    (u_hat_j = u_j / (1 - beta_j^t))
    v   = beta2 v + (1 - beta2) g^2                                   (v_hat = v / (1 - beta2^t))
    x   = x (1 - lr * weight_decay)
          - lr * [ (1 - sum_j w_j) g + sum_j w_j u_hat_j ] / (sqrt(v_hat) + eps)

A slow moment (beta_j near 1, half-life ln 0.5 / ln beta_j steps) keeps the direction of the last global
average over a long interval between syncs; the raw gradient (weight 1 - sum w_j) keeps the update
responsive. N = 1 is the quasi-hyperbolic form (QHAdam's numerator), which costs no memory over Adam;
N = 1 with w_1 = 1 is AdamW exactly (the operations of ``torch.optim.AdamW``'s for-loop and foreach paths,
so the same bits; not of its fused kernel, which sgdlab's ``adamw`` takes by default on the CPU); w = 0
everywhere is g / (sqrt(v_hat) + eps).

Hyperparameters: ``betas = (beta_1, ..., beta_N, beta2)`` and ``weights = (w_1, ..., w_N)``, as the
authors' code gives them (``torchtitan/experiments/fl/optimizers/aggmo_adamw.py``: ``betas``, ``vs``).
Defaults: ``weights = (0.7,)`` (the authors' code), ``betas = (0.99, 0.999)`` (one slow moment: the paper's
slow moments lie in 0.99-0.999; beta2 = 0.999, Adam's — the paper's ADOPT runs use 0.9999), ``eps = 1e-8``,
``weight_decay = 0``. The paper's exact headline values are not all stated in the sources read.

Differences from the authors' code: each moment is bias-corrected with its own beta_j (their AdamW
variant corrects every moment with the first beta; their ADOPT variant gives each its own beta); no
AMSGrad, no ADOPT variant, no compiled kernel (the multi-tensor and per-parameter paths run the same
``_update``). The weighted terms are added to ``x`` one at a time (``addcdiv`` per term), the same sum as
one combined numerator up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError, check_range
from ._base import ElementwiseOptimizer, check_betas, defaults_from

__all__ = ["MTAdamW"]

_SUM_TOL = 1e-12


def moment_names(n: int) -> tuple[str, ...]:
    """State names of ``n`` first moments: ``exp_avg``, ``exp_avg_2``, ... (the authors' naming)."""
    return tuple("exp_avg" if j == 0 else f"exp_avg_{j + 1}" for j in range(n))


class MTAdamW(ElementwiseOptimizer):
    """MT-DAO's multi-timescale AdamW (Iacob et al., 2025, arXiv:2510.05361); see the module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (>= 0).
        betas: ``(beta_1, ..., beta_N, beta2)``: the N first moments' decay rates, then the second moment's,
            each in [0, 1).
        weights: ``(w_1, ..., w_N)``, each >= 0, summing to at most 1; the gradient gets ``1 - sum``.
        eps: added to ``sqrt(v_hat)`` (>= 0).
        weight_decay: decoupled weight decay (>= 0), multiplied by ``lr``.
        foreach, maximize: code path and sign, as for every elementwise optimizer
            (:class:`~sgdlab.optim._base.ElementwiseOptimizer`).

    Every param group must have the same number of moments N (it fixes the state).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, ...] = (0.99, 0.999),
                 weights: tuple[float, ...] = (0.7,), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False):
        self._moments = len(weights) if isinstance(weights, (tuple, list)) else 0
        self.state_names = (*moment_names(self._moments), "exp_avg_sq")
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict) -> None:
        super()._validate(group)
        weights = group["weights"]
        if not isinstance(weights, (tuple, list)) or not weights:
            raise ConfigError(f"weights must be a non-empty tuple of moment weights (w_1, ..., w_N), got {weights!r}")
        for i, w in enumerate(weights):
            check_range(f"weights[{i}]", w, low=0.0)
        if sum(weights) > 1 + _SUM_TOL:
            raise ConfigError(f"weights={tuple(weights)!r} sum to {sum(weights)!r}; allowed: sum <= 1 (the gradient "
                              "gets 1 - sum)")
        group["weights"] = tuple(float(w) for w in weights)
        betas = group["betas"]
        if isinstance(betas, (tuple, list)) and len(betas) != len(weights) + 1:
            raise ConfigError(f"betas={tuple(betas)!r} and weights={tuple(weights)!r} do not match: betas holds one "
                              f"decay rate per weight, then beta2 ({len(weights) + 1} values for {len(weights)} "
                              "weights)")
        group["betas"] = check_betas(betas, n=len(weights) + 1)
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n = len(param_group.get("weights", self.defaults["weights"]))
        if n != self._moments:
            raise ConfigError(f"weights: a param group with {n} moments, the optimizer has {self._moments}; every "
                              "group must have the same number of first moments")
        super().add_param_group(param_group)

    def _update(self, group, t, p, g, *states, ops) -> None:
        *moments, v = states
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        betas, weights = group["betas"], group["weights"]
        beta2 = betas[-1]
        if wd != 0.0:
            ops.mul_(p, 1 - lr * wd)
        for u, beta in zip(moments, betas, strict=False):
            ops.lerp_(u, g, 1 - beta)
        ops.mul_(v, beta2)
        ops.addcmul_(v, g, g, value=1 - beta2)
        denom = ops.sqrt(v)
        ops.div_(denom, (1 - beta2 ** t) ** 0.5)
        ops.add_(denom, eps)
        for u, beta, w in zip(moments, betas, weights, strict=False):
            if w != 0.0:
                ops.addcdiv_(p, u, denom, value=-(lr * w / (1 - beta ** t)))
        rest = 1.0 - sum(weights)
        if rest > _SUM_TOL:
            ops.addcdiv_(p, g, denom, value=-(lr * rest))
