"""Train a set of configurations into one directory (``sgdlab compare``, ``sgdlab frontier``).

Runs go to ``OUT/<name>``, one after another; ``only`` trains a subset (shell patterns) and reports the
others already there; ``resume`` skips completed runs and continues checkpointed ones; a diverged run is a
result and the next run starts.

**One step time per comparison.** Simulated time is compute plus communication; when each run measures its
own compute on a busy machine, identical compute can show twice the time in one run as in another. When every
distributed run of a simulated set does the same compute per worker step (same task, model, optimizer, batch,
device, no DP) and none states ``step_time``, the set's step time is measured once (:func:`calibrate_step_time`),
written to ``OUT/step_time.json`` (reused by later calls on the same directory) and given to every run.
"""

from __future__ import annotations

import fnmatch
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from .config import Config
from .errors import DivergenceError, SgdlabError

#: Config fields that decide the compute of one worker step; a set that agrees on them shares one step time
COMPUTE_KEYS = ("task", "task_args", "data", "optimizer", "optimizer_args", "io_adamw", "batch_size", "grad_clip",
                "dp", "device")
STEP_TIME_FILE = "step_time.json"


def calibrate_step_time(cfg: Config, steps: int = 10, repeats: int = 3) -> float:
    """Seconds of one training step (forward, backward, optimizer step) of ``cfg``'s model at its batch size on
    its device: the median of ``repeats`` timed loops of ``steps`` steps after one warm-up loop."""
    from .bench.loop import bare_loop
    from .runner.build import build_task

    spec = cfg.replace(workers=1, strategy="single", strategy_args={}, compress=None, aggregate=None,
                       pre_aggregate=None, byzantine=None, worker_speeds=None, step_time=None).spec()
    task = build_task(spec)
    bare_loop(task, spec, max(2, steps // 2))
    return statistics.median(bare_loop(task, spec, steps) / steps for _ in range(repeats))


def _compute_key(cfg: Config) -> str:
    d = cfg.to_dict()
    return json.dumps({k: d.get(k) for k in COMPUTE_KEYS}, sort_keys=True, default=str)


def shared_step_time(configs: list[Config], out: Path, reuse: bool = True) -> tuple[list[Config], str | None]:
    """``configs`` with one step time where they share their compute and state none (module docstring), and a
    line saying what was used; unchanged (and None) otherwise. ``reuse=False`` (``--overwrite``) measures
    again instead of reading ``OUT/step_time.json``."""
    if any(c.step_time is not None or c.dp or c.backend != "sim" for c in configs) \
            or len({_compute_key(c) for c in configs}) != 1 or all(c.workers == 1 for c in configs):
        return configs, None
    path = out / STEP_TIME_FILE
    key = _compute_key(configs[0])
    saved = None
    if reuse and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
    if saved and saved.get("compute") == key and isinstance(saved.get("step_time"), float):
        seconds, how = saved["step_time"], f"measured earlier, read from {path}"
    else:
        seconds = calibrate_step_time(configs[0])
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step_time": seconds, "compute": key}, indent=1) + "\n")
        how = f"measured once now, saved in {path}"
    line = (f"simulated time: every run uses one step time, {seconds * 1e3:.1f} ms per worker step ({how}; "
            "set --step-time to state one)")
    return [c.replace(step_time=seconds) for c in configs], line


def is_lead() -> bool:
    """False in a torchrun worker other than rank 0 (which trains the set but leaves the reporting to rank 0)."""
    from .distributed.group import torchrun_env

    env = torchrun_env()
    return env is None or env[0] == 0


def select(names: list[str], only: str | None) -> set[str]:
    """The names matching one of ``only``'s comma-separated shell patterns (all when None)."""
    if not only:
        return set(names)
    patterns = [pat.strip() for pat in only.split(",") if pat.strip()]
    chosen = {n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        raise SgdlabError(f"--only {only!r} matches no run; the runs are: {', '.join(names)}")
    return chosen


def run_set(configs: list[Config], out: Path, only: str | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool | None = None) -> tuple[list[Path], list[str]]:
    """Train ``configs`` into ``out/<name>`` (module docstring); returns (the run directories to report, the
    names of the runs that diverged). Every configuration is validated before anything trains."""
    from .runner import Trainer

    names = [c.name or c.optimizer for c in configs]
    if len(set(names)) != len(names):
        raise SgdlabError(f"a set of runs needs a distinct name for each, got {names}; set name = \"...\"")
    for c in configs:  # fail on any bad config before training anything
        c.validate()
    if out.exists() and not out.is_dir():
        raise SgdlabError(f"--out {out} is a file, not a directory; choose a directory")
    selected = select(names, only)
    configs, line = shared_step_time(configs, out, reuse=not overwrite)
    say = print if is_lead() else (lambda *a, **k: None)
    if line and any(n in selected for n in names):
        say(line, file=sys.stderr)
    dirs, diverged = [], []
    for i, (c, name) in enumerate(zip(configs, names, strict=True)):
        run_dir = out / name
        if name not in selected:
            if (run_dir / "config.json").is_file():  # an earlier run of this set: reported, not trained
                dirs.append(run_dir)
            continue
        dirs.append(run_dir)
        if resume and _completed(run_dir):
            say(f"[{i + 1}/{len(configs)}] {name}: already completed, skipped", file=sys.stderr)
            continue
        say(f"[{i + 1}/{len(configs)}] {name}", file=sys.stderr)
        cont = resume and (run_dir / "checkpoint.pt").is_file()
        # --resume on a run that never checkpointed: nothing to continue, start it again
        restart = resume and not cont
        try:
            res = Trainer(c.replace(out=str(run_dir)), progress=progress, handle_signals=True).run(
                resume=cont, overwrite=overwrite or restart)
        except DivergenceError as e:  # a result, not a reason to drop the remaining runs (a high lr in a sweep)
            diverged.append(name)
            say(f"[{i + 1}/{len(configs)}] {name} diverged: {e}; going on with the next run", file=sys.stderr)
            continue
        if res.summary.get("status") == "stopped":  # Ctrl-C or SIGTERM: checkpointed; the set stops too
            say(f"[{i + 1}/{len(configs)}] {name} stopped at step {res.summary.get('steps')} and checkpointed; "
                  "the remaining runs were not started: continue the set with the same command and --resume",
                  file=sys.stderr)
            break
    return dirs, diverged


def _completed(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        s: Any = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SgdlabError(f"cannot read {path}: {e}") from None
    return s.get("status") == "completed"
