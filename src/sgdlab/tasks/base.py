"""What a task is: data, a model factory, a loss, an evaluation, and a way to shard the data.

Data lives on the run's device as whole tensors; a batch is gathered by index, so there is no loader
process and a sampler's position (epoch, offset) is all the data state a checkpoint needs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError


class EpochSampler:
    """Batches of indices drawn without replacement from ``pool``, reshuffled each epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so the state is just ``(epoch, pos)``.
    An incomplete last batch of an epoch is dropped.
    """

    def __init__(self, pool: torch.Tensor, batch_size: int, seed: int):
        if batch_size > len(pool):
            raise ConfigError(f"batch_size={batch_size} is larger than the data ({len(pool)} examples); "
                              f"allowed: 1 <= batch_size <= {len(pool)}")
        self.pool, self.batch_size, self.seed = pool, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = self.pool[torch.randperm(len(self.pool), generator=g)]
        return self._perm

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.pool):
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        idx = self._permutation()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None


def parse_split(split: str) -> tuple[str, float | None]:
    """``"iid"``, ``"contiguous"`` or ``"dirichlet:ALPHA"`` (ALPHA a finite number > 0) → (kind, alpha)."""
    kind, colon, arg = str(split).partition(":")
    if kind in ("iid", "contiguous") and not colon:
        return kind, None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(f"data_split={split!r}: dirichlet needs a positive concentration ALPHA, a finite "
                              f"number > 0 (got {arg!r}), e.g. dirichlet:0.5")
        return kind, alpha
    raise ConfigError(f"unknown data_split {split!r}; allowed: iid, contiguous, dirichlet:ALPHA")


def shard_indices(n_examples: int, n_shards: int, split: str, seed: int,
                  labels: torch.Tensor | None = None, min_size: int = 1) -> list[torch.Tensor]:
    """Split example indices ``0..n_examples-1`` into ``n_shards`` worker shards.

    * ``iid``: a seeded random permutation cut into near-equal parts;
    * ``contiguous``: consecutive ranges (for text: each worker reads its own stretch of the corpus);
    * ``dirichlet:ALPHA``: label skew — each class is divided among workers in proportions drawn from
      Dir(ALPHA); small ALPHA gives each worker few classes. Re-drawn (up to 100 times) until every
      shard holds at least ``min_size`` examples.
    """
    if n_shards < 1:
        raise ConfigError(f"number of shards must be >= 1, got {n_shards}")
    if n_examples < n_shards * min_size:
        raise DataError(f"cannot give {n_shards} workers {min_size} examples each from {n_examples}")
    kind, alpha = parse_split(split)
    if kind == "contiguous":
        return [c.clone() for c in torch.arange(n_examples).tensor_split(n_shards)]
    if kind == "iid":
        g = torch.Generator().manual_seed(seed)
        return [c.sort().values for c in torch.randperm(n_examples, generator=g).tensor_split(n_shards)]
    if labels is None:
        raise ConfigError("data_split=dirichlet needs a labelled task (e.g. digits, logreg)")
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_shards)]
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(n_shards, alpha))) * len(idx)).astype(int)[:-1]
            for w, part in enumerate(np.split(idx, cuts)):
                parts[w].append(part)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return [torch.from_numpy(s).long() for s in shards]
    raise DataError(f"dirichlet:{alpha} left a worker with fewer than {min_size} examples in 100 draws; "
                    "use a larger ALPHA, fewer workers or a smaller batch size")


class Task(ABC):
    """A training problem. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type]
    #: headline metric key returned by :meth:`evaluate`, and whether larger is better
    metric: ClassVar[str] = "val_loss"
    metric_higher_is_better: ClassVar[bool] = False
    #: what one example is counted as in metrics ("samples" or "tokens")
    unit: ClassVar[str] = "samples"
    #: classification tasks: the number of classes C (batches are (x, y), labels in 0..C-1), else None
    num_classes: ClassVar[int | None] = None

    def __init__(self, options: Any, device: torch.device, data: str | None = None):
        self.options, self.device, self.data_path = options, device, data

    @property
    @abstractmethod
    def num_train(self) -> int | None:
        """Number of training examples, or None for a task without data (batches are ignored)."""

    @property
    def tokens_per_example(self) -> int:
        return 1

    @property
    def labels(self) -> torch.Tensor | None:
        """Training labels, for label-skewed sharding; None when the task has none."""
        return None

    def info(self) -> dict[str, Any]:
        """Facts about the data for config/summary (sizes, fingerprints)."""
        return {"num_train": self.num_train}

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (the caller seeds torch's RNG first), on ``self.device``."""

    @abstractmethod
    def get_batch(self, indices: torch.Tensor | None) -> Any:
        """The training batch for example ``indices`` (None for data-free tasks), on ``self.device``."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean training loss of ``model`` on ``batch`` (a scalar tensor)."""

    def sampled_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean loss on labels sampled from the model's own predictive distribution, and the number of
        sampled labels (for Gauss-Newton-Bartlett Hessian estimates, as in Sophia-G)."""
        raise ConfigError(f"task {self.name!r} has no predictive distribution to sample labels from, "
                          "which the Gauss-Newton-Bartlett estimator (sophia-g) needs; use sophia-h")

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics; always includes ``val_loss`` and ``self.metric``."""

    def shards(self, n: int, split: str, seed: int, min_size: int = 1) -> list[torch.Tensor]:
        """Training-example indices for each of ``n`` workers."""
        if self.num_train is None:
            return [torch.zeros(0, dtype=torch.long) for _ in range(n)]
        return shard_indices(self.num_train, n, split, seed, self.labels, min_size)
