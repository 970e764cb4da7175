"""Tasks by name. ``sgdlab list tasks`` prints them."""

from __future__ import annotations

import torch

from ..options import build_options
from ..registry import Registry
from .base import EpochSampler, Task, parse_split, shard_indices
from .digits import Digits
from .synthetic import LogReg, Quadratic, Rosenbrock
from .text import CharLM, TextFile

__all__ = ["registry", "create", "Task", "EpochSampler", "build_options", "parse_split", "shard_indices"]

registry: Registry[type[Task]] = Registry("task")
for _cls in (CharLM, TextFile, Digits, Quadratic, LogReg, Rosenbrock):
    registry.register(_cls.name, _cls, _cls.description)


def create(name: str, options: dict | None = None, device: str | torch.device = "cpu",
           data: str | None = None) -> Task:
    """Build task ``name`` with ``options`` (a dict of its option fields) on ``device``."""
    cls = registry.get(name)
    opts = build_options(cls.Options, dict(options or {}), f"option of task {name!r}")
    return cls(opts, torch.device(device), data)
