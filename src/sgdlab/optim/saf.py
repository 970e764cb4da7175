"""SAF (Sharpness-Aware training for Free) and MESA (its memory-efficient variant) around a base optimizer.

Reference: Jiawei Du, Daquan Zhou, Jiashi Feng, Vincent Y. F. Tan, Joey Tianyi Zhou, "Sharpness-Aware
Training for Free", NeurIPS 2022, arXiv:2205.14083; authors' code AngusDujw/SAF (``SAF_train.py``,
``MESA_train.py``).

Both add a trajectory loss to the training loss and back-propagate the sum once, at the base optimizer's
cost (one forward and backward; MESA adds one forward of the teacher without a graph)::

    L = L_task(f_w(x), y) + lam * tau^2 * (1/R) sum_rows KL( softmax(z_ref / tau) || softmax(f_w(x) / tau) )

over the ``R`` rows of the model's output ``f_w(x)`` (logits, classes on the last axis: ``R`` is the batch
size for a classifier and batch x positions for a language model), as ``F.kl_div(..., "batchmean")``.

* SAF (:class:`SAF`): ``z_ref`` are the logits the same example got ``E~ = minus_epochs`` epochs ago, kept
  in a per-example bank ``N x (E~ + 1) x output`` on the host (written before it is read, as the
  reference: slot ``e mod (E~ + 1)``, read ``(e - E~) mod (E~ + 1)``). Applied when ``start_epoch < e <
  end_epoch``. ``e`` is the example's own visit count (0, 1, ...): with sgdlab's epoch sampler every example
  is drawn once per epoch, so it is the reference's epoch, except that an example in the incomplete batch an
  epoch drops is one visit behind from then on. Needs the example ids of each batch (``ctx.example_ids``).
* MESA (:class:`MESA`): ``z_ref = f_ema(x)``, the output of an exponential moving average of the weights
  (``ema <- decay * ema + (1 - decay) * w`` after every base step, from the initial weights), evaluated in
  eval mode on the same batch before the student's forward (the weights are swapped in place and back), for
  base steps ``start_step < t < end_step``. No bank, no ids: +4 B/param.

Defaults (the paper's README): SAF ``lam = 0.3`` (``SAF_train.py``'s argparse default is 0.16), ``tau = 5``,
``minus_epochs = 3``, ``start_epoch = 5``; MESA ``lam = 0.8``, ``tau = 5``, ``decay = 0.9998``. The
reference's ``kl_start_epoch = 5`` for MESA is a number of epochs; here ``start_step`` counts base steps
(default 0: from the first step). The base is SGD with momentum (the paper's ImageNet recipe; any optimizer
taking a plain ``backward(); step()`` works).

Differences from the reference: it stores logits in float32 (the reference: whatever the model gives under
AMP); the MESA teacher shares the model's buffers (BatchNorm statistics) instead of averaging them
(timm's ``ModelEmaV2`` averages the whole state dict); stored logits come from the same batch content, not
another augmentation of it (sgdlab's tasks have no augmentation).

Step protocol (:mod:`sgdlab.optim.protocol`): ``training_loss(ctx)`` returns ``(L, L_task)``; the loop
back-propagates ``L`` and reports ``L_task``. It reads the outputs through forward hooks on ``ctx.model`` for
the duration of ``ctx.loss()``, so the model must be called once per loss and return logits ``[..., C]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_range
from ._wrapper import Wrapper, check_plain_base
from .protocol import StepContext

__all__ = ["MESA", "SAF", "mesa", "saf", "trajectory_kl"]

#: the largest logit bank SAF allocates (bytes)
MAX_BANK_BYTES = 4 << 30


def trajectory_kl(student: torch.Tensor, reference: torch.Tensor, tau: float,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """``tau^2 * (1/R) sum KL(softmax(reference/tau) || softmax(student/tau))`` over the ``R`` rows (all
    leading axes) of ``student``; ``rows`` (bool, one per row) keeps only some rows in the sum, still
    dividing by ``R``."""
    c = student.shape[-1]
    s, r = student.reshape(-1, c) / tau, reference.reshape(-1, c).to(student) / tau
    kl = (F.softmax(r, -1) * (F.log_softmax(r, -1) - F.log_softmax(s, -1))).sum(-1)
    if rows is not None:
        kl = kl * rows.reshape(-1).to(kl)
    return tau ** 2 * kl.sum() / kl.numel()


def _check_logits(out: Any, name: str) -> torch.Tensor:
    if not torch.is_tensor(out) or out.dim() < 2 or out.shape[-1] < 2 or not out.is_floating_point():
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"{name} needs a model that returns class logits [..., classes >= 2]; this one returned "
                          f"{shape} (a regression output has no softmax to compare)")
    return out


class _Trajectory(Wrapper):
    """What SAF and MESA share: hyperparameters, the hook around the loss and the base step."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, lam: float, tau: float):
        super().__init__(base_optimizer)
        check_plain_base(type(self).__name__, base_optimizer)
        check_range("lam", lam, low=0.0)
        check_range("tau", tau, low=0.0, low_open=True)
        self.lam, self.tau = float(lam), float(tau)
        self.base_steps = 0

    def _model(self, ctx: StepContext) -> nn.Module:
        if ctx.model is None:
            raise ConfigError(f"{type(self).__name__} needs the model whose outputs the loss uses (StepContext.model);"
                              " this training loop provides none")
        return ctx.model

    def _forward(self, ctx: StepContext, model: nn.Module, before: Callable | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ctx.loss()`` and the model's output in it; ``before(module, args, kwargs)`` runs first."""
        seen: list[torch.Tensor] = []

        def pre(module, args, kwargs):
            if before is not None and not seen:
                before(module, args, kwargs)

        def post(module, args, kwargs, out):
            seen.append(out)

        handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                   model.register_forward_hook(post, with_kwargs=True)]
        try:
            loss = ctx.loss()
        finally:
            for h in handles:
                h.remove()
        if len(seen) != 1:
            raise ConfigError(f"{type(self).__name__} needs the loss to call the model once, it called it "
                              f"{len(seen)} times")
        return loss, _check_logits(seen[0], type(self).__name__)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self.base_optimizer.step(closure)
        self.base_steps += 1
        self._after_step()
        return loss

    def _after_step(self) -> None:
        pass


class MESA(_Trajectory):
    """MESA (Du et al., NeurIPS 2022): SAF's trajectory loss against an EMA teacher; module docstring.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` taking a plain ``backward(); step()``.
        lam: weight of the KL term, >= 0 (default 0.8).
        tau: softmax temperature, > 0 (default 5).
        decay: EMA decay in [0, 1) (default 0.9998).
        start_step: the KL term applies from base step ``start_step + 1``, an integer >= 0 (default 0).
        end_step: and before base step ``end_step`` (None: to the end).
    """

    key = "mesa"

    def __init__(self, base_optimizer: torch.optim.Optimizer, lam: float = 0.8, tau: float = 5.0,
                 decay: float = 0.9998, start_step: int = 0, end_step: int | None = None):
        super().__init__(base_optimizer, lam, tau)
        check_range("decay", decay, low=0.0, high=1.0, high_open=True)
        check_range("start_step", start_step, low=0, integer=True)
        if end_step is not None:
            check_range("end_step", end_step, low=0, integer=True)
        self.decay, self.start_step, self.end_step = float(decay), start_step, end_step
        with torch.no_grad():
            self.own = {p: {"ema": p.detach().clone()} for p in self._params()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        with torch.no_grad():
            for p in self.param_groups[-1]["params"]:
                self.own[p] = {"ema": p.detach().clone()}

    def active(self, t: int) -> bool:
        """Whether base step ``t`` (1-based) has the KL term."""
        return self.lam > 0 and t > self.start_step and (self.end_step is None or t < self.end_step)

    def training_loss(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_task + lam * KL(teacher || student), L_task)`` on this step's batch (step protocol)."""
        if not self.active(self.base_steps + 1):
            loss = ctx.loss()
            return loss, loss
        teacher: list[torch.Tensor] = []
        params = [p for p in self._params() if p in self.own]

        @torch.no_grad()
        def run_teacher(module, args, kwargs):
            saved = [p.detach().clone() for p in params]
            was_training = module.training
            try:
                for p in params:
                    p.copy_(self.own[p]["ema"])
                module.eval()
                teacher.append(module.forward(*args, **kwargs))
            finally:
                module.train(was_training)
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)

        loss, out = self._forward(ctx, self._model(ctx), run_teacher)
        return loss + self.lam * trajectory_kl(out, teacher[0], self.tau), loss

    @torch.no_grad()
    def _after_step(self) -> None:
        for p, st in self.own.items():
            st["ema"].lerp_(p.detach(), 1.0 - self.decay)

    def _own_state(self) -> dict[str, Any]:
        return {"base_steps": self.base_steps, "lam": self.lam, "tau": self.tau, "decay": self.decay,
                "start_step": self.start_step, "end_step": self.end_step}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.base_steps = int(state["base_steps"])
        self.lam, self.tau, self.decay = state["lam"], state["tau"], state["decay"]
        self.start_step, self.end_step = state["start_step"], state["end_step"]


class SAF(_Trajectory):
    """SAF (Du et al., NeurIPS 2022): the trajectory loss against each example's logits from ``minus_epochs``
    epochs ago; see the module docstring.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` taking a plain ``backward(); step()``.
        lam: weight of the KL term, >= 0 (default 0.3).
        tau: softmax temperature, > 0 (default 5).
        minus_epochs: ``E~``, how many epochs back the reference logits are, an integer >= 1 (default 3).
        start_epoch: the KL term applies to an example's visits ``e > start_epoch`` (default 5).
        end_epoch: and ``e < end_epoch`` (None: to the end).
    """

    key = "saf"

    def __init__(self, base_optimizer: torch.optim.Optimizer, lam: float = 0.3, tau: float = 5.0,
                 minus_epochs: int = 3, start_epoch: int = 5, end_epoch: int | None = None):
        super().__init__(base_optimizer, lam, tau)
        check_range("minus_epochs", minus_epochs, low=1, integer=True)
        check_range("start_epoch", start_epoch, low=0, integer=True)
        if end_epoch is not None:
            check_range("end_epoch", end_epoch, low=0, integer=True)
        self.minus_epochs, self.start_epoch, self.end_epoch = minus_epochs, start_epoch, end_epoch
        self.bank: torch.Tensor | None = None       # N x (E~ + 1) x output, float32, on the CPU
        self.visits = torch.zeros(0, dtype=torch.long)  # how often each example was seen

    def _grow(self, n: int, shape: tuple[int, ...]) -> None:
        if self.bank is not None and self.bank.shape[2:] != shape:
            raise ConfigError(f"SAF's logit bank holds outputs of shape {tuple(self.bank.shape[2:])} per example, "
                              f"this batch gives {shape}")
        have = 0 if self.bank is None else self.bank.shape[0]
        if n <= have:
            return
        size = max(n, 2 * have)
        per = (self.minus_epochs + 1) * int(torch.Size(shape).numel()) * 4
        if size * per > MAX_BANK_BYTES:
            raise ConfigError(f"SAF's logit bank would need {size * per / 2**30:.1f} GiB for example ids up to {n - 1} "
                              f"({per} bytes each); allowed: {MAX_BANK_BYTES / 2**30:.0f} GiB (use mesa, which "
                              "keeps no bank)")
        bank = torch.zeros((size, self.minus_epochs + 1, *shape), dtype=torch.float32)
        visits = torch.zeros(size, dtype=torch.long)
        if self.bank is not None:
            bank[:have], visits[:have] = self.bank, self.visits
        self.bank, self.visits = bank, visits

    def training_loss(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_task + lam * KL(past logits || logits), L_task)`` on this step's batch (step protocol)."""
        if ctx.example_ids is None:
            raise ConfigError("SAF needs the ids of each batch's examples (StepContext.example_ids) to find their "
                              "past logits; this training loop provides none (use mesa, which needs no ids)")
        loss, out = self._forward(ctx, self._model(ctx))
        ids = ctx.example_ids.detach().cpu().long().reshape(-1)
        if out.shape[0] != len(ids):
            raise ConfigError(f"SAF got {len(ids)} example ids for a model output of {out.shape[0]} rows")
        self._grow(int(ids.max()) + 1, tuple(out.shape[1:]))
        assert self.bank is not None
        e, k = self.visits[ids], self.minus_epochs + 1
        self.bank[ids, e % k] = out.detach().float().cpu()
        self.visits[ids] += 1
        rows = (e > self.start_epoch) & (e >= self.minus_epochs)
        if self.end_epoch is not None:
            rows &= e < self.end_epoch
        if self.lam == 0 or not bool(rows.any()):
            return loss, loss
        past = self.bank[ids, (e - self.minus_epochs) % k].to(out.device)
        per_row = rows.to(out.device).reshape(-1, *([1] * (out.dim() - 2))).expand(out.shape[:-1])
        return loss + self.lam * trajectory_kl(out, past, self.tau, per_row), loss

    def _own_state(self) -> dict[str, Any]:
        return {"base_steps": self.base_steps, "lam": self.lam, "tau": self.tau, "minus_epochs": self.minus_epochs,
                "start_epoch": self.start_epoch, "end_epoch": self.end_epoch, "bank": self.bank,
                "visits": self.visits}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.base_steps = int(state["base_steps"])
        self.lam, self.tau, self.minus_epochs = state["lam"], state["tau"], state["minus_epochs"]
        self.start_epoch, self.end_epoch = state["start_epoch"], state["end_epoch"]
        self.bank = None if state["bank"] is None else state["bank"].clone()
        self.visits = state["visits"].clone()


def mesa(params: Iterable[Any], base: str = "sgd", lam: float = 0.8, tau: float = 5.0, decay: float = 0.9998,
         start_step: int = 0, end_step: int | None = None, **base_hyperparameters: Any) -> MESA:
    """MESA around the sgdlab optimizer registered as ``base``, built with ``base_hyperparameters``."""
    from . import create  # lazy: sgdlab.optim imports this module for its registry

    return MESA(create(base, params, **base_hyperparameters), lam=lam, tau=tau, decay=decay, start_step=start_step,
                end_step=end_step)


def saf(params: Iterable[Any], base: str = "sgd", lam: float = 0.3, tau: float = 5.0, minus_epochs: int = 3,
        start_epoch: int = 5, end_epoch: int | None = None, **base_hyperparameters: Any) -> SAF:
    """SAF around the sgdlab optimizer registered as ``base``, built with ``base_hyperparameters``."""
    from . import create  # lazy: sgdlab.optim imports this module for its registry

    return SAF(create(base, params, **base_hyperparameters), lam=lam, tau=tau, minus_epochs=minus_epochs,
               start_epoch=start_epoch, end_epoch=end_epoch)
