""":class:`Trainer` and :func:`run`: a run directory, a group, the replicas and the loop, put together."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tasks
from ..config import Config, RunSpec
from ..distributed.group import Group
from ..metrics import require_tensorboard
from .build import build_parts, make_group
from .loop import TrainingLoop
from .rundir import checkpoint_path, open_run_dir


@dataclass
class RunResult:
    out: Path
    config: Config
    summary: dict[str, Any]


class Trainer:
    """Runs one configuration (a :class:`Config`, resolved here, or a :class:`RunSpec`). ``task`` may be
    given to reuse already-loaded data."""

    def __init__(self, config: Config | RunSpec, *, task: tasks.Task | None = None, progress: bool | None = None,
                 handle_signals: bool = False):
        self.spec = config if isinstance(config, RunSpec) else config.spec()
        self.task = task
        self.progress = progress
        self.handle_signals = handle_signals

    def run(self, *, resume: bool | str = False, stop_at: int | None = None, overwrite: bool = False) -> RunResult:
        """Train; ``resume``: True continues the run in ``spec.out``, ``"auto"`` continues it when it holds this
        configuration's run with a checkpoint and starts it otherwise (for restarts under torchrun)."""
        if self.spec.tensorboard:
            require_tensorboard()  # before anything is written
        group, spec = make_group(self.spec)
        try:
            result = self._run(group, spec, resume=resume, stop_at=stop_at, overwrite=overwrite)
        except BaseException:
            group.close(clean=False)
            raise
        group.close()
        return result

    def _run(self, group: Group, spec: RunSpec, *, resume: bool | str, stop_at: int | None,
             overwrite: bool) -> RunResult:
        spec, resume = open_run_dir(group, spec, resume=resume, overwrite=overwrite)
        out = Path(spec.out or ".")
        sync_every = getattr(spec.strategy_options, "sync_every", None)
        timed = getattr(spec.strategy_options, "sync_time", None) is not None  # A-EDiT: rounds by time
        if group.is_lead and sync_every is not None and spec.steps < sync_every and not timed:
            warnings.warn(f"strategy {spec.strategy!r}: steps={spec.steps} < sync_every={sync_every}, so no round "
                          "ends and the workers never synchronise; lower --sync-every or raise --steps", stacklevel=3)
        loop = TrainingLoop(spec, group, build_parts(spec, group, self.task), checkpoint_path(out, group),
                            self.progress)
        if resume:
            loop.resume()
        elif group.is_lead:
            spec.to_config().save(out / "config.json")
        group.barrier()
        status = loop.run(stop_at, self.handle_signals)
        return RunResult(out, spec.to_config(), loop.finish(status))


def run(config: Config | RunSpec, *, resume: bool | str = False, stop_at: int | None = None, overwrite: bool = False,
        progress: bool | None = False, task: tasks.Task | None = None) -> RunResult:
    """Train ``config`` and return its :class:`RunResult` (run directory, resolved config, summary).

    >>> import sgdlab
    >>> res = sgdlab.run(sgdlab.Config(task="quadratic", optimizer="sgd", lr=0.01, steps=100,
    ...                                out="runs/quad"))
    >>> res.summary["final_val_loss"]
    """
    return Trainer(config, task=task, progress=progress).run(resume=resume, stop_at=stop_at, overwrite=overwrite)
