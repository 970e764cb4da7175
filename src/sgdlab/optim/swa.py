"""SWA: stochastic weight averaging of a base optimizer's iterates.

Reference: Pavel Izmailov, Dmitrii Podoprikhin, Timur Garipov, Dmitry Vetrov, Andrew Gordon Wilson,
"Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018, arXiv:1803.05407 (Algorithm 1).

The base optimizer moves the weights ``w`` as usual. After base step ``t`` (1-based), when ``t > swa_start``
and ``(t - swa_start) % swa_freq == 0``::

    w_swa <- w                                  the first time (n = 0)
    w_swa <- w_swa + (w - w_swa) / (n + 1)      afterwards;  n <- n + 1

so ``w_swa`` is the arithmetic mean of the averaged iterates. The update is
``AveragedModel``'s own (``torch.optim.swa_utils.get_swa_multi_avg_fn()`` on devices with foreach kernels,
``get_swa_avg_fn()`` elsewhere), so the average is that of ``AveragedModel(model)`` updated after the same
steps, bit for bit (tested on the CPU). The paper averages once per
epoch (``swa_freq`` = steps per epoch, ``c = 1``) from about 75% of the budget on; the optimizer does not
know the budget, so set ``swa_start`` (default 0: from the first step) and ``swa_freq`` (default 1).

SWA learning rate (optional, ``swa_lr``): from step ``swa_start + 1`` on, the base steps with
``lr = alpha * swa_lr + (1 - alpha) * lr_group``, ``alpha = a(min(1, (t - swa_start) / anneal_steps))``,
``a(x) = (1 - cos(pi x)) / 2`` (``anneal_strategy="cos"``) or ``x`` (``"linear"``); ``anneal_steps = 0``
switches at once. ``lr_group`` is the group's scheduled lr, restored after the step (schedulers keep
working). This is the rule of torch's ``SWALR`` written per step against the scheduled lr; ``SWALR`` itself
is a scheduler that interpolates from the lr it finds when it starts.

The averaged weights are what the run evaluates: :meth:`SWA.averaged_parameters` (step protocol,
:func:`sgdlab.optim.protocol.averaged_weights`) gives them, and the runner swaps them into the evaluated
model and, where the model has BatchNorm, recomputes its running statistics with
``torch.optim.swa_utils.update_bn`` (the paper's step 4). Buffers are not averaged (``AveragedModel``'s
default ``use_buffers=False``). State: the average (+4 B/param) and ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.swa_utils import get_swa_avg_fn, get_swa_multi_avg_fn
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

from ..errors import ConfigError, check_range
from ._wrapper import ForwardingWrapper

__all__ = ["SWA", "swa"]

_ANNEAL = ("cos", "linear")


class SWA(ForwardingWrapper):
    """SWA (Izmailov et al., UAI 2018) around ``base_optimizer``; see the module docstring.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer``.
        swa_start: base steps before averaging starts, an integer >= 0 (default 0).
        swa_freq: average every ``swa_freq`` steps after that, an integer >= 1 (default 1).
        swa_lr: the SWA learning rate (None: keep the base's schedule), >= 0.
        anneal_steps: steps to anneal from the scheduled lr to ``swa_lr``, an integer >= 0 (default 0).
        anneal_strategy: ``"cos"`` (default) or ``"linear"``.
    """

    key = "swa"

    def __init__(self, base_optimizer: torch.optim.Optimizer, swa_start: int = 0, swa_freq: int = 1,
                 swa_lr: float | None = None, anneal_steps: int = 0, anneal_strategy: str = "cos"):
        super().__init__(base_optimizer)
        check_range("swa_start", swa_start, low=0, integer=True)
        check_range("swa_freq", swa_freq, low=1, integer=True)
        if swa_lr is not None:
            check_range("swa_lr", swa_lr, low=0.0)
        check_range("anneal_steps", anneal_steps, low=0, integer=True)
        if anneal_strategy not in _ANNEAL:
            raise ConfigError(f"anneal_strategy={anneal_strategy!r} is not allowed; allowed: 'cos', 'linear'")
        self.swa_start, self.swa_freq, self.swa_lr = swa_start, swa_freq, swa_lr
        self.anneal_steps, self.anneal_strategy = anneal_steps, anneal_strategy
        self.base_steps = 0
        self.n_averaged = torch.tensor(0, dtype=torch.long)
        self._multi_avg_fn, self._avg_fn = get_swa_multi_avg_fn(), get_swa_avg_fn()

    def __repr__(self) -> str:
        return (f"SWA(swa_start={self.swa_start}, swa_freq={self.swa_freq}, swa_lr={self.swa_lr}, "
                f"base_optimizer={self.base_optimizer!r})")

    # --- the step protocol (the base's needs: ForwardingWrapper), and the averaged weights -----------
    def averaged_parameters(self) -> dict[torch.Tensor, torch.Tensor] | None:
        """``{param: its average}`` once something is averaged, else None."""
        if int(self.n_averaged) == 0:
            return None
        return {p: st["swa_param"] for p, st in self.own.items()}

    # --- algorithm ---------------------------------------------------------------------------------
    def _swa_factor(self, t: int) -> float:
        x = 1.0 if self.anneal_steps == 0 else min(1.0, (t - self.swa_start) / self.anneal_steps)
        return (1 - math.cos(math.pi * x)) / 2 if self.anneal_strategy == "cos" else x

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One base step, then (on averaging steps) the running mean. Returns the base step's result."""
        t = self.base_steps + 1
        scheduled = None
        if self.swa_lr is not None and t > self.swa_start:
            alpha = self._swa_factor(t)
            scheduled = [g["lr"] for g in self.param_groups]
            for g in self.param_groups:
                g["lr"] = alpha * self.swa_lr + (1 - alpha) * g["lr"]
        try:
            loss = self.base_optimizer.step(closure)
        finally:
            if scheduled is not None:
                for g, lr in zip(self.param_groups, scheduled, strict=True):
                    g["lr"] = lr
        self.base_steps = t
        if t > self.swa_start and (t - self.swa_start) % self.swa_freq == 0:
            self._average()
        return loss

    @torch.no_grad()
    def _average(self) -> None:
        params = self._params()
        if int(self.n_averaged) == 0:
            self.own = {p: {"swa_param": p.detach().clone()} for p in params}
        else:
            by_kind: dict[tuple, tuple[list, list]] = {}
            for p in params:
                avg, cur = by_kind.setdefault((p.device, p.dtype), ([], []))
                avg.append(self.own[p]["swa_param"])
                cur.append(p.detach())
            for (device, _), (avg, cur) in by_kind.items():  # AveragedModel's choice, for the same bits
                n = self.n_averaged.to(device)
                if device.type in _get_foreach_kernels_supported_devices():
                    self._multi_avg_fn(avg, cur, n)
                else:
                    for a, c in zip(avg, cur, strict=True):
                        a.copy_(self._avg_fn(a, c, n))
        self.n_averaged += 1

    def _own_state(self) -> dict[str, Any]:
        return {"base_steps": self.base_steps, "n_averaged": int(self.n_averaged), "swa_start": self.swa_start,
                "swa_freq": self.swa_freq, "swa_lr": self.swa_lr, "anneal_steps": self.anneal_steps,
                "anneal_strategy": self.anneal_strategy}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.base_steps = int(state["base_steps"])
        self.n_averaged = torch.tensor(int(state["n_averaged"]), dtype=torch.long)
        self.swa_start, self.swa_freq, self.swa_lr = state["swa_start"], state["swa_freq"], state["swa_lr"]
        self.anneal_steps, self.anneal_strategy = state["anneal_steps"], state["anneal_strategy"]


def swa(params: Iterable[Any], base: str = "sgd", swa_start: int = 0, swa_freq: int = 1, swa_lr: float | None = None,
        anneal_steps: int = 0, anneal_strategy: str = "cos", **base_hyperparameters: Any) -> SWA:
    """SWA around the sgdlab optimizer registered as ``base``, built with ``base_hyperparameters``.

    >>> model = torch.nn.Linear(4, 2)
    >>> opt = swa(model.parameters(), base="sgd", swa_start=100, lr=0.1, momentum=0.9)
    """
    from . import create  # lazy: sgdlab.optim imports this module for its registry

    return SWA(create(base, params, **base_hyperparameters), swa_start=swa_start, swa_freq=swa_freq, swa_lr=swa_lr,
               anneal_steps=anneal_steps, anneal_strategy=anneal_strategy)
