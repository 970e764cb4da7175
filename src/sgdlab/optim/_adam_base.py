"""Shared hyperparameter checks for the Adam-family optimizers (lr, betas, eps, weight_decay, foreach,
compiled)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import check_range
from ._compiled import Kernel, check_compiled


def check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_range("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_range("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return float(betas[0]), float(betas[1])


class AdamFamilyOptimizer(torch.optim.Optimizer):
    """Validates every group's (lr, betas, eps, weight_decay, foreach, compiled), added groups included."""

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], low=0.0)
        group["betas"] = check_betas(group["betas"])
        check_range("eps", group["eps"], low=0.0)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")
        check_compiled(group.get("compiled"))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check per-group overrides too, before the group is added.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate(merged)
        if "betas" in param_group:
            param_group["betas"] = merged["betas"]
        super().add_param_group(param_group)


def compiled_adam_step(kernel: Kernel, mode: str, params: list[torch.Tensor], grads: list[torch.Tensor],
                       steps: list[torch.Tensor], group: dict[str, Any], *states: list[torch.Tensor]) -> None:
    """One step of an Adam-family ``kernel(p, g, *states, step_size, bc2, eps_bc2, decay, beta1, beta2)`` in
    ``mode`` (:mod:`sgdlab.optim._compiled`), with ``step_size = lr / (1 - beta1^t)``, ``bc2 = sqrt(1 -
    beta2^t)``, ``eps_bc2 = eps * bc2`` and ``decay = 1 - lr * weight_decay`` per parameter. The kernels use
    ``m / (sqrt(v) / bc2 + eps) = bc2 * m / (sqrt(v) + eps_bc2)``: one division per element instead of two.
    Steps are counted by :meth:`Kernel.run_stepped`."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    tensors = list(zip(params, grads, *states, strict=True))

    def coefficients(t: float) -> list[float]:
        bc2 = math.sqrt(1 - beta2 ** t)
        return [lr / (1 - beta1 ** t), bc2, eps * bc2, 1 - lr * wd]

    kernel.run_stepped(mode, tensors, steps, coefficients, (beta1, beta2))
