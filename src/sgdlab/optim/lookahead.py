"""Lookahead: k steps forward, 1 step back, around any ``torch.optim.Optimizer``.

Reference: Michael R. Zhang, James Lucas, Geoffrey Hinton, Jimmy Ba, "Lookahead Optimizer: k steps
forward, 1 step back", NeurIPS 2019, arXiv:1907.08610 (Algorithm 1).

The wrapped (inner) optimizer ``A`` moves the fast weights ``theta``; every ``k`` inner steps the slow
weights ``phi`` move part of the way towards them and the fast weights restart from the slow ones::

    phi_0 = theta_0
    theta_{t,0} = phi_{t-1}
    theta_{t,i} = theta_{t,i-1} + A(L, theta_{t,i-1}, d)        i = 1..k
    phi_t       = phi_{t-1} + alpha * (theta_{t,k} - phi_{t-1})
    theta       <- phi_t

It treats every parameter alike (matrices, biases, norms, embeddings). With ``k = 1, alpha = 1`` it is
exactly the inner optimizer. The paper's defaults are ``k = 5, alpha = 0.5`` (it reports robustness for
k in {5, 10}, alpha in {0.5, 0.8}); ours are the same.

The inner optimizer's own state (momentum, Adam moments) is kept across synchronisations, as in the
paper's experiments (``pullback="none"``, the default). Two variants studied in the paper's appendix act
on a ``momentum_buffer`` state entry (``torch.optim.SGD``, ``SGDSaI``; a no-op for optimizers without
one): ``"reset"`` zeroes it at each synchronisation, ``"pullback"`` interpolates it like the weights
(``m <- m_slow + alpha (m - m_slow)``, ``m_slow <- m``). These names follow ``pytorch_optimizer``'s
``pullback_momentum``, whose Lookahead gives the same trajectories (tested).

The wrapper *is* a ``torch.optim.Optimizer``: ``param_groups`` is the inner optimizer's list (so LR
schedulers and per-group hyperparameters act on the inner optimizer), ``zero_grad`` and
``add_param_group`` delegate, and ``state_dict()`` is the inner optimizer's state dict plus a
``"lookahead"`` entry holding the slow weights, the step counter and ``k``/``alpha``/``pullback``.
``state`` is a read-only merged view: each parameter's inner state plus ``"slow_param"`` (and
``"slow_momentum"``), so memory accounting sees both; change state through ``base_optimizer.state``.
The step protocol's attributes (``before_forward``, ``before_backward``, ``step_closure``, ``step_backward``,
``training_loss``, :mod:`sgdlab.optim.protocol`) are the inner optimizer's, so Lookahead around Sophia-G
gets its Hessian estimates and around Sophia-H its closure. The slow weights are copied when the wrapper is built; under
:class:`sgdlab.distributed.Distributed` they follow the broadcast of rank 0's weights, because the wrapper
broadcasts every tensor of ``optimizer.state`` (this merged view) too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import buckets, use_foreach
from ._wrapper import ForwardingWrapper

__all__ = ["Lookahead", "lookahead"]

_PULLBACK = ("none", "reset", "pullback")


class Lookahead(ForwardingWrapper):
    """Lookahead (Zhang et al., NeurIPS 2019, arXiv:1907.08610) around ``base_optimizer``.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` (the inner optimizer ``A``).
        k: synchronisation period, an integer >= 1 (default 5).
        alpha: slow-weights step size in (0, 1] (default 0.5).
        pullback: inner momentum handling at synchronisation: "none" (paper), "reset" or "pullback".
        foreach: multi-tensor synchronisation; ``None`` picks it when all params share a device type.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.5)
    """

    key = "lookahead"
    own_key = "slow"

    def __init__(self, base_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5,
                 pullback: str = "none", *, foreach: bool | None = None):
        super().__init__(base_optimizer)  # a TypeError unless base_optimizer is a torch.optim.Optimizer
        check_range("k", k, low=1, integer=True)
        check_range("alpha", alpha, low=0.0, high=1.0, low_open=True)
        if pullback not in _PULLBACK:
            raise ConfigError(f"pullback={pullback!r} is not allowed; allowed: {', '.join(map(repr, _PULLBACK))}")
        if foreach is not None and not isinstance(foreach, bool):
            raise ConfigError(f"foreach must be None, True or False, got {foreach!r}")
        self.k, self.alpha, self.pullback, self.foreach = k, float(alpha), pullback, foreach
        self.fast_steps = 0  # inner steps taken since the start
        for group in self.param_groups:
            self._init_slow(group["params"])

    # The wrapper's own per-parameter tensors are the slow weights; stored as ``self.slow`` (the attribute
    # name pickles of earlier versions hold).
    @property
    def own(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[override]
        return self.slow

    @own.setter
    def own(self, value: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        self.slow = value

    def __repr__(self) -> str:
        return (f"Lookahead(k={self.k}, alpha={self.alpha}, pullback={self.pullback!r}, "
                f"base_optimizer={self.base_optimizer!r})")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._init_slow(self.param_groups[-1]["params"])

    # --- algorithm ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_slow(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:  # phi_0 = theta_0
            self.slow[p] = {"slow_param": p.detach().clone(memory_format=torch.preserve_format)}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One inner step; every ``k``-th also updates the slow weights. Returns the closure's loss."""
        loss = self.base_optimizer.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            self._synchronize()
        return loss

    @torch.no_grad()
    def _synchronize(self) -> None:
        params = self._params()
        slows = [self.slow[p]["slow_param"] for p in params]
        for idx in buckets(params, use_foreach(self.foreach, params)):
            ps, ss = [params[i] for i in idx], [slows[i] for i in idx]
            torch._foreach_lerp_(ss, ps, self.alpha)  # phi += alpha (theta - phi)
            torch._foreach_copy_(ps, ss)  # theta <- phi
        if self.pullback == "none":
            return
        for p in params:
            buf = self.base_optimizer.state.get(p, {}).get("momentum_buffer")
            if not torch.is_tensor(buf):
                continue
            if self.pullback == "reset":
                buf.zero_()
            else:
                slow_m = self.slow[p].setdefault("slow_momentum", torch.zeros_like(buf))
                slow_m.lerp_(buf, self.alpha)
                buf.copy_(slow_m)

    # --- checkpointing (Wrapper.state_dict: the inner state dict plus "lookahead") ----------------------
    def _own_state(self) -> dict[str, Any]:
        """Besides the slow weights by parameter index (``"slow"``): the inner-step counter, ``k``,
        ``alpha`` and ``pullback``."""
        return {"step": self.fast_steps, "k": self.k, "alpha": self.alpha, "pullback": self.pullback}

    def _check_own(self, own: dict[int, Any], params: list[torch.Tensor]) -> None:
        if len(own) != len(params):
            raise ConfigError(f"Lookahead state_dict has slow weights for {len(own)} parameters, "
                              f"the optimizer has {len(params)}")

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.fast_steps = int(state["step"])
        self.k, self.alpha, self.pullback = state["k"], state["alpha"], state["pullback"]


def lookahead(params: Iterable[Any], base: str = "adamw", k: int = 5, alpha: float = 0.5,
              pullback: str = "none", **base_hyperparameters: Any) -> Lookahead:
    """Lookahead around the sgdlab optimizer registered as ``base``, built with ``base_hyperparameters``.

    >>> model = torch.nn.Linear(4, 2)
    >>> opt = lookahead(model.parameters(), base="sgd", k=5, alpha=0.5, lr=0.1, momentum=0.9)
    """
    from . import create  # lazy: sgdlab.optim imports this module for its registry

    return Lookahead(create(base, params, **base_hyperparameters), k=k, alpha=alpha, pullback=pullback)
