"""``sgdlab bench claims``: issue 16's optimizer claims on `digits` (and `charlm` for memory); BENCHMARKS.md quotes
the output.

    OMP_NUM_THREADS=1 nice -n 10 sgdlab bench claims train [--groups sam,zo,precond] [--out runs/claims16]
    OMP_NUM_THREADS=1 nice -n 10 sgdlab bench claims hessian     # top Hessian eigenvalue of the SAM group
    OMP_NUM_THREADS=1 nice -n 10 sgdlab bench claims steptime    # SGD-m / SAM / SAF ms per step
    OMP_NUM_THREADS=1 nice -n 10 sgdlab bench claims memory      # peak allocator bytes per step
    sgdlab bench claims report                                   # the tables of BENCHMARKS.md

``train`` runs each configuration with ``sgdlab.run`` (the same as ``sgdlab run`` with the flags it prints) into
``--out/<name>`` and skips those already finished. The other commands read those runs or build the task
themselves; the measurement code is in :mod:`sgdlab.bench.claims`.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from .. import optim, tasks
from ..config import Config
from ..errors import ConfigError, DivergenceError
from ..optim import protocol
from ..runner import run
from ..runner.build import build_task
from .claims import load_run_model, peak_allocated, top_hessian_eigenvalue, training_batches, training_step_peak

ROOT = Path("runs/claims16")  # the default --out
SGDM = {"momentum": 0.9}
SEEDS = (0, 1, 2)


def configs() -> dict[str, list[dict]]:
    g: dict[str, list[dict]] = {"sam": [], "zo": [], "precond": []}
    for steps in (400, 1200):
        for seed in SEEDS:
            for name, opt, args in (("sgdm", "sgd", SGDM), ("sam", "sam", {**SGDM, "rho": 0.05}),
                                    ("saf", "saf", SGDM)):
                g["sam"].append(dict(name=f"{name}-s{steps}-seed{seed}", optimizer=opt, lr=0.1, steps=steps,
                                     seed=seed, eval_every=50, optimizer_args=args))
    for opt, lrs in (("zo-sgd", (1e-3, 3e-3, 1e-2)), ("forward-gradient", (1e-3, 3e-3, 1e-2))):
        for lr in lrs:
            g["zo"].append(dict(name=f"{opt}-lr{lr:g}", optimizer=opt, lr=lr, steps=400, seed=0, eval_every=50))
    for lr in (1e-3, 3e-3):  # ten times the steps
        g["zo"].append(dict(name=f"zo-sgd-lr{lr:g}-s4000", optimizer="zo-sgd", lr=lr, steps=4000, seed=0,
                            eval_every=500))
    for opt, lrs in (("adamw", (1e-3, 3e-3, 1e-2)), ("shampoo", (3e-3, 1e-2, 3e-2, 1e-1)), ("kron", (3e-4, 1e-3, 3e-3)),
                     ("mfac", (1e-4, 3e-4, 1e-3, 3e-3))):
        for lr in lrs:
            for seed in SEEDS:
                g["precond"].append(dict(name=f"{opt}-lr{lr:g}-seed{seed}", optimizer=opt, lr=lr, steps=400,
                                         seed=seed, eval_every=10))
    return g


def command(c: dict, root: Path = ROOT) -> str:
    sets = "".join(f" --set {k}={v}" for k, v in c.get("optimizer_args", {}).items())
    return (f"sgdlab run --task digits --optimizer {c['optimizer']} --lr {c['lr']:g} --steps {c['steps']} "
            f"--batch-size 32 --seed {c['seed']} --eval-every {c['eval_every']}{sets} --out {root / c['name']}")


def train(groups: list[str], root: Path = ROOT) -> None:
    table = configs()
    for grp in groups:
        for c in table[grp]:
            out = root / c["name"]
            print(command(c, root), flush=True)
            if (out / "summary.json").is_file():
                continue
            cfg = Config(task="digits", batch_size=32, out=str(out), name=c["name"], device="cpu",
                         **{k: v for k, v in c.items() if k != "name"})
            try:
                s = run(cfg, overwrite=True).summary
            except DivergenceError as e:
                print(f"  -> {e}", flush=True)
                continue
            print(f"  -> val loss {s['final_val_loss']:.4f} acc {s['val_accuracy']:.4f} wall {s['wall_time_s']:.1f}s",
                  flush=True)


def summary(root: Path, name: str) -> dict:
    path = root / name / "summary.json"
    if not path.is_file():  # diverged: no summary
        return {"final_val_loss": float("nan"), "val_accuracy": float("nan"), "wall_time_s": float("nan")}
    return json.loads(path.read_text())


def evals(root: Path, name: str) -> list[tuple[int, float]]:
    out = []
    for line in (root / name / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_loss" in r:
            out.append((r["step"], r["val_loss"]))
    return out


def hessian(iters: int, root: Path = ROOT) -> None:
    res = {}
    names = [c["name"] for c in configs()["sam"]]
    for name in names:
        task, model, _ = load_run_model(root / name)
        batches = training_batches(task, n_batches=5, batch_size=256, seed=0)  # 1280 of the 1438 examples
        losses = [(partial(task.loss, model, b), 1 / len(batches)) for b in batches]
        e = top_hessian_eigenvalue(losses, list(model.parameters()), iters=iters, seed=0)
        with torch.no_grad():
            train_loss = sum(float(f()) * w for f, w in losses)
        s = summary(root, name)
        res[name] = {"top_eig": e.value, "rel_change": e.rel_change, "train_loss": train_loss,
                     "val_loss": s["final_val_loss"], "val_accuracy": s["val_accuracy"]}
        print(f"{name:24s} lambda_max {e.value:9.3f} (rel change {e.rel_change:.1e})  train {train_loss:.4f}  "
              f"val {s['final_val_loss']:.4f} acc {s['val_accuracy']:.4f}", flush=True)
    (root / "hessian.json").write_text(json.dumps(res, indent=1))


def _digits(hidden: int):
    spec = Config(task="digits", device="cpu", task_args={"hidden": hidden}).spec()
    return build_task(spec)


def _stepper(task, name: str, hp: dict, batch_size: int, seed: int = 0):
    torch.manual_seed(seed)
    model = task.build_model()
    opt = optim.create(name, model.parameters(), **hp)
    need = protocol.needs(opt)
    sampler = tasks.EpochSampler(torch.arange(task.num_train), batch_size, seed)

    def step():
        ids = sampler.next()
        batch = task.get_batch(ids)
        ctx = protocol.StepContext(loss=partial(task.loss, model, batch),
                                   sampled_loss=partial(task.sampled_loss, model, batch), model=model,
                                   example_ids=ids)
        protocol.forward_backward(opt, ctx, need)
        protocol.step(opt, ctx, need)
        opt.zero_grad(set_to_none=True)

    return step


def steptime(reps: int, block: int, root: Path = ROOT) -> None:
    """Wall time per training step of SGD-m, SAM and SAF, interleaved blocks, after 7 epochs of warm-up (so
    SAF's KL term is on: its default start_epoch is 5)."""
    out = {}
    for hidden, bs in ((128, 32), (1024, 128)):
        task = _digits(hidden)
        opts = {"sgdm": ("sgd", SGDM), "sam": ("sam", {**SGDM, "rho": 0.05}), "saf": ("saf", SGDM)}
        steppers = {k: _stepper(task, n, {"lr": 0.05, **hp}, bs) for k, (n, hp) in opts.items()}
        warm = 7 * (task.num_train // bs) + 1
        for st in steppers.values():
            for _ in range(warm):
                st()
        times: dict[str, list[float]] = {k: [] for k in steppers}
        keys = list(steppers)
        for r in range(reps):
            for k in keys[r % 3:] + keys[:r % 3]:  # rotate the order
                t0 = time.perf_counter()
                for _ in range(block):
                    steppers[k]()
                times[k].append((time.perf_counter() - t0) / block * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: statistics.median([a / b for a, b in zip(times[k], times["sgdm"], strict=True)]) for k in times}
        key = f"mlp{hidden}-b{bs}"
        out[key] = {"ms_per_step": med, "ratio_to_sgdm": ratios, "all_ms": times}
        print(key, {k: f"{med[k]:.3f} ms ({ratios[k]:.2f}x)" for k in med}, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "steptime.json").write_text(json.dumps(out, indent=1))


def memory(root: Path = ROOT) -> None:
    """Peak allocator bytes of one training step per optimizer and of one no-grad forward (inference)."""
    out = {}
    setups = {"charlm-b32": (Config(task="charlm", device="cpu").spec(), 32),
              "digits-mlp1024-b1024": (Config(task="digits", device="cpu", task_args={"hidden": 1024}).spec(), 1024)}
    opts = {"sgd-m": ("sgd", {"lr": 0.01, **SGDM}), "adamw": ("adamw", {"lr": 1e-3}),
            "zo-sgd": ("zo-sgd", {"lr": 1e-4}), "forward-gradient": ("forward-gradient", {"lr": 1e-4})}
    for key, (spec, bs) in setups.items():
        task = build_task(spec)
        ids = torch.arange(bs) * (task.num_train // bs)
        batch = task.get_batch(ids)
        row, state = {}, {}
        torch.manual_seed(0)
        model = task.build_model()
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.eval()  # no dropout anyway; the training steps below use train mode
        peaks = []
        for _ in range(3):
            with torch.no_grad():
                peak, _ = peak_allocated(partial(task.loss, model, batch))
            peaks.append(peak.peak_bytes)
        row["inference (no-grad forward)"] = max(peaks)
        for label, (name, hp) in opts.items():
            torch.manual_seed(0)
            model = task.build_model()
            opt = optim.create(name, model.parameters(), **hp)
            ctx = protocol.StepContext(loss=partial(task.loss, model, batch),
                                       sampled_loss=partial(task.sampled_loss, model, batch), model=model,
                                       example_ids=ids)
            for _ in range(2):  # optimizer state allocated lazily
                training_step_peak(opt, ctx)
            row[label] = max(training_step_peak(opt, ctx).peak_bytes for _ in range(3))
            state[label] = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                               if torch.is_tensor(v))
        out[key] = {"params_bytes": params_bytes, "peak_bytes": row, "state_bytes": state}
        print(key, f"params {params_bytes / 2**20:.2f} MiB",
              {k: f"{v / 2**20:.3f} MiB" for k, v in row.items()}, "state", state, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.json").write_text(json.dumps(out, indent=1))


def _first_below(root: Path, name: str, target: float) -> int | None:
    return next((s for s, v in evals(root, name) if v <= target), None)


def report(root: Path = ROOT) -> None:
    print("## SAM / SAF vs SGD-m (mean over seeds; lambda_max: top Hessian eigenvalue of the training loss)")
    hess = json.loads((root / "hessian.json").read_text()) if (root / "hessian.json").is_file() else {}
    for steps in (400, 1200):
        for name in ("sgdm", "sam", "saf"):
            runs = [f"{name}-s{steps}-seed{s}" for s in SEEDS]
            vl = [summary(root, r)["final_val_loss"] for r in runs]
            acc = [summary(root, r)["val_accuracy"] for r in runs]
            eig = [hess[r]["top_eig"] for r in runs if r in hess]
            tl = [hess[r]["train_loss"] for r in runs if r in hess]
            print(f"| {name} | {steps} | {statistics.mean(vl):.4f} ({', '.join(f'{v:.3f}' for v in vl)}) | "
                  f"{statistics.mean(acc):.4f} | "
                  + (f"{statistics.mean(eig):.2f} ({', '.join(f'{v:.1f}' for v in eig)}) | " if eig else "- | ")
                  + (f"{statistics.mean(tl):.4f} |" if tl else "- |"))
    print("\n## zeroth order, 400 steps seed 0")
    for c in configs()["zo"]:
        s = summary(root, c["name"])
        print(f"| {c['name']} | {s['final_val_loss']:.4f} | {s['val_accuracy']:.4f} | {s.get('status')} | "
              f"{s.get('steps')} |")
    print("\n## preconditioned vs AdamW (400 steps, eval every 10; mean over seeds)")
    table = {}
    for c in configs()["precond"]:
        key = (c["optimizer"], c["lr"])
        table.setdefault(key, []).append(c["name"])
    adamw = {k: v for k, v in table.items() if k[0] == "adamw"}
    best = min(adamw, key=lambda k: statistics.mean(summary(root, r)["final_val_loss"] for r in adamw[k]))
    target_runs = adamw[best]
    targets = {r.rsplit("-seed", 1)[1]: summary(root, r)["final_val_loss"] for r in target_runs}
    print(f"target: AdamW lr {best[1]:g} final val loss per seed {targets}")
    for (opt, lr), runs in table.items():
        vl = [summary(root, r)["final_val_loss"] for r in runs]
        acc = [summary(root, r)["val_accuracy"] for r in runs]
        reach = [_first_below(root, r, targets[r.rsplit("-seed", 1)[1]]) for r in runs]
        wall = [summary(root, r)["wall_time_s"] for r in runs]
        print(f"| {opt} | {lr:g} | {statistics.mean(vl):.4f} ({', '.join(f'{v:.3f}' for v in vl)}) | "
              f"{statistics.mean(acc):.4f} | {', '.join('-' if x is None else str(x) for x in reach)} | "
              f"{statistics.median(wall):.2f} |")


COMMANDS = ("train", "hessian", "steptime", "memory", "report")


def add_arguments(p) -> None:
    p.add_argument("what", choices=COMMANDS, help="train the runs, measure the Hessian / step time / memory, "
                   "or print the tables")
    p.add_argument("--out", default=str(ROOT), help=f"directory of the runs; default {ROOT}")
    p.add_argument("--groups", default="sam,zo,precond", help="train: groups of runs (sam, zo, precond)")
    p.add_argument("--iters", type=int, default=40, help="hessian: power iterations; default 40")
    p.add_argument("--reps", type=int, default=9, help="steptime: interleaved blocks per optimizer; default 9")
    p.add_argument("--block", type=int, default=40, help="steptime: steps per block; default 40")


def main(a) -> int:
    root = Path(a.out)
    if a.what == "train":
        groups = [g for g in a.groups.split(",") if g]
        bad = [g for g in groups if g not in configs()]
        if bad or not groups:
            raise ConfigError(f"--groups {a.groups!r}: unknown {bad}; allowed: {', '.join(configs())}")
        train(groups, root)
    elif a.what == "hessian":
        hessian(a.iters, root)
    elif a.what == "steptime":
        steptime(a.reps, a.block, root)
    elif a.what == "memory":
        memory(root)
    else:
        if not root.is_dir():
            raise ConfigError(f"--out {root}: no such directory; run `sgdlab bench claims train --out {root}` first")
        report(root)
    return 0
