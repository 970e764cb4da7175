""":class:`Trainer` and :func:`run`: a run directory, a group, the replicas and the loop, put together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import tasks
from ..config import Config, RunSpec
from ..distributed.group import Group
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

    def run(self, *, resume: bool = False, stop_at: int | None = None, overwrite: bool = False) -> RunResult:
        group, spec = make_group(self.spec)
        try:
            result = self._run(group, spec, resume=resume, stop_at=stop_at, overwrite=overwrite)
        except BaseException:
            group.close(clean=False)
            raise
        group.close()
        return result

    def _run(self, group: Group, spec: RunSpec, *, resume: bool, stop_at: int | None, overwrite: bool) -> RunResult:
        spec = open_run_dir(group, spec, resume=resume, overwrite=overwrite)
        out = Path(spec.out or ".")
        loop = TrainingLoop(spec, group, build_parts(spec, group, self.task), checkpoint_path(out, group),
                            self.progress)
        if resume:
            loop.resume()
        elif group.is_lead:
            spec.to_config().save(out / "config.json")
        group.barrier()
        status = loop.run(stop_at, self.handle_signals)
        return RunResult(out, spec.to_config(), loop.finish(status))


def run(config: Config | RunSpec, *, resume: bool = False, stop_at: int | None = None, overwrite: bool = False,
        progress: bool | None = False, task: tasks.Task | None = None) -> RunResult:
    """Train ``config`` and return its :class:`RunResult` (run directory, resolved config, summary).

    >>> import sgdlab
    >>> res = sgdlab.run(sgdlab.Config(task="quadratic", optimizer="sgd", lr=0.01, steps=100,
    ...                                out="runs/quad"))
    >>> res.summary["final_val_loss"]
    """
    return Trainer(config, task=task, progress=progress).run(resume=resume, stop_at=stop_at, overwrite=overwrite)
