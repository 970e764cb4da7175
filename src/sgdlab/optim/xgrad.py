r"""XGrad: the gradient at weights predicted from the base optimizer's own update rule.

Reference: Lei Guan, Dongsheng Li, Yanqi Shi, Jian Meng, "XGrad: Boosting Gradient-Based Optimizers With
Weight Prediction", arXiv:2305.18240 (TPAMI 2024); code: github.com/guanleics/XGrad (``SGD.py``, ``Adam.py``,
``AdamW.py``, ``load_predicted_weights``).

Around a base optimizer with state ``S_t`` (after ``t`` steps), step ``t + 1`` is::

    w_hat = w_t - s * lr * Delta(S_t)               predicted s steps ahead, before the forward
    g     = grad f(w_hat)                           forward and backward at w_hat
    w_t+1 = BaseStep(w_t, g, S_t)                   the weights are restored first; the base step is unchanged

with ``Delta`` the base optimizer's step direction computed from its current state alone (no new gradient):

* SGD with momentum (``torch.optim.SGD``, PyTorch form ``b <- mu b + (1 - dampening) g``): ``Delta = b``;
  without momentum there is no state and ``w_hat = w_t``;
* Adam / AdamW (``torch.optim.Adam``, ``torch.optim.AdamW``): ``Delta = m_hat / (sqrt(v_hat) + eps)`` with
  ``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^t)`` at the current step count ``t`` (``amsgrad``:
  the running maximum of ``v``).

A parameter without state yet (the first step, or one that never had a gradient) is not moved: ``w_hat =
w_0``. ``s`` is ``horizon`` (default 1, the paper's; it also studies small integers); ``s = 0`` is the base
optimizer exactly. With SGD momentum, ``dampening = 0`` and ``s = mu`` the gradient is taken at
``w - lr mu b``: Sutskever's Nesterov momentum (tested). The learning rate used is the group's current one
(the one the coming step will use).

Differences from the reference code: its AdamW prediction leaves out the decoupled decay term
``lr * wd * w``, and so do we (the paper's Adam/AdamW formulas predict with the moment ratio only); its
restore helper ``set_params`` copies the current (predicted) values into the cache before loading it back,
so the restore is a no-op there -- here the cached weights are copied back before the base step, as the paper
describes. Like the reference, BatchNorm running statistics are updated by the forward at ``w_hat``.

The step protocol (:mod:`sgdlab.optim.protocol`): XGrad declares ``before_forward(ctx)``, which loads
``w_hat``; ``step()`` restores ``w_t`` and takes the base step. sgdlab's runner calls both. In a loop of
your own, either call ``opt.before_forward(None)`` before the forward, or pass a closure that zeroes the
gradients, computes the loss and calls ``backward`` (torch.optim's convention): ``step(closure)`` then
predicts, evaluates the closure at ``w_hat``, restores and steps. A plain ``backward(); step()`` without
either takes the gradient at ``w_t``, i.e. the base optimizer. Between ``before_forward`` and ``step``
the model holds ``w_hat`` (gradient clipping and gradient all-reduce there are fine; an evaluation is not).

Memory: one transient copy of the weights that have state (+4 B/param in fp32 between the forward and the
step). ``state_dict()`` is the base optimizer's plus an ``"xgrad"`` entry with ``horizon``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import ConfigError, check_range
from . import protocol
from ._wrapper import Wrapper, check_plain_base

__all__ = ["XGrad", "xgrad"]

#: registered base optimizers XGrad knows the update rule of
BASES = ("sgd", "adam", "adamw")


def _kind(base_optimizer: torch.optim.Optimizer) -> str:
    if isinstance(base_optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    raise ConfigError(f"XGrad predicts weights with the update rule of torch.optim.SGD, Adam or AdamW; got base "
                      f"optimizer {type(base_optimizer).__name__}")


class XGrad(Wrapper):
    """XGrad (Guan et al., 2023, arXiv:2305.18240) around ``base_optimizer`` (``torch.optim.SGD``, ``Adam`` or
    ``AdamW``): the gradient is taken at the weights predicted ``horizon`` steps ahead. See the module docstring.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = XGrad(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), horizon=1)
    """

    key = "xgrad"

    def __init__(self, base_optimizer: torch.optim.Optimizer, horizon: float = 1.0):
        super().__init__(base_optimizer)
        self._kind = _kind(base_optimizer)
        check_plain_base("XGrad", base_optimizer)  # e.g. a torch.optim subclass with a hook of its own
        self.horizon = float(check_range("horizon", horizon, low=0.0))
        self._cache: dict[torch.Tensor, torch.Tensor] = {}  # w_t while the model holds w_hat

    def __repr__(self) -> str:
        return f"XGrad(horizon={self.horizon}, base_optimizer={self.base_optimizer!r})"

    # --- the step protocol ---------------------------------------------------------------------------
    def before_forward(self, ctx: protocol.StepContext | None = None) -> None:
        """Load the predicted weights ``w_hat`` (a no-op while they are loaded already)."""
        if not self._cache:
            self.predict()

    @torch.no_grad()
    def predict(self) -> None:
        """Cache ``w_t`` and move every parameter with state to ``w_hat = w_t - horizon * lr * Delta``."""
        if self.horizon == 0:
            return
        for group in self.param_groups:
            params, deltas = [], []
            for p in group["params"]:
                delta = self._direction(group, self.base_optimizer.state.get(p))
                if delta is not None:
                    params.append(p)
                    deltas.append(delta)
            if not params:
                continue
            for p in params:
                self._cache[p] = p.detach().clone(memory_format=torch.preserve_format)
            torch._foreach_add_(params, deltas, alpha=-self.horizon * float(group["lr"]))

    def _direction(self, group: dict[str, Any], state: dict[str, Any] | None) -> torch.Tensor | None:
        """``Delta(S_t)`` for one parameter (None: no state, the parameter is not moved)."""
        if not state:
            return None
        if self._kind == "sgd":
            return state.get("momentum_buffer")
        t = float(state["step"])
        if t == 0:
            return None
        beta1, beta2 = (float(b) for b in group["betas"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        return (state["exp_avg"] / (1 - beta1 ** t)).div_(denom)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the cached ``w_t`` back (a no-op when no prediction is loaded)."""
        if self._cache:
            params = list(self._cache)
            torch._foreach_copy_(params, [self._cache[p] for p in params])
            self._cache.clear()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Restore ``w_t`` and take the base step with the gradient at ``w_hat``. With ``closure`` (it zeroes
        the gradients, computes the loss and back-propagates it) the prediction and the closure happen here;
        returns the closure's loss."""
        loss = None
        if closure is not None:
            self.before_forward(None)
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.restore()
                raise
        self.restore()
        self.base_optimizer.step()
        return loss

    # --- checkpointing -------------------------------------------------------------------------------
    def _own_state(self) -> dict[str, Any]:
        return {"horizon": self.horizon}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.horizon = float(state["horizon"])

    def state_dict(self) -> dict[str, Any]:
        if self._cache:
            raise ConfigError("XGrad.state_dict() while the predicted weights are loaded (between before_forward "
                              "and step): call it after step()")
        return super().state_dict()


def xgrad(params: Iterable[Any], base: str = "adamw", horizon: float = 1.0, **base_hyperparameters: Any) -> XGrad:
    """XGrad around the optimizer registered as ``base`` (``sgd``, ``adam`` or ``adamw``), built with
    ``base_hyperparameters``.

    >>> model = torch.nn.Linear(4, 2)
    >>> opt = xgrad(model.parameters(), base="sgd", horizon=1, lr=0.1, momentum=0.9)
    """
    from . import create  # lazy: sgdlab.optim imports this module for its registry

    if not isinstance(base, str) or base not in BASES:
        raise ConfigError(f"base={base!r} is not allowed for xgrad; allowed: {', '.join(map(repr, BASES))} (the "
                          "update rules it predicts with)")
    check_range("horizon", horizon, low=0.0)
    return XGrad(create(base, params, **base_hyperparameters), horizon=horizon)

