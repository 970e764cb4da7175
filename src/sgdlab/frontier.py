"""``sgdlab frontier``: the loss–bytes–time trade-off of distributed training and its Pareto front.

For a task, a worker count and a token budget, :func:`grid` builds ``ddp`` (uncompressed and with a few
compressors) and a grid of local methods × sync period H × exchange precision × outer learning rate; every run
has the same tokens, the same inner optimizer and schedule, one step time and one simulated network
(:data:`~sgdlab.distributed.network.NETWORKS`: ``datacenter`` 100 Gbit/s, ``cross-region`` 1 Gbit/s and
30 ms, ``wan`` 100 Mbit/s and 100 ms). :func:`points` turns run directories into configurations: runs that
differ only in the seed are one point (mean final validation loss, spread across seeds), and runs that differ
only in the outer learning rate are one tuned point (the best mean loss; the others are listed as tried). A
point is on the front when no other point has a lower or equal loss, bytes sent per worker and simulated
time with one of them strictly lower; the loss–bytes front (the plot's staircase) ignores time.

Outer learning rates are tuned on the same validation loss that the table reports, as the papers' sweeps do:
the tuned point is optimistic by the noise of picking the best of a few runs (the seeds column shows that
noise). Bytes are what the simulated collectives send per worker; simulated time is the stated or
once-calibrated step time plus the network model's communication time, so it depends on the network chosen
when the runs were trained (the table states it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError, SgdlabError

# ---- the grid ---------------------------------------------------------------------------------------------------

#: named scales of the grid: task options, steps, per-worker batch, workers, sync periods, outer lrs
SCALES: dict[str, dict[str, Any]] = {
    # the tests' size: a 1-layer 16-wide model, seconds on a CPU
    "tiny": dict(task_args={"context": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "eval_windows": 4},
                 steps=24, batch_size=4, workers=2, hs=(4, 12), outer_lrs=(0.7,)),
    # charlm's default model (0.45M parameters), the strategies-4 settings: 45 runs, 2-4 hours on one CPU core
    "cpu": dict(task_args={}, steps=600, batch_size=8, workers=4, hs=(10, 50, 200), outer_lrs=(0.4, 0.7, 1.0)),
    # a 25M-parameter byte transformer on one CUDA device (simulated workers), for the headline at scale
    "gpu": dict(task_args={"context": 256, "d_model": 512, "n_layers": 8, "n_heads": 8, "max_bytes": 50_000_000,
                           "eval_windows": 256}, steps=3000, batch_size=16, workers=8, hs=(50, 100, 300),
                outer_lrs=(0.4, 0.7, 1.0)),
}
METHODS = ("localsgd", "diloco", "streaming-diloco")
PRECISIONS = ("fp32", "int4")
#: compressors of the ddp rows (each a --compress spec)
DDP_COMPRESSORS = ("int8", "powersgd,rank=4")


def tokens_per_step(task: str, task_args: dict, workers: int, batch_size: int) -> int:
    """Tokens (examples times context for text tasks, else examples) all workers consume in one step."""
    from . import tasks
    from .options import build_options

    opts = build_options(tasks.registry.get(task).Options, dict(task_args), f"option of task {task!r}")
    return workers * batch_size * getattr(opts, "context", 1)


def grid(scale: str = "cpu", *, task: str = "charlm", workers: int | None = None, steps: int | None = None,
         tokens: int | None = None, batch_size: int | None = None, network: str = "cross-region",
         hs: tuple[int, ...] | None = None, outer_lrs: tuple[float, ...] | None = None,
         precisions: tuple[str, ...] = PRECISIONS, methods: tuple[str, ...] = METHODS,
         compressors: tuple[str, ...] = DDP_COMPRESSORS, seeds: tuple[int, ...] = (0,),
         step_time: float | None = None, device: str = "auto", task_args: dict | None = None) -> list[Config]:
    """The runs of a frontier (module docstring). ``scale`` picks the defaults of :data:`SCALES`; ``tokens``
    sets the steps from the token budget. Inner optimizer: AdamW (lr 3e-3, weight decay 0.01, cosine after a
    warm-up of steps/30, gradient clip 1), as the ``strategies-4`` preset. Names: ``ddp``, ``ddp-<compressor>``,
    ``<method>-h<H>-<precision>[-lr<outer lr>]``, with ``-s<seed>`` when there are several seeds."""
    if scale not in SCALES:
        raise ConfigError(f"unknown frontier scale {scale!r}; allowed: {', '.join(SCALES)}")
    s = SCALES[scale]
    workers = workers or s["workers"]
    batch_size = batch_size or s["batch_size"]
    targs = {**s["task_args"], **(task_args or {})}
    if tokens is not None and steps is not None:
        raise ConfigError("give the frontier's budget as steps or as tokens, not both")
    if tokens is not None:
        per = tokens_per_step(task, targs, workers, batch_size)
        steps = tokens // per
        if steps < 1:
            raise ConfigError(f"--tokens {tokens} is less than one step ({per} tokens: {workers} workers × batch "
                              f"{batch_size} × context); allowed: --tokens >= {per}")
    steps = steps or s["steps"]
    hs, outer_lrs = tuple(hs or s["hs"]), tuple(outer_lrs or s["outer_lrs"])
    for h in hs:
        if not 1 <= h <= steps:
            raise ConfigError(f"sync period H={h} is out of range; allowed: 1 <= H <= steps ({steps})")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown frontier method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    from .exchange import PRECISIONS as ALL_PRECISIONS

    bad = sorted(set(precisions) - set(ALL_PRECISIONS))
    if bad:
        raise ConfigError(f"unknown precision(s) {', '.join(bad)}; allowed: {', '.join(ALL_PRECISIONS)}")
    if not seeds:
        raise ConfigError("a frontier needs at least one seed")
    if workers < 2:
        raise ConfigError(f"--workers {workers}: a frontier compares distributed runs; allowed: --workers >= 2")
    base = dict(task=task, task_args=targs, optimizer="adamw", lr=3e-3, optimizer_args={"weight_decay": 0.01},
                steps=steps, batch_size=batch_size, workers=workers, eval_every=max(1, steps // 6),
                schedule="cosine", warmup_steps=max(1, steps // 30), grad_clip=1.0, network=network,
                step_time=step_time, device=device)
    points: list[tuple[str, dict]] = [("ddp", dict(strategy="ddp"))]
    points += [(f"ddp-{_tag(c)}", dict(strategy="ddp", compress=c)) for c in compressors]
    for method in methods:
        for h in hs:
            for prec in precisions:
                lrs = (None,) if method == "localsgd" else outer_lrs
                for lr in lrs:
                    args: dict[str, Any] = {"sync_every": h}
                    extra: dict[str, Any] = {}
                    if lr is not None:
                        args["outer_lr"] = lr
                    if method == "streaming-diloco":  # the paper's fragments and overlap, precision of its own
                        args.update(fragments=2, overlap=1, mix_alpha=0.5, precision=prec)
                    elif prec != "fp32":
                        extra["compress"] = prec
                    name = f"{method}-h{h}-{prec}" + ("" if lr is None or len(lrs) == 1 else f"-lr{lr:g}")
                    points.append((name, dict(strategy=method, strategy_args=args, **extra)))
    return [Config(name=name if len(seeds) == 1 else f"{name}-s{seed}", seed=seed, **base, **kw)
            for seed in seeds for name, kw in points]


def _tag(spec: str) -> str:
    return spec.replace("rank=", "r").replace("ratio=", "").replace(",", "-").replace("=", "")


# ---- points, fronts and the table -------------------------------------------------------------------------------

@dataclasses.dataclass
class Point:
    """One configuration: its runs over seeds (and, when tuned, the outer learning rates tried)."""

    label: str
    runs: list[dict[str, Any]]
    loss: float          # mean final validation loss over seeds
    spread: float        # max − min final validation loss over seeds (0 with one seed)
    nbytes: float        # mean bytes sent per worker
    sim_time: float      # mean simulated seconds
    outer_lr: float | None = None
    outer_lrs_tried: tuple[float, ...] = ()
    front2: bool = False  # on the loss–bytes front
    front3: bool = False  # on the loss–bytes–time front

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0]["config"]


def _finished(run: dict[str, Any]) -> bool:
    loss = run["summary"].get("final_val_loss")
    return run["summary"].get("status") == "completed" and loss is not None and math.isfinite(loss)


_SEED = re.compile(r"(^|-)s\d+(?=-|$)")
_OUTER = re.compile(r"-lr[0-9.e+-]+(?=-|$)")


def _key(config: dict[str, Any], drop_outer_lr: bool) -> str:
    c = {k: v for k, v in config.items() if k not in ("name", "out", "seed")}
    if drop_outer_lr:
        c["strategy_args"] = {k: v for k, v in c.get("strategy_args", {}).items() if k != "outer_lr"}
    return json.dumps(c, sort_keys=True, default=str)


def points(runs: list[dict[str, Any]]) -> list[Point]:
    """The finished distributed runs as :class:`Point` s, seeds merged and outer lrs tuned, fronts marked."""
    dist = [r for r in runs if r["config"].get("workers", 1) > 1 and _finished(r)]
    by_seed: dict[str, list[dict[str, Any]]] = {}
    for r in dist:
        by_seed.setdefault(_key(r["config"], False), []).append(r)
    seeded = []
    for group in by_seed.values():
        losses = [r["summary"]["final_val_loss"] for r in group]
        name = group[0]["config"].get("name") or group[0]["path"].name
        seeded.append(Point(_SEED.sub("", name) if len(group) > 1 else name, group, sum(losses) / len(losses),
                            max(losses) - min(losses),
                            sum(r["summary"].get("bytes_sent_per_worker") or 0.0 for r in group) / len(group),
                            sum(r["summary"].get("sim_time_s") or 0.0 for r in group) / len(group),
                            outer_lr=group[0]["config"].get("strategy_args", {}).get("outer_lr")))
    by_lr: dict[str, list[Point]] = {}
    for p in seeded:
        by_lr.setdefault(_key(p.config, True), []).append(p)
    out = []
    for group in by_lr.values():
        best = min(group, key=lambda p: p.loss)
        if len(group) > 1:
            best.outer_lrs_tried = tuple(sorted(p.outer_lr for p in group if p.outer_lr is not None))
            best.label = _OUTER.sub("", best.label)
        out.append(best)
    for p in out:
        others = [q for q in out if q is not p]
        p.front2 = not any(q.loss <= p.loss and q.nbytes <= p.nbytes and (q.loss, q.nbytes) != (p.loss, p.nbytes)
                           for q in others)
        v = (p.loss, p.nbytes, p.sim_time)
        p.front3 = not any(all(a <= b for a, b in zip((q.loss, q.nbytes, q.sim_time), v, strict=True))
                           and (q.loss, q.nbytes, q.sim_time) != v for q in others)
    return sorted(out, key=lambda p: (p.nbytes, p.loss))


def reference(pts: list[Point]) -> Point | None:
    """The uncompressed ``ddp`` point that the others are measured against (None without one)."""
    return next((p for p in pts if p.config.get("strategy") == "ddp" and p.config.get("compress") in (None, "fp32")
                 and p.config.get("strategy_args", {}).get("precision") in (None, "fp32")), None)


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "∞"
    return f"{a / b:,.0f}" if a / b >= 1000 else f"{a / b:.3g}"


def _describe(p: Point) -> str:
    extra = f" (outer lr {p.outer_lr:g})" if p.outer_lrs_tried else ""
    return f"{p.label}{extra}"


def takeaway(pts: list[Point], ref: Point | None = None) -> str | None:
    """One line: the configuration with the most byte reduction within 1% of ``ddp``'s loss, else the one with
    the lowest loss, as a fraction of ``ddp``'s loss with its byte and simulated-time reductions."""
    ref = ref or reference(pts)
    others = [p for p in pts if p is not ref]
    if ref is None or not others:
        return None
    within = [p for p in others if p.loss <= 1.01 * ref.loss]
    if within:
        p = min(within, key=lambda q: q.nbytes)
        head = f"at most 1% above ddp's final validation loss: {_describe(p)}"
    else:
        p = min(others, key=lambda q: q.loss)
        head = f"no configuration within 1% of ddp; the closest, {_describe(p)},"
    time = (f"{_ratio(ref.sim_time, p.sim_time)}× less simulated time" if p.sim_time <= ref.sim_time
            else f"{_ratio(p.sim_time, ref.sim_time)}× more simulated time")
    return (f"{head} reaches {p.loss / ref.loss:.3f}× ddp's loss ({p.loss:.4f} vs {ref.loss:.4f}, "
            f"{100 * (p.loss / ref.loss - 1):+.1f}%) with {_ratio(ref.nbytes, p.nbytes)}× fewer bytes per worker and "
            f"{time}.")


_BUDGET = ("task", "task_args", "data", "workers", "steps", "batch_size", "network")


def budgets(runs: list[dict[str, Any]]) -> list[tuple[str, list[Point], Point]]:
    """The finished distributed runs split by budget (task and its options, workers, steps, batch, network:
    only runs that agree on these are compared), each as (title, :func:`points` of the group, its ``ddp``
    point); groups without an uncompressed ``ddp`` run or with one configuration are left out."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["config"].get("workers", 1) > 1 and _finished(r):
            key = json.dumps({k: r["config"].get(k) for k in _BUDGET}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        pts = points(members)
        ref = reference(pts)
        if ref is None or len(pts) < 2:
            continue
        c = ref.config
        opts = ", ".join(f"{k}={v}" for k, v in sorted(_non_default(c.get("task", ""), c.get("task_args")).items()))
        out.append((f"{c.get('task', '')}{f' ({opts})' if opts else ''}, {c.get('workers')} workers, "
                    f"{c.get('steps')} steps of batch {c.get('batch_size')}", pts, ref))
    return out


def _non_default(task: str, options: dict | None) -> dict:
    """The task options that differ from the task's defaults (config.json lists every one)."""
    from . import tasks

    try:
        defaults = {f.name: f.default for f in dataclasses.fields(tasks.registry.get(task).Options)}
    except ConfigError:  # a task this version does not know: show them all
        defaults = {}
    return {k: v for k, v in (options or {}).items() if k not in defaults or defaults[k] != v}


def table(runs: list[dict[str, Any]]) -> str | None:
    """The frontier table of each budget of ``runs`` (:func:`budgets`; one row per :class:`Point`, by
    increasing bytes) with its takeaway line; None when no budget has a ``ddp`` run and another configuration."""
    groups = budgets(runs)
    parts = []
    for title, pts, ref in groups:
        seeds = max(len(p.runs) for p in pts)
        head = ["configuration", "final val loss", *(["seeds, spread"] if seeds > 1 else []), "vs ddp %",
                "MB sent / worker", "fewer bytes ×", "sim s", "less time ×", "outer lrs tried",
                "front (loss, bytes)", "front (+ time)"]
        lines = [f"{title}:", ""] if len(groups) > 1 else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in pts:
            row = [_describe(p), f"{p.loss:.4f}", *([f"{len(p.runs)}, {p.spread:.4f}"] if seeds > 1 else []),
                   f"{100 * (p.loss / ref.loss - 1):+.2f}", f"{p.nbytes / 1e6:.4g}", _ratio(ref.nbytes, p.nbytes),
                   f"{p.sim_time:.1f}", _ratio(ref.sim_time, p.sim_time),
                   ", ".join(f"{v:g}" for v in p.outer_lrs_tried) or "–", "yes" if p.front2 else "",
                   "yes" if p.front3 else ""]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"Takeaway ({_networks(pts)}): " + (takeaway(pts, ref) or "")]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) or None


def _networks(pts: list[Point]) -> str:
    """The simulated network(s) of the points' runs, in words."""
    from .distributed.network import NetworkModel

    nets = sorted({NetworkModel.parse(r["config"].get("network")).describe() for p in pts for r in p.runs})
    return "network " + "; ".join(nets) if len(nets) == 1 else "networks differ: " + "; ".join(nets)


def plot(runs: list[dict[str, Any]], path: str | Path) -> Path | None:
    """For each budget (:func:`budgets`), final validation loss against bytes sent per worker (log x) and
    against simulated time, each point labelled, the loss–bytes front as a staircase and a ±1% band around
    ``ddp``; None where :func:`table` has nothing to show."""
    groups = budgets(runs)
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid_axs = plt.subplots(len(groups), 2, figsize=(14, 5.5 * len(groups)), squeeze=False)
    for axs, (title, pts, ref) in zip(grid_axs, groups, strict=True):
        _plot_budget(axs, title, pts, ref)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_budget(axs: Any, title: str, pts: list[Point], ref: Point) -> None:
    floor = min((p.nbytes for p in pts if p.nbytes), default=1.0) / 2
    for ax, key, xlabel in ((axs[0], "nbytes", "bytes sent per worker (log)"),
                            (axs[1], "sim_time", "simulated time (s)")):
        ax.axhspan(0.99 * ref.loss, 1.01 * ref.loss, color="0.85", label="ddp ±1%", zorder=0)
        xs = [getattr(p, key) or floor for p in pts]
        ax.scatter(xs, [p.loss for p in pts], s=[36 if p.front3 else 16 for p in pts],
                   c=["C3" if p.front3 else "C0" for p in pts], zorder=3)
        for p, x in zip(pts, xs, strict=True):
            if p.spread:
                ax.errorbar([x], [p.loss], yerr=[[p.loss - min(r["summary"]["final_val_loss"] for r in p.runs)],
                                                 [max(r["summary"]["final_val_loss"] for r in p.runs) - p.loss]],
                            color="0.4", lw=0.8, zorder=2)
            ax.annotate(p.label, (x, p.loss), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final validation loss")
        ax.grid(alpha=0.3, which="both")
    for ax, x in ((axs[0], ref.nbytes or floor), (axs[1], ref.sim_time)):
        ax.scatter([x], [ref.loss], marker="*", s=140, c="k", zorder=4, label="ddp")
    front = [p for p in pts if p.front2]
    axs[0].step([p.nbytes or floor for p in front], [p.loss for p in front], where="post", color="C3", lw=1.4,
                label="loss–bytes front", zorder=2)
    axs[0].set_xscale("log")
    axs[0].scatter([], [], s=36, c="C3", label="on the loss–bytes–time front")
    axs[0].set_title(f"{title}: loss vs bytes", fontsize=10)
    axs[1].set_title(f"loss vs simulated time, {_networks(pts)}", fontsize=10)
    axs[0].legend(fontsize=8)


# ---- the command ------------------------------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    import argparse

    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(p) -> None:
    from .distributed.network import NETWORKS

    p.add_argument("--scale", default="cpu", choices=list(SCALES),
                   help=f"grid size: {', '.join(SCALES)} (default cpu: charlm's 0.45M "
                   "model, 4 workers, 600 steps; tiny: seconds, for tests; gpu: a 25M model, 8 workers, 3000 steps, "
                   "for one CUDA device)")
    p.add_argument("--task", default="charlm", help="task name (see `sgdlab list tasks`)")
    p.add_argument("--data", default=None, help="input file for tasks that read one (textfile)")
    p.add_argument("--workers", type=int, default=None, help="number of workers (default: the scale's)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="steps of every run (default: the scale's)")
    budget.add_argument("--tokens", type=int, default=None,
                        help="token budget of every run (sets the steps: tokens / (workers × batch × context))")
    p.add_argument("--batch-size", type=int, default=None, help="per-worker batch (default: the scale's)")
    p.add_argument("--network", default="cross-region",
                   help=f"simulated network: {', '.join(f'{k} ({v})' for k, v in NETWORKS.items())}, or "
                        "bandwidth=B,latency=L (default cross-region)")
    p.add_argument("--hs", type=_ints, default=None, help="sync periods H, e.g. 10,50,200 (default: the scale's)")
    p.add_argument("--outer-lrs", type=_floats, default=None,
                   help="outer learning rates tried for diloco and streaming-diloco (default: the scale's)")
    p.add_argument("--precisions", type=_names, default=PRECISIONS,
                   help=f"exchange precisions of the local methods (default {','.join(PRECISIONS)})")
    p.add_argument("--methods", type=_names, default=METHODS, help=f"local methods (default {','.join(METHODS)})")
    p.add_argument("--compressors", type=lambda t: tuple(v for v in t.split(";") if v.strip()),
                   default=DDP_COMPRESSORS, help="';'-separated --compress specs of the ddp rows (default "
                   f"{';'.join(DDP_COMPRESSORS)}; '' for none)")
    p.add_argument("--seeds", type=_ints, default=(0,), help="seeds, e.g. 0,1 (default 0)")
    p.add_argument("--step-time", type=float, default=None,
                   help="seconds per worker step for simulated time (default: measured once for all runs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting of every run, as for `sgdlab run` (e.g. d_model=256)")
    p.add_argument("--out", default=None, help="directory for the runs; default runs/frontier-<scale>")
    p.add_argument("--only", metavar="PATTERNS", default=None,
                   help="train only the runs whose names match these comma-separated shell patterns; the report "
                        "includes the other runs already in --out")
    p.add_argument("--list", action="store_true", help="print the runs of the grid and stop")
    p.add_argument("--resume", action="store_true", help="skip completed runs, continue checkpointed ones")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false")


def main(args) -> int:
    from .report import report
    from .runset import is_lead, run_set

    configs = grid(args.scale, task=args.task, workers=args.workers, steps=args.steps, tokens=args.tokens,
                   batch_size=args.batch_size, network=args.network, hs=args.hs, outer_lrs=args.outer_lrs,
                   precisions=args.precisions, methods=args.methods, compressors=args.compressors,
                   seeds=args.seeds, step_time=args.step_time, device=args.device)
    configs = [c.replace(data=args.data) if args.data else c for c in configs]
    for s in args.sets:
        configs = [c.set(s) for c in configs]
    c0 = configs[0].validate()  # the settings every run shares (task, network, --set) before anything trains
    tokens = c0.steps * tokens_per_step(c0.task, c0.task_args, c0.workers, c0.batch_size)
    if is_lead() or args.list:
        print(f"frontier: {len(configs)} runs of {c0.task}, {c0.workers} workers, {c0.steps} steps "
              f"({tokens:,} tokens each), network {c0.network}", file=sys.stderr)
    if args.list:
        for c in configs:
            print(c.name)
        return 0
    out = Path(args.out or f"runs/frontier-{args.scale}")
    dirs, diverged = run_set(configs, out, only=args.only, resume=args.resume, overwrite=args.overwrite,
                             progress=args.progress)
    if not is_lead():  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    md, _ = report(dirs, out / "report.png")
    (out / "report.md").write_text(md + "\n")
    print(md)
    if diverged:
        print(f"diverged: {', '.join(diverged)}", file=sys.stderr)
    if not (out / "report-frontier.png").is_file():
        raise SgdlabError(f"no frontier to report in {out}: it needs a finished uncompressed ddp run and another "
                          "distributed run")
    return 0
