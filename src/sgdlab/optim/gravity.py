"""Gravity: a kinematic optimizer whose velocity follows a gradient squashed by the tensor's largest entry.

Reference: Dariush Bahrami, Sadegh Pouriyan Zadeh, "Gravity Optimizer: a Kinematic Approach on
Optimization in Deep Learning", arXiv:2101.09192 (2021).

Update rule (per tensor; t counts this parameter's steps, t = 1 at the first)::

    M       = max_i |g_i|                                  (over the tensor)
    zeta    = g / (1 + (g M)^2)                            (elementwise; |zeta_i| <= min(|g_i|, 1 / (2M)))
    beta^_t = (beta t + 1) / (t + 2)
    v_t     = beta^_t v_{t-1} + (1 - beta^_t) zeta
    theta_t = theta_{t-1} - lr v_t

with a random initial velocity ``v_0 ~ N(0, (alpha / lr)^2)``, drawn with the group's lr when the parameter
first gets a gradient (``v_0 = 0`` when alpha or lr is 0) from a generator owned by the optimizer (``seed``;
one per device, saved in ``state_dict()``), so two optimizers built alike start alike.

The counter: the authors' Keras code uses t = 0 at the first step (beta^ = 1/2); their PyTorch code and
``pytorch_optimizer.Gravity`` count from 1 (beta^ = (beta + 1) / 3). We count from 1.

Defaults: alpha=0.01, beta=0.9 (paper and pytorch_optimizer); lr=0.1 is the paper's and the authors' code's
(pytorch_optimizer uses 1e-2). Matches ``pytorch_optimizer.Gravity`` step for step (tested) given the same
v_0; differences: it draws v_0 from torch's global generator, its step counter is per param group, ours
per parameter (the same unless a parameter misses steps), and it negates ``p.grad`` in place for
``maximize`` (we leave ``p.grad`` alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import ElementwiseOptimizer
from ._compiled import Kernel
from ._rng import copy_states, device_generator

__all__ = ["Gravity"]


def _gravity_kernel(p, g, v, lr, keep):
    scaled = g * g.abs().amax()
    v.lerp_(g / (1 + scaled * scaled), 1 - keep)
    p.sub_(lr * v)


class Gravity(ElementwiseOptimizer):
    """Gravity (Bahrami & Pouriyan Zadeh, arXiv:2101.09192); see the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (0.1 in the paper).
        alpha: scale of the random initial velocity, v_0 ~ N(0, (alpha / lr)^2); >= 0.
        beta: the velocity's base decay rate, in [0, 1].
        seed: seed of the optimizer's generator of initial velocities (saved in ``state_dict``).
        foreach, compiled, maximize: as for every :class:`~sgdlab.optim._base.ElementwiseOptimizer`.
    """

    state_names = ("v",)
    kernel = Kernel(_gravity_kernel, "Gravity")

    def __init__(self, params: Iterable[Any], lr: float = 0.1, alpha: float = 0.01, beta: float = 0.9, *,
                 seed: int = 0, foreach: bool | None = None, compiled: bool | str | None = None,
                 maximize: bool = False):
        check_range("seed", seed, low=0, integer=True)
        self.seed = seed
        self._rng_states: dict[str, torch.Tensor] = {}  # generator state per device
        super().__init__(params, dict(lr=lr, alpha=alpha, beta=beta, foreach=foreach, compiled=compiled,
                                      maximize=maximize))

    extra_state_key = "gravity"

    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng_states": copy_states(self._rng_states)}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.seed = int(extra["seed"])
        self._rng_states = copy_states(extra["rng_states"])

    def _normal(self, p: torch.Tensor, std: float) -> torch.Tensor:
        with device_generator(self._rng_states, self.seed, p.device) as gen:
            return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device).mul_(std)

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("alpha", group["alpha"], low=0.0)
        if math.isinf(group["alpha"]):
            raise ConfigError("alpha must be finite, got inf")
        check_range("beta", group["beta"], low=0.0, high=1.0)

    def _prepare(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        for group, params in groups:  # the random initial velocity of parameters seen for the first time
            std = group["alpha"] / group["lr"] if group["lr"] > 0 else 0.0
            for p in params:
                if p not in self.state:
                    state = self._state(p)
                    if std > 0:
                        state["v"].copy_(self._normal(p, std))

    @staticmethod
    def _keep(group: dict[str, Any], t: float) -> float:
        return (group["beta"] * t + 1) / (t + 2)

    def _coefficients(self, group: dict[str, Any], t: float) -> list[float]:
        return [group["lr"], self._keep(group, t)]

    def _update(self, group, t, p, g, v, ops) -> None:
        scaled = ops.mul(g, ops.norm(g, ord=math.inf))  # g M, M = max |g| of the tensor
        ops.mul_(scaled, scaled)
        ops.add_(scaled, 1.0)
        ops.lerp_(v, ops.div(g, scaled), 1 - self._keep(group, t))
        ops.add_(p, v, alpha=-group["lr"])

