"""Shared hyperparameter checks for the Adam-family optimizers (lr, betas, eps, weight_decay, foreach,
compiled)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import check_range
from ._compiled import Kernel, check_compiled, scalars


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


def compiled_adam_step(kernel: Kernel, params: list[torch.Tensor], grads: list[torch.Tensor],
                       steps: list[torch.Tensor], group: dict[str, Any], *states: list[torch.Tensor]) -> None:
    """One step of an Adam-family ``kernel(p, g, *states, step_size, bc2_sqrt, decay, beta1, beta2, eps)``
    per tensor (flattened), with ``step_size = lr / (1 - beta1^t)``, ``bc2_sqrt = sqrt(1 - beta2^t)`` and
    ``decay = 1 - lr * weight_decay`` as 0-d tensors (see :mod:`sgdlab.optim._compiled`)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    for p, g, step_t, *state in zip(params, grads, steps, *states, strict=True):
        if group["maximize"]:
            g = -g
        step_t += 1
        t = step_t.item()
        coef = scalars([lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t), 1 - lr * wd], p)
        kernel(p.view(-1), g.reshape(-1), *(x.view(-1) for x in state), *coef, beta1, beta2, eps)
