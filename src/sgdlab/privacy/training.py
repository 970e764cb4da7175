"""What the runner needs for a private run: the DP-SGD engine, its Poisson sampler and the accountant.

The runner passes the parsed :class:`~sgdlab.privacy.DPOptions` of its run specification; a ``--dp``
string is accepted too, for use from Python."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..optim import protocol
from . import accounting
from .dpsgd import DPSGD
from .options import DPOptions


class PrivateTraining:
    """DP-SGD for one run of ``steps`` steps with expected batch size ``batch_size`` on ``task``.

    The sample rate is ``q = batch_size / task.num_train``. With ``target_epsilon`` the noise multiplier
    is calibrated here, before training, so that ``steps`` steps spend at most that ε at ``delta``.
    """

    def __init__(self, options: DPOptions | str, task: Any, model: nn.Module, *, steps: int, batch_size: int,
                 seed: int):
        opts = DPOptions.parse(options) if isinstance(options, str) else options
        n = task.num_train
        if n is None:
            raise ConfigError(f"DP-SGD needs a task with training examples; task {task.name!r} has none")
        if batch_size > n:
            raise ConfigError(f"batch_size={batch_size} (the expected batch with DP) is larger than the data "
                              f"({n} examples); allowed: 1 <= batch_size <= {n}")
        self.options, self.num_examples = opts, n
        self.sample_rate = batch_size / n
        self.delta, self.accountant = opts.delta, opts.accountant
        if opts.delta >= 1 / n:
            warnings.warn(f"dp delta={opts.delta:g} is not below 1/N = 1/{n} = {1 / n:.3g}: a mechanism that "
                          "publishes one random example outright would meet it; choose delta < 1/N",
                          UserWarning, stacklevel=2)
        sigma = opts.noise
        if sigma is None:
            sigma = accounting.noise_multiplier(opts.target_epsilon, self.sample_rate, steps, opts.delta,
                                                opts.accountant)
        self.engine = DPSGD(model, task.loss, noise_multiplier=sigma, max_grad_norm=opts.clip,
                            expected_batch_size=batch_size, clipping=opts.clipping,
                            max_physical_batch=opts.max_physical_batch, seed=seed, grad_sample=opts.grad_sample)
        self.sampler = self.engine.sampler(n)
        self._eps: dict[int, float] = {}

    @staticmethod
    def check_optimizer(optimizer: Any, name: str) -> None:
        """Refuse an optimizer that needs more than ``backward(); step()`` (step protocol): the losses it
        evaluates itself would not be private."""
        need = protocol.needs(optimizer)
        if not need.plain:
            raise ConfigError(f"dp: optimizer {name!r} evaluates extra non-private losses ({need.describe()}); "
                              "choose another optimizer for DP-SGD")

    @property
    def noise_multiplier(self) -> float:
        return self.engine.noise_multiplier

    def backward(self, batch: Any):
        return self.engine.backward(batch)

    def epsilon(self, step: int) -> float:
        """ε spent after ``step`` steps (0 before the first)."""
        if step not in self._eps:
            self._eps[step] = 0.0 if step == 0 else accounting.epsilon(
                self.noise_multiplier, self.sample_rate, step, self.delta, self.accountant)
        return self._eps[step]

    def summary(self, step: int) -> dict[str, Any]:
        return {"epsilon": self.epsilon(step), "delta": self.delta, "accountant": self.accountant,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "dp_clip": self.options.clip, "dp_clipping": self.options.clipping}

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
        self._eps.clear()
