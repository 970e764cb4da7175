"""Zeroth-order SGD: MeZO's memory-efficient two-point SPSA, with no backward pass.

Reference: Sadhika Malladi, Tianyu Gao, Eshaan Nichani, Alex Damian, Jason D. Lee, Danqi Chen, Sanjeev Arora,
"Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023, arXiv:2305.17333 (Algorithm 1).

Each step, on one mini-batch loss ``L`` and for each of ``n`` directions ``j`` (seed ``s_j``)::

    theta <- theta + eps z          z ~ N(0, I), drawn tensor by tensor from a generator seeded with s_j
    l+ = L(theta)
    theta <- theta - 2 eps z        (z regenerated from s_j, never stored)
    l- = L(theta)
    theta <- theta + eps z          (restored, up to rounding)
    p_j = (l+ - l-) / (2 eps)       a scalar: the projected gradient, ~ grad L . z
then, regenerating each z_j once more::

    theta <- theta - lr * ((1/n) sum_j p_j z_j + weight_decay * theta)

Only seeds and scalars are kept (0 B/param of state), the loss is evaluated without a graph, so the peak
memory is that of inference. On a quadratic the central difference is exact: ``p = grad L(theta) . z``.
``E[p z] = grad L`` and ``E||p z||^2 = (d + 2) ||grad L||^2`` (Gaussian z, ``d`` parameters), so the step
size must be far smaller than SGD's.

Defaults: ``eps = 1e-3`` and ``n = 1`` (the paper's); ``lr = 1e-3`` is sgdlab's default for its small tasks
(the paper uses 1e-6 to 1e-7 for full-parameter OPT fine-tuning); ``weight_decay = 0``.

Differences from the reference (princeton-nlp/MeZO ``trainer.py``): its seed is drawn with NumPy and z from
torch's global RNG; here seed ``s`` of step ``t`` comes from the optimizer's ``seed`` and ``t``, and z from a
generator of its own per device, so the run is reproducible and checkpointable and the global RNG is
untouched. The reference excludes biases and LayerNorm weights from weight decay by name; here
``weight_decay`` is per param group (put those tensors in a group with ``weight_decay=0``). The loss the step
returns is ``l+`` of the first direction, as the reference's. Every parameter with ``requires_grad`` is
perturbed and updated, whether or not the loss depends on it (a forward-only method cannot tell); gradients
are never read. In fp16/bf16 the +eps, -2eps, +eps sequence does not restore theta exactly (MeZO issue 42):
keep fp32 (or fp64) parameters.

It declares ``step_closure = True`` and ``step_backward = False`` (:mod:`sgdlab.optim.protocol`): the closure
returns the mini-batch loss and is called ``2 n`` times per step under ``torch.no_grad``. By hand::

    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3)
    for x, y in batches:
        opt.step(lambda: loss_fn(model(x), y))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import Optimizer

__all__ = ["ZOSGD"]


class ZOSGD(Optimizer):
    """MeZO-style zeroth-order SGD (Malladi et al., 2023, arXiv:2305.17333); see the module docstring.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        eps: perturbation scale, > 0 (default 1e-3; one for all groups: p is one scalar per direction).
        weight_decay: coupled weight decay ``lr * weight_decay * theta``, >= 0 (default 0).
        n: directions averaged per step (n-SPSA), an integer >= 1 (default 1).
        seed: seed of the perturbation seeds, an integer >= 0 (saved in ``state_dict``).
    """

    step_closure = True
    step_backward = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 n: int = 1, seed: int = 0):
        check_range("n", n, low=1, integer=True)
        check_range("seed", seed, low=0, integer=True)
        check_range("eps", eps, low=0.0, low_open=True)
        self.eps, self.n, self.seed = float(eps), n, seed
        self._zo_step = 0
        self.last_projected: list[float] = []  # p_j of the last step
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("weight_decay", group["weight_decay"], low=0.0)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = {"step": self._zo_step, "seed": self.seed, "n": self.n, "eps": self.eps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("zo")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "zo"})
        if extra is not None:
            self._zo_step, self.seed, self.n = int(extra["step"]), int(extra["seed"]), int(extra["n"])
            self.eps = float(extra["eps"])

    def seeds(self, step: int) -> list[int]:
        """The perturbation seeds of step ``step`` (1-based), one per direction."""
        return [(self.seed * 1_000_003 + step) * 64 + j for j in range(self.n)]

    def _groups(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        return [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]

    @staticmethod
    def directions(params: list[torch.Tensor], seed: int) -> Iterable[torch.Tensor]:
        """z for each of ``params`` in order, drawn from generators (one per device) seeded with ``seed``."""
        gens: dict[torch.device, torch.Generator] = {}
        for p in params:
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            yield torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)

    def _perturb(self, params: list[torch.Tensor], seed: int, scale: float) -> None:
        for p, z in zip(params, self.directions(params, seed), strict=True):
            p.add_(z, alpha=scale * self.eps)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One zeroth-order step; ``closure`` returns the mini-batch loss (no backward). Returns ``l+``."""
        if closure is None:
            raise RuntimeError("ZOSGD.step needs a closure that returns the mini-batch loss (it is evaluated "
                               "twice per direction at perturbed weights, without gradients), e.g. "
                               "opt.step(lambda: loss_fn(model(x), y))")
        groups = self._groups()
        self._zo_step += 1
        if not any(ps for _, ps in groups):
            return closure()
        params = [p for _, ps in groups for p in ps]
        projected, first = [], None
        for seed in self.seeds(self._zo_step):
            self._perturb(params, seed, 1.0)
            plus = closure()
            self._perturb(params, seed, -2.0)
            minus = closure()
            self._perturb(params, seed, 1.0)
            first = plus if first is None else first
            projected.append(float((plus - minus) / (2 * self.eps)))
        for g, ps in groups:  # coupled decay, on theta before the update
            if g["weight_decay"]:
                torch._foreach_mul_(ps, 1 - g["lr"] * g["weight_decay"])
        lrs = [g["lr"] for g, ps in groups for _ in ps]
        for seed, proj in zip(self.seeds(self._zo_step), projected, strict=True):
            for p, z, lr in zip(params, self.directions(params, seed), lrs, strict=True):
                p.add_(z, alpha=-lr * proj / self.n)
        self.last_projected = projected
        return first
