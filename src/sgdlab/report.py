"""``sgdlab report``: a markdown table of runs and ``report.png`` with validation curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import frontier
from .errors import ConfigError
from .runner import load_run

# x axes of the plot: (metrics key, label, log scale); a panel appears when some run logged the key.
X_AXES = [("step", "step", False), ("wall_time_s", "wall-clock time (s)", False),
          ("bytes_sent", "bytes sent per worker", True), ("sim_time_s", "simulated time (s)", False)]


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def table(runs: list[dict[str, Any]]) -> str:
    rows = []
    head = ["run", "task", "strategy", "workers", "optimizer", "lr", "steps", "final train loss", "final val loss",
            "best val loss", "metric", "wall s", "sim s", "MB sent / worker", "opt. state MiB", "status"]
    for r in runs:
        s, c = r["summary"], r["config"]
        metric = s.get("metric", "val_loss")
        mval = s.get(metric)
        rows.append([
            c.get("name") or r["path"].name, c.get("task"), c.get("strategy", "single"), c.get("workers", 1),
            c.get("optimizer"), _fmt(c.get("lr"), ".3g"),
            _fmt(s.get("steps")), _fmt(s.get("final_train_loss")), _fmt(s.get("final_val_loss")),
            _fmt(s.get("best_val_loss")),
            "–" if metric == "val_loss" or mval is None else f"{metric} {_fmt(mval)}",
            _fmt(s.get("wall_time_s"), ".1f"), _fmt(s.get("sim_time_s"), ".1f"),
            _fmt(s["bytes_sent_per_worker"] / 1e6, ".3g") if "bytes_sent_per_worker" in s else "–",
            _fmt(s["optimizer_state_bytes"] / 2**20, ".2f") if "optimizer_state_bytes" in s else "–",
            s.get("status", "running?"),
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _sweep_label(names: list[str], optimizer: str) -> str:
    """The part of the run names a sweep shares, cut at the last '-' (``muon-x0.3``, ``muon-x1`` -> ``muon``)."""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rsplit("-", 1)[0] if "-" in prefix else optimizer


def sweeps(runs: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Learning-rate sweeps among ``runs``: groups of completed or diverged runs whose configurations differ only
    in ``lr`` (and name and output directory), with at least two learning rates and one finished run
    (:func:`_finished`); each as (label, runs sorted by lr)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        key = {k: v for k, v in r["config"].items() if k not in ("name", "lr", "out")}
        groups.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(r)
    out = []
    for members in groups.values():
        tried = [r for r in members if r["config"].get("lr") and r["summary"].get("status") in ("completed",
                                                                                               "diverged")]
        if len({r["config"]["lr"] for r in tried}) < 2 or not any(_finished(r) for r in tried):
            continue
        tried.sort(key=lambda r: r["config"]["lr"])
        label = _sweep_label([r["config"].get("name") or r["path"].name for r in tried],
                             tried[0]["config"]["optimizer"])
        out.append((label, tried))
    return out


def _finished(run: dict[str, Any]) -> bool:
    """Completed with a finite final validation loss (a diverged run keeps the loss of its last evaluation)."""
    loss = run["summary"].get("final_val_loss")
    return run["summary"].get("status") == "completed" and loss is not None and math.isfinite(loss)


def _best(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    return min((r for r in sweep if _finished(r)), key=lambda r: r["summary"]["final_val_loss"])


def sweep_table(runs: list[dict[str, Any]]) -> str | None:
    """A row per learning-rate sweep (:func:`sweeps`). Columns: the learning rates tried, the one with the lowest
    final validation loss, that loss and the task metric there, the loss at the optimizer's registered default
    lr (when it was tried), and whether the best lr is an end of the sweep (then a wider sweep may find
    better). Rows sorted by best loss; None when there is no sweep."""
    from . import optim

    rows = []
    for label, tried in sweeps(runs):
        done = [r for r in tried if _finished(r)]
        best = _best(tried)
        c, s = best["config"], best["summary"]
        try:
            lr0 = optim.hyperparameters(c["optimizer"], c.get("optimizer_args", {}).get("base")).get("lr")
        except Exception:  # an optimizer this version does not know
            lr0 = None
        at_default = next((r["summary"]["final_val_loss"] for r in done
                           if lr0 and abs(r["config"]["lr"] - lr0) <= 1e-9 * lr0), None)
        metric = s.get("metric", "val_loss")
        edge = "yes" if best is tried[0] or best is tried[-1] else "no"
        lrs_tried = ", ".join(_fmt(r["config"]["lr"], ".3g") + ("" if _finished(r) else " (diverged)") for r in tried)
        rows.append((s["final_val_loss"], [
            label, c.get("optimizer"), lrs_tried, _fmt(c["lr"], ".3g"),
            _fmt(s["final_val_loss"]), "–" if metric == "val_loss" or s.get(metric) is None
            else f"{metric} {_fmt(s[metric])}",
            "–" if at_default is None else f"{_fmt(at_default)} ({_fmt(lr0, '.3g')})", edge,
            _fmt(s["optimizer_state_bytes"] / 2**20, ".2f") if "optimizer_state_bytes" in s else "–"]))
    if not rows:
        return None
    head = ["sweep", "optimizer", "lrs tried", "best lr", "final val loss at best lr", "metric at best lr",
            "at default lr", "best at an end", "opt. state MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for _, row in sorted(rows, key=lambda t: t[0])]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # learning-rate sweeps: the curves show each sweep's best run; a last panel shows loss against lr
    groups = sweeps(runs)
    in_sweep = {id(r) for _, g in groups for r in g}
    best_ids = {id(_best(g)) for _, g in groups}
    runs = [r for r in runs if id(r) not in in_sweep or id(r) in best_ids]
    distributed = any(r["config"].get("workers", 1) > 1 for r in runs)
    axes_spec = [a for a in X_AXES if a[0] in ("step", "wall_time_s") or (
        distributed and any(m.get(a[0]) for r in runs for m in r["metrics"] if "val_loss" in m))]
    metric = next((r["summary"].get("metric") for r in runs if r["summary"].get("metric")), "val_loss")
    extra = metric != "val_loss"
    n = len(axes_spec) + int(extra) + int(bool(groups))
    fig, axs = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    axs = axs[0]
    # one distinct (colour, marker, dash) per run: 10 colours up to 10 runs, else tab20's 20
    palette = [f"C{k}" for k in range(10)] if len(runs) <= 10 else [plt.get_cmap("tab20")(k) for k in range(20)]
    styles = {}
    for i, r in enumerate(runs):
        color, cycle = palette[i % len(palette)], i // len(palette)
        style = ("-" if cycle % 2 == 0 else "--") + "osD^v"[cycle % 5]
        styles[id(r)] = (color, style)
        label = r["config"].get("name") or r["path"].name
        ms = r["metrics"]
        for ax, (key, xlabel, logx) in zip(axs, axes_spec, strict=False):
            ev = [m for m in ms if "val_loss" in m and (key in m or m["step"] == 0)]
            xs = [m.get(key, 0) for m in ev]
            ax.plot(xs, [m["val_loss"] for m in ev], style, ms=3, color=color, label=f"{label} (val)")
            tr = [m for m in ms if "train_loss" in m and key in m]
            ax.plot([m[key] for m in tr], [m["train_loss"] for m in tr], "-", lw=0.8, alpha=0.35, color=color)
            ax.set_xlabel(xlabel)
            if logx:
                ax.set_xscale("symlog", linthresh=max(1.0, min((m[key] for m in ms if m.get(key)), default=1.0)))
        if extra:
            ev = [m for m in ms if metric in m]
            axs[len(axes_spec)].plot([m["step"] for m in ev], [m[metric] for m in ev], style, ms=3, color=color,
                                     label=label)
    for ax in axs[:len(axes_spec)]:
        ax.set_ylabel("loss (solid: validation, faint: train)")
        ax.grid(alpha=0.3)
    if extra:
        axs[len(axes_spec)].set_xlabel("step")
        axs[len(axes_spec)].set_ylabel(metric)
        axs[len(axes_spec)].grid(alpha=0.3)
    if metric == "optimality_gap":
        for ax in axs[:len(axes_spec) + int(extra)]:
            ax.set_yscale("log")
    if groups:
        ax = axs[-1]
        for label, g in groups:
            b = _best(g)
            color, style = styles[id(b)]
            g = [r for r in g if _finished(r)]
            ax.plot([r["config"]["lr"] for r in g], [r["summary"]["final_val_loss"] for r in g], style, ms=4,
                    color=color, label=label)
            ax.plot([b["config"]["lr"]], [b["summary"]["final_val_loss"]], "*", ms=10, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log; star: best of the sweep)")
        losses = [r["summary"]["final_val_loss"] for _, g in groups for r in g if _finished(r)]
        log_y = min(losses) > 0 and max(losses) > 5 * min(losses)  # a diverged run would squash the rest
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel("final validation loss" + (" (log)" if log_y else ""))
        ax.set_title("learning-rate sweeps")
        ax.grid(alpha=0.3)
    task = runs[0]["config"].get("task", "")
    axs[0].set_title(f"{task}: validation loss vs step" + (" (best lr of each sweep)" if groups else ""))
    if len(runs) <= 8:
        axs[0].legend(fontsize=8)
    else:  # many runs: one legend beside the panels instead of over the curves
        handles, labels = axs[0].get_legend_handles_labels()
        fig.legend(handles, [lb.removesuffix(" (val)") for lb in labels], loc="center left",
                   bbox_to_anchor=(1.0, 0.5), fontsize=7, ncol=1 + len(runs) // 25, frameon=False)
    titles = {"wall_time_s": "vs wall-clock time", "bytes_sent": "vs bytes sent (log)",
              "sim_time_s": "vs simulated time"}
    for ax, (key, _, _) in zip(axs, axes_spec, strict=False):
        if key in titles:
            ax.set_title(f"validation loss {titles[key]}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def report(dirs: list[str | Path], plot_path: str | Path | None = None, make_plot: bool = True
           ) -> tuple[str, Path | None]:
    """Load run directories; return the markdown table and the path of the written plot."""
    # a shell glob over a compare directory (``runs/demo/*``) also matches its report.png: skip plain files
    paths = [Path(d) for d in dirs]
    runs = [load_run(d) for d in paths if not d.is_file()]
    if not runs:
        raise ConfigError(f"no run directories among {', '.join(map(str, paths))}")
    md = table(runs)
    sweep_md = sweep_table(runs)
    if sweep_md:
        md += ("\n\nLearning-rate sweeps (runs that differ only in lr; best = lowest final validation loss):\n\n"
               + sweep_md)
    front_md = frontier.table(runs)
    if front_md:
        md += ("\n\nLoss, bytes and simulated time against uncompressed ddp (seeds merged, outer learning rates "
               "tuned; a front holds the configurations no other one beats on every column):\n\n" + front_md)
    out = None
    if make_plot:
        if plot_path is None:  # the single run's directory, else the runs' common parent, else here
            parents = {r["path"].resolve().parent for r in runs}
            plot_path = (runs[0]["path"] if len(runs) == 1 else parents.pop() if len(parents) == 1
                         else Path.cwd()) / "report.png"
        out = plot(runs, plot_path)
        fp = frontier.plot(runs, Path(out).with_name(Path(out).stem + "-frontier.png")) if front_md else None
        if fp is not None:
            md += f"\n\nloss-vs-bytes plot: {fp}"
    return md, out


# --- time-based analysis of run directories (the async benchmarks) ----------------------------------------

def time_to_target(run: str, target: float) -> float | None:
    """Simulated seconds of the first evaluation of run directory ``run`` at or below validation loss ``target``
    (no interpolation: a synchronous local method's evaluated model only changes at its syncs, so the answer
    is late by at most one evaluation period); None when no evaluation reaches it."""
    return next((m.get("sim_time_s", 0.0) for m in load_run(run)["metrics"]
                 if "val_loss" in m and m["val_loss"] <= target), None)


def loss_at_time(run: str, seconds: float) -> float | None:
    """Validation loss of run directory ``run`` at simulated time ``seconds``, interpolated linearly between
    evaluations; None outside the evaluated range."""
    ev = [(m.get("sim_time_s", 0.0), m["val_loss"]) for m in load_run(run)["metrics"] if "val_loss" in m]
    for (t0, l0), (t1, l1) in zip(ev, ev[1:], strict=False):
        if t0 <= seconds <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return None


def sync_times_with_slowdowns(run: str, slow_prob: float, slow_factor: float, seed: int = 0) -> list[tuple]:
    """(step, simulated seconds, val loss) of a synchronous local-update run directory (``diloco``,
    ``localsgd``: rounds of ``sync_every`` steps) re-timed as if each local step of each worker had straggled
    as in ``async-diloco``'s ``slow_prob``/``slow_factor`` (the same seeded draws, :class:`EventClock`).
    Slowdowns do not change a synchronous run's arithmetic, only its clock: within a round every worker's
    clock advances by its own step times, the run's time is the slowest clock, and each sync adds the run's
    own measured communication time per sync."""
    from .strategies.clock import EventClock

    r = load_run(run)
    c = r["config"]
    h, steps = c["strategy_args"]["sync_every"], c["steps"]
    seconds = [c["step_time"] * v for v in c["worker_speeds"]]
    clock = EventClock("sync", seconds, slow_prob, slow_factor, seed)
    comm = (r["summary"]["sim_time_s"] - steps * max(seconds)) / (steps // h)
    evals = {m["step"]: m["val_loss"] for m in r["metrics"] if "val_loss" in m}
    out, start, clocks = [], 0.0, [0.0] * len(seconds)
    for k in range(1, steps + 1):
        clocks = [t + clock.step_time(i, k) for i, t in enumerate(clocks)]
        now = start + max(clocks)
        if k % h == 0:
            start, clocks = now + comm, [0.0] * len(seconds)
            now = start
        if k in evals:
            out.append((k, now, evals[k]))
    return out
