"""The runner behind ``sgdlab run`` and :func:`sgdlab.run`, in three parts.

One run = one :class:`~sgdlab.config.RunSpec` (a resolved :class:`~sgdlab.config.Config`) → a run
directory holding ``config.json`` (resolved), ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt``.
A run stopped (``stop_at``, Ctrl-C, SIGTERM) and resumed ends bit-identical on CPU to the same run done in
one go: the checkpoint holds the model, optimizer, LR schedule, sampler position and RNG states.

* :mod:`.rundir`: the run directory and checkpoints (checks, resume checks, the checkpoint every
  process agrees on, the summary);
* :mod:`.build`: the communication group and the replicas (model, optimizer, LR schedule, sampler, DP
  engines, strategy);
* :mod:`.loop`: the training loop (it speaks the optimizer step protocol, :mod:`sgdlab.optim.protocol`,
  and leaves what differs between backends to :class:`~sgdlab.distributed.group.Group`);
* :mod:`.trainer`: :class:`Trainer` and :func:`run`, which put them together.
"""

from __future__ import annotations

from .build import lr_factor
from .rundir import RESUMABLE_CHANGES, RUN_FILES, check_resume_config, default_out, load_run, prepare_out
from .trainer import RunResult, Trainer, run

__all__ = ["RunResult", "Trainer", "run", "load_run", "lr_factor", "prepare_out", "check_resume_config",
           "default_out", "RUN_FILES", "RESUMABLE_CHANGES"]
