"""The run directory: checks before a run, the resume check against ``config.json``, the checkpoint that
every process agrees on, and ``summary.json``."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import __version__, checkpoint, optim
from ..config import Config, RunSpec
from ..distributed.group import Group
from ..errors import CheckpointError, ConfigError
from ..metrics import read_metrics, write_json

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt")
# Settings that may differ between a run and its resumption (they do not change the trajectory,
# except ``steps``, which extends or shortens the run).
RESUMABLE_CHANGES = ("steps", "device", "eval_every", "log_every", "checkpoint_every", "name", "out", "timeout",
                     "tensorboard")
#: ``resume="auto"`` (``--resume auto``): continue the run in ``--out`` when it holds one of the same
#: configuration with a checkpoint of every process, else start it (again) from step 0 (what a worker that
#: torchrun restarts after a failure needs: the same command line, whatever happened before).
AUTO = "auto"


def default_out(spec: Config | RunSpec) -> Path:
    return Path("runs") / f"{spec.task}-{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_out(out: Path, resume: bool, overwrite: bool, create: bool = True) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory")
    if resume:
        for f in ("config.json", "checkpoint.pt"):
            if not (out / f).is_file():
                raise CheckpointError(f"cannot resume: {out / f} does not exist")
        return
    if overwrite:
        if create:  # only the lead process deletes
            for f in (*RUN_FILES, "report.png", *(p.name for p in out.glob("checkpoint*.pt")),
                      *(p.name for p in out.glob("events.out.tfevents.*"))):
                (out / f).unlink(missing_ok=True)
    elif any((out / f).exists() for f in RUN_FILES):
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it, --overwrite "
                          "to replace it, or choose another --out")
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e.strerror}") from None


def check_resume_config(saved: Config, given: Config | RunSpec, keys: tuple[str, ...] | None = None) -> None:
    """Raise a :class:`ConfigError` naming the first setting (of ``keys``, default all) that ``given`` changes
    and a resumed run may not change."""
    a, b = saved.to_dict(), given.to_dict()
    changed = [k for k in (keys or a) if k not in RESUMABLE_CHANGES and a[k] != b[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"cannot change {k} when resuming (the run used {a[k]!r}, now {b[k]!r}); only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change")


def open_run_dir(group: Group, spec: RunSpec, *, resume: bool | str, overwrite: bool) -> tuple[RunSpec, bool]:
    """Check the run directory (every process), prepare it (the lead) and, to resume, check the run against
    its ``config.json``. Returns ``spec`` with its run directory decided, and whether the run resumes
    (``resume`` may be :data:`AUTO`)."""
    out = Path(spec.out) if spec.out else default_out(spec)
    if group.needs_out and not spec.out:
        raise ConfigError(f"--backend {spec.backend} needs --out DIR (the same directory on every rank)")
    if resume == AUTO:
        resume, overwrite = _auto_resume(group, out, spec, overwrite)
    elif not isinstance(resume, bool):
        raise ConfigError(f"resume={resume!r}; allowed: true, false or {AUTO!r}")
    prepare_out(out, resume, overwrite, create=False)
    group.barrier()  # every process has checked --out before the lead writes into it
    if group.is_lead:
        prepare_out(out, resume, overwrite, create=True)
    if resume:
        saved = Config.from_dict(read_json(out / "config.json"), source=f"key in {out / 'config.json'}:")
        check_resume_config(saved, spec)
    return spec.placed(out=str(out)), resume


def _auto_resume(group: Group, out: Path, spec: RunSpec, overwrite: bool) -> tuple[bool, bool]:
    """(resume, overwrite) for ``resume="auto"``: resume when ``out`` holds this configuration's run and every
    process has a checkpoint there; start again when it holds this configuration without (a process died
    before its first checkpoint); refuse another configuration's run unless ``overwrite``. Every process
    decides the same (on what every rank sees)."""
    mine = [int(out.is_dir() and (out / "config.json").is_file()), int(checkpoint_path(out, group).is_file())]
    gather = getattr(group, "gather_ints", None)  # torch backend: what every rank sees
    seen = gather(mine) if gather is not None else [mine]
    if not seen[0][0]:  # no run here yet
        return False, overwrite
    try:
        check_resume_config(Config.from_dict(read_json(out / "config.json"), source=f"key in {out / 'config.json'}:"),
                            spec)
    except ConfigError as e:
        if overwrite:
            return False, True
        raise ConfigError(f"--resume {AUTO}: {out} holds another run: {e}; pass --overwrite to replace it") from None
    if all(has_ckpt for _, has_ckpt in seen):
        return True, False
    return False, True  # this run, started before, without a checkpoint on every process: start it again


def checkpoint_path(out: Path, group: Group) -> Path:
    """This process's checkpoint: the lead's is ``checkpoint.pt``, every other rank has its own."""
    return out / ("checkpoint.pt" if group.is_lead else f"checkpoint.rank{group.local[0]}.pt")


def load_agreed_checkpoint(group: Group, path: Path, device: str) -> dict[str, Any]:
    """This process's checkpoint at the newest step that every process has (:meth:`Group.agreed_step`)."""
    paths = (path, checkpoint.previous(path)) if group.keeps_previous_checkpoint else (path,)
    candidates: dict[int, dict[str, Any]] = {}
    errors: list[CheckpointError] = []
    for p in paths:
        if not p.is_file():
            continue
        try:
            ck = checkpoint.load(p, map_location=device)
        except CheckpointError as e:
            errors.append(e)
            continue
        candidates[int(ck["step"])] = ck
    step = group.agreed_step(list(candidates))
    if step is None:
        raise errors[0] if errors else CheckpointError(f"no checkpoint at {path}")
    return candidates[step]


def write_summary(out: Path, spec: RunSpec, task: Any, workers: list, group: Group, sim_time: float, st: Any,
                  status: str, dp: Any = None) -> dict[str, Any]:
    """Write and return ``summary.json``: the run's final numbers (``st``: the loop's state)."""
    ev = st.last_eval or {}
    model, opt = workers[0].model, workers[0].optimizer
    s: dict[str, Any] = {
        "name": spec.name, "task": spec.task, "optimizer": spec.optimizer, "strategy": spec.strategy,
        "lr": spec.lr, "status": status, "steps": st.step, "steps_planned": spec.steps,
        "batch_size": spec.batch_size, "seed": spec.seed,
        "final_train_loss": st.train_loss, "final_val_loss": ev.get("val_loss"),
        "best_val_loss": st.best_val_loss, "metric": task.metric,
        task.metric: ev.get(task.metric), f"best_{task.metric}": st.best_metric,
        "wall_time_s": st.wall_time, "eval_time_s": st.eval_time,
        "workers": spec.workers, "backend": spec.backend, "bytes_sent_per_worker": group.bytes_sent,
        "bytes_sent_total": group.bytes_sent * spec.workers, "sim_time_s": sim_time,
        "sim_comm_time_s": group.comm_time,
        "num_params": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": optim.state_bytes(opt),
        "device": spec.device, "torch_version": torch.__version__, "sgdlab_version": __version__,
        "data": task.info(),
    }
    if dp is not None:
        s.update(dp.summary(st.step))
    for k, v in ev.items():
        s.setdefault(k, v)
    write_json(out / "summary.json", s)
    return s


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_run(path: str | Path) -> dict[str, Any]:
    """A run directory's config, summary and metrics records, for reports."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a run directory (no config.json)")
    summary_path = path / "summary.json"
    return {"path": path, "config": read_json(path / "config.json"),
            "summary": read_json(summary_path) if summary_path.is_file() else {},
            "metrics": read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []}
