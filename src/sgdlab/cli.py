"""The ``sgdlab`` command line. Every command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

from . import __version__, strategies
from .config import Config, describe
from .distributed.group import WorkerLostError, torchrun_env
from .errors import DivergenceError, SgdlabError
from .exchange import PRECISIONS
from .privacy.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT
from .privacy.dpsgd import CLIPPINGS, GRAD_SAMPLES
from .privacy.options import DPOptions
from .runner.rundir import AUTO, check_resume_config

# Config fields with a flag of their own (batch_size → --batch-size); every other one is set with --set.
# Their help is the field's description and default (sgdlab.config.describe), the one source of both.
FLAG_FIELDS = ("task", "optimizer", "lr", "steps", "batch_size", "seed", "eval_every", "log_every",
               "checkpoint_every", "schedule", "warmup_steps", "grad_clip", "dp", "strategy", "compress", "aggregate",
               "byzantine", "pre_aggregate", "workers", "backend",
               "data_split", "network", "worker_speeds", "step_time", "timeout", "data", "device", "name",
               "tensorboard")
# Flags of the run command that are not Config fields (a strategy option never takes their names).
_OWN_FLAGS = ("config", "out", "set", "resume", "overwrite", "progress", "stop_at", "preset", "only")
# What a strategy option means, where its Options field has no "help" metadata (its default and the
# strategies that take it come from the strategy registry).
STRATEGY_OPTION_HELP = {
    "sync_every": "inner steps between syncs (H)",
    "outer_optimizer": "outer optimizer name (sgd: Nesterov momentum 0.9 unless outer_args say otherwise)",
    "outer_lr": "outer learning rate",
    "fragments": "number of fragments P",
    "overlap": "inner steps a fragment exchange overlaps (tau)",
    "mix_alpha": "weight of the local fragment when merging",
    "precision": f"precision of exchanged tensors: {', '.join(PRECISIONS)}",
    "lr_scaling": "inner LR scaling: none, linear (x N) or sqrt (x sqrt N)",
}
_ACCOUNTANT_HELP = {"rdp": "Renyi DP, dp-accounting's default orders", "pld": "privacy-loss distributions"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(tp: Any) -> Any:
    """int, float, str, bool (a switch) or "floats" (a comma-separated list) for a field's type; None if no
    flag fits."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) else [tp]
    t = args[0] if len(args) == 1 else None
    if typing.get_origin(t) is list:
        return "floats"
    return t if t in (int, float, str, bool) else None


def _dp_help() -> str:
    """--dp's grammar, allowed values and defaults, read from DPOptions and the privacy modules."""
    d = {f.name: f.default for f in dataclasses.fields(DPOptions)}
    client = "/".join(e.name for e in strategies.registry if e.obj.supports_client_dp)
    return (f"{Config.__dataclass_fields__['dp'].metadata['help']}. DP-SGD: noise=SIGMA,clip=C[,delta=D]"
            f"[,accountant={'|'.join(ACCOUNTANTS)}][,clipping={'|'.join(CLIPPINGS)}][,max_physical_batch=B]"
            f"[,grad_sample={'|'.join(GRAD_SAMPLES)}], or target_epsilon=E,clip=C,delta=D (calibrates SIGMA); "
            "--batch-size is then the expected Poisson batch; defaults "
            + ", ".join(f"{k}={d[k]}" for k in ("delta", "accountant", "clipping", "max_physical_batch", "grad_sample"))
            + f". Add unit=client[,participation=P] (default P={d['participation']:g}) for client-level DP of "
            f"{client} (each worker's round update clipped to C); default: off")


def _run_flags() -> list[tuple[str, str, Any, str]]:
    hints = typing.get_type_hints(Config)
    return [(_flag(n), n, _flag_type(hints[n]), _dp_help() if n == "dp" else describe(n)) for n in FLAG_FIELDS]


def _strategy_flags() -> list[tuple[str, str, Any, str]]:
    """One flag per scalar option of the registered strategies: its description, which strategies take
    it and their defaults."""
    taken = {f.name for f in dataclasses.fields(Config)} | set(_OWN_FLAGS)
    found: dict[str, tuple[Any, str, list[tuple[str, Any]]]] = {}
    for e in strategies.registry:
        hints = typing.get_type_hints(e.obj.Options)
        for f in dataclasses.fields(e.obj.Options):
            tp = _flag_type(hints[f.name])
            if tp in (None, bool, "floats") or f.name in taken:
                continue
            help_ = f.metadata.get("help") or STRATEGY_OPTION_HELP.get(f.name, f.name.replace("_", " "))
            found.setdefault(f.name, (tp, help_, []))[2].append((e.name, f.default))
    flags = []
    for key, (tp, help_, where) in found.items():
        names = ", ".join(n for n, _ in where)
        if len({repr(d) for _, d in where}) == 1:
            tail = f"{names}; default {where[0][1]}"
        else:
            tail = "; ".join(f"{n}: default {d}" for n, d in where)
        flags.append((_flag(key), key, tp, f"{help_} ({tail})"))
    return flags


# Flag → Config field, for flags that map one to one.
RUN_FLAGS: list[tuple[str, str, Any, str]] = _run_flags()
# Flag → key of strategy_args (each strategy accepts the ones its options define).
STRATEGY_FLAGS: list[tuple[str, str, Any, str]] = _strategy_flags()


def _bad_resume(value: str) -> Any:
    raise argparse.ArgumentTypeError(f"--resume takes no value or {AUTO!r}, got {value!r}")


def _config_default(name: str) -> Any:
    return Config.__dataclass_fields__[name].default


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    for flag, dest, typ, help_ in RUN_FLAGS:
        if typ is bool:
            p.add_argument(flag, dest=dest, action="store_true", default=None, help=help_)
        else:
            p.add_argument(flag, dest=dest, type=_floats if typ == "floats" else typ, default=None, help=help_)
    g = p.add_argument_group("strategy options (also settable with --set KEY=VALUE)")
    for flag, dest, typ, help_ in STRATEGY_FLAGS:
        g.add_argument(flag, dest=f"strategy_{dest}", type=typ, default=None, help=help_, metavar=dest.upper())
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting: a config key, an optimizer hyperparameter (momentum=0.9) or a "
                        "task option (d_model=256); repeatable")


def _add_common(p: argparse.ArgumentParser, auto_resume: bool = False) -> None:
    if auto_resume:  # run: --resume or --resume auto
        p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, AUTO], metavar=AUTO,
                       type=lambda v: v if v == AUTO else _bad_resume(v),
                       help="continue the run in --out from its checkpoint; --resume auto: continue it if --out "
                            "holds this configuration's run with a checkpoint, else start it (for torchrun "
                            "--max-restarts: a restarted worker continues from the newest common checkpoint)")
    else:
        p.add_argument("--resume", action="store_true", help="continue the run(s) in --out from the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (deletes its config, metrics, summary, checkpoint)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show the progress bar (default: only on a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sgdlab", description="Train neural networks with stochastic-gradient methods and compare them: "
        "loss, time and optimizer memory, written to a run directory and plotted.",
        epilog="Examples:\n  sgdlab run --task digits --optimizer sgd --lr 0.1 --set momentum=0.9\n"
               "  sgdlab compare --preset demo --out runs/demo\n  sgdlab report runs/demo/*\n"
               "  sgdlab frontier --scale cpu --network cross-region --out runs/frontier\n"
               "  sgdlab list optimizers\n"
               "  sgdlab run --task digits --dp noise=1.0,clip=1.0   # DP-SGD\n"
               "  sgdlab dp-epsilon --noise 1.5 --sample-rate 0.04 --steps 2250 --delta 1e-5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"sgdlab {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="train one configuration",
                       description="Train one configuration. Settings come from defaults, then --config FILE "
                                   "(TOML), then flags, then --set (later wins). Writes config.json, "
                                   "metrics.jsonl, summary.json and checkpoint.pt into --out.")
    p.add_argument("--config", type=Path, help="TOML file with settings (flags override it)")
    p.add_argument("--out", type=str, help=describe("out"))
    _add_run_flags(p)
    _add_common(p, auto_resume=True)
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP steps leaving a checkpoint (continue later with --resume)")

    p = sub.add_parser("compare", help="run several configurations and report them",
                       description="Run a preset (`sgdlab list presets`) or several TOML config files one "
                                   "after another into --out/<name>, then print the table and write "
                                   "--out/report.png. Flags and --set apply to every run.")
    p.add_argument("configs", nargs="*", type=Path, help="TOML config files (one run each)")
    p.add_argument("--preset", help="a named set of runs (see `sgdlab list presets`)")
    p.add_argument("--out", type=str, default=None, help="directory for the runs; default runs/<preset>")
    p.add_argument("--only", metavar="PATTERNS", default=None,
                   help="train only the runs whose names match one of these comma-separated shell patterns "
                        "(e.g. 'muon-*,adamw-x3'); the report still includes the other runs already in --out")
    _add_run_flags(p)
    _add_common(p)

    p = sub.add_parser("report", help="table and plot of finished runs")
    p.add_argument("dirs", nargs="+", type=Path, help="run directories")
    p.add_argument("--plot", type=Path, default=None,
                   help="where to write the PNG; default: the runs' common parent (or the single run's "
                        "directory), else ./report.png")
    p.add_argument("--no-plot", action="store_true", help="print the table only")

    p = sub.add_parser("list", help="list tasks, optimizers, strategies, exchange stages, presets or settings")
    p.add_argument("what", nargs="?", default="all", choices=["all", "tasks", "optimizers", "strategies",
                                                              "compressors", "feedback", "aggregators", "attacks",
                                                              "presets", "settings"])
    p.add_argument("-v", "--verbose", action="store_true", help="also show options and their defaults")

    p = sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    b = bsub.add_parser("loop", help="runner throughput vs a bare PyTorch loop (same model, batch, optimizer)")
    b.add_argument("--task", default=_config_default("task"), help=describe("task"))
    b.add_argument("--optimizer", default=_config_default("optimizer"), help=describe("optimizer"))
    b.add_argument("--batch-size", type=int, default=_config_default("batch_size"), help=describe("batch_size"))
    b.add_argument("--steps", type=int, default=60, help="timed steps per repetition")
    b.add_argument("--repeats", type=int, default=5, help="alternating repetitions of each loop")
    b.add_argument("--device", default=_config_default("device"), help=describe("device"))
    b.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="task option or optimizer hyperparameter, as for `sgdlab run`")
    from .bench import compress as bench_compress
    from .bench import ddp as bench_ddp
    from .bench import dp as bench_dp
    from .bench import optim as bench_optim

    bench_optim.add_arguments(bsub.add_parser(
        "optim", help="optimizer step time, state bytes/param and bandwidth vs fused AdamW and pytorch_optimizer"))

    bench_ddp.add_arguments(bsub.add_parser("ddp", help="torch-backend ddp vs DistributedDataParallel (torchrun)"))
    bench_dp.add_arguments(bsub.add_parser(
        "dp", help="DP-SGD step time: non-private vs sgdlab vs Opacus 1.6's modes (digits CNN, charlm)"))
    bench_compress.add_arguments(bsub.add_parser(
        "compress", help="compressor encode+decode time per step vs a charlm step and fp32, payload bytes"))
    importlib.import_module(".bench.aggregate", __package__).add_arguments(bsub.add_parser(
        "aggregate", help="robust aggregator / pre-aggregator time per round at n workers, d values, vs mean"))
    importlib.import_module(".bench.claims_runs", __package__).add_arguments(bsub.add_parser(
        "claims", help="optimizer claims (issue 16): SAM/SAF sharpness, zeroth-order memory, preconditioned "
                       "methods vs AdamW: train the runs, measure, report"))

    importlib.import_module(".frontier", __package__).add_arguments(sub.add_parser(
        "frontier", help="loss-bytes-time Pareto front of ddp and local methods x H x precision (tuned outer lr)",
        description="Train ddp (uncompressed and compressed) and a grid of local methods x sync period H x "
                    "exchange precision x outer learning rate at one token budget, step time and simulated "
                    "network, then report each configuration's final validation loss, bytes per worker and "
                    "simulated time against ddp, the Pareto front, a takeaway line, and a loss-vs-bytes plot "
                    "with a ±1% band around ddp (--out/report-frontier.png). Resumable (--resume) and partial "
                    "(--only) like compare."))
    _add_dp_commands(sub)
    asub = sub.add_parser("attack", help="gradient leakage: rebuild a batch from its shared update").add_subparsers(
        dest="attack", metavar="ATTACK")
    importlib.import_module(".leakage.dlg", __package__).add_arguments(asub.add_parser(
        "dlg", help="DLG/iDLG against a digits or charlm worker's update, with defences"))
    importlib.import_module(".privacy.audit", __package__).add_arguments(sub.add_parser(
        "audit", help="empirical privacy audit: canary runs, membership inference, a lower bound on epsilon"))
    return ap


def _add_dp_commands(sub: Any) -> None:
    acc_help = (" or ".join(f"{a} ({_ACCOUNTANT_HELP[a]})" if a in _ACCOUNTANT_HELP else a for a in ACCOUNTANTS)
                + f"; default {DEFAULT_ACCOUNTANT}")
    p = sub.add_parser("dp-epsilon", help="privacy spent (epsilon) by DP-SGD with a given noise multiplier",
                       description="Print the epsilon of STEPS Poisson-subsampled Gaussian steps (DP-SGD) with "
                                   "noise multiplier SIGMA and sample rate Q (expected batch / dataset size) "
                                   "at DELTA, computed with dp-accounting.")
    p.add_argument("--noise", type=float, required=True, metavar="SIGMA", help="noise multiplier sigma (> 0)")
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q", help="sampling probability, 0 < Q <= 1")
    p.add_argument("--steps", type=int, required=True, metavar="T", help="number of steps (>= 1)")
    p.add_argument("--delta", type=float, required=True, metavar="D", help="delta, 0 < D < 1 (below 1/N)")
    p.add_argument("--accountant", default=DEFAULT_ACCOUNTANT, help=acc_help)

    p = sub.add_parser("dp-noise", help="noise multiplier that reaches a target epsilon",
                       description="Print the smallest noise multiplier (to within 0.001, rounded up) for which "
                                   "STEPS DP-SGD steps at sample rate Q spend at most epsilon E at DELTA.")
    p.add_argument("--target-epsilon", type=float, required=True, metavar="E", help="target epsilon (> 0)")
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q", help="sampling probability, 0 < Q <= 1")
    p.add_argument("--steps", type=int, required=True, metavar="T", help="number of steps (>= 1)")
    p.add_argument("--delta", type=float, required=True, metavar="D", help="delta, 0 < D < 1 (below 1/N)")
    p.add_argument("--accountant", default=DEFAULT_ACCOUNTANT, help=acc_help)


def config_from_args(args: argparse.Namespace, base: Any = None, sets: bool = True):
    from .config import Config

    cfg = base if base is not None else Config()
    given = {dest: getattr(args, dest) for _, dest, _, _ in RUN_FLAGS if getattr(args, dest) is not None}
    cfg = cfg.replace(**given)
    strategy_given = {k: getattr(args, f"strategy_{k}") for _, k, _, _ in STRATEGY_FLAGS
                      if getattr(args, f"strategy_{k}") is not None}
    if strategy_given:
        cfg = cfg.replace(strategy_args={**cfg.strategy_args, **strategy_given})
    for s in args.sets if sets else ():
        cfg = cfg.set(s)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from .config import Config
    from .runner import Trainer

    saved = None
    if args.config:
        base = Config.from_toml(args.config)
    elif args.resume is True and args.out and (Path(args.out) / "config.json").is_file():
        base = saved = Config.from_dict(_load_json(Path(args.out) / "config.json"), f"key in {args.out}/config.json:")
    else:
        base = Config()
    if args.resume and not args.out and not base.out:
        raise SgdlabError(f"--resume{'' if args.resume is True else ' ' + args.resume} needs --out DIR (the run "
                          "directory to continue)")
    if saved is not None:  # the saved run's options belong to its task, optimizer and strategy: those stay
        check_resume_config(saved, config_from_args(args, saved, sets=False), keys=("task", "optimizer", "strategy"))
        for s in args.sets:
            key = s.partition("=")[0].strip()
            if key in ("task", "optimizer", "strategy"):
                check_resume_config(saved, saved.set(s), keys=(key,))
    cfg = config_from_args(args, base)
    if args.out:
        cfg = cfg.replace(out=args.out)
    if args.stop_at is not None and args.stop_at < 1:
        raise SgdlabError(f"--stop-at={args.stop_at} is out of range; allowed: --stop-at >= 1")
    res = Trainer(cfg, progress=args.progress, handle_signals=True).run(
        resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    s = res.summary
    if not s:  # a torch-backend rank other than 0: rank 0 reports
        return 0
    metric = s["metric"]
    extra = "" if metric == "val_loss" else f", {metric} {s.get(metric)}"
    print(f"{s['status']}: {s['steps']}/{s['steps_planned']} steps, final val loss "
          f"{_num(s['final_val_loss'])}{extra}, {s['wall_time_s']:.1f} s of training → {res.out}")
    if s["status"] == "stopped":
        print(f"continue with: sgdlab run --out {res.out} --resume")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import presets
    from .config import Config
    from .report import report
    from .runset import is_lead, run_set

    if bool(args.preset) == bool(args.configs):
        raise SgdlabError("compare needs either --preset NAME or one or more config files (not both); "
                          f"presets: {', '.join(presets.registry.names())}")
    if args.preset:
        configs = presets.registry.get(args.preset)()
        out = Path(args.out or Path("runs") / args.preset)
    else:
        configs = [Config.from_toml(p) for p in args.configs]
        configs = [c if c.name else c.replace(name=p.stem) for c, p in zip(configs, args.configs, strict=True)]
        out = Path(args.out or "runs/compare")
    configs = [config_from_args(args, c) for c in configs]
    dirs, diverged = run_set(configs, out, only=args.only, resume=args.resume, overwrite=args.overwrite,
                             progress=args.progress)
    if not is_lead():  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    md, png = report(dirs, out / "report.png")
    print(md)
    print(f"\nplot: {png}")
    if diverged:
        print(f"diverged (status 'diverged' in the table, left out of the sweep summary): {', '.join(diverged)}",
              file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    md, png = report(args.dirs, args.plot, make_plot=not args.no_plot)
    print(md)
    if png:
        print(f"\nplot: {png}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import exchange, optim, presets, tasks

    sections = {"tasks": tasks.registry, "optimizers": optim.registry, "strategies": strategies.registry,
                "compressors": exchange.compressors, "feedback": exchange.feedback,
                "aggregators": exchange.aggregators, "pre-aggregators (--pre-aggregate)": exchange.pre_aggregators,
                "attacks": exchange.attacks, "presets": presets.registry}
    with_options = ("tasks", "strategies", "compressors", "feedback", "aggregators",
                    "pre-aggregators (--pre-aggregate)", "attacks")
    for what, reg in sections.items():
        also = args.what == "aggregators" and what.startswith("pre-aggregators")  # listed with the aggregators
        if args.what not in ("all", what) and not also:
            continue
        if args.what == "all" or args.what == "aggregators":
            print(f"{what}:")
        if not reg.names():
            print("  (none registered)")
            continue
        width = max(len(n) for n in reg.names())
        for e in reg:
            print(f"  {e.name:<{width}}  {e.description}")
            if args.verbose and what in with_options:
                opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(e.obj.Options))
                print(f"  {'':<{width}}  options: {opts or '(none)'}")
            if args.verbose and what == "optimizers":
                hp = ", ".join(f"{k}={v!r}" for k, v in optim.hyperparameters(e.name).items())
                print(f"  {'':<{width}}  hyperparameters: {hp}")
    if args.what == "settings" or (args.what == "all" and args.verbose):
        if args.what == "all":
            print("settings (config keys; --set KEY=VALUE):")
        names = [f.name for f in dataclasses.fields(Config)]
        width = max(map(len, names))
        for name in names:
            print(f"  {name:<{width}}  {describe(name)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    modules = {"loop": "loop", "ddp": "ddp", "optim": "optim", "dp": "dp", "compress": "compress",
               "aggregate": "aggregate", "claims": "claims_runs"}
    if args.bench not in modules:
        raise SgdlabError(f"bench needs a benchmark name; available: {', '.join(modules)}")
    return importlib.import_module(f".bench.{modules[args.bench]}", __package__).main(args)


def cmd_attack(args: argparse.Namespace) -> int:
    if args.attack != "dlg":
        raise SgdlabError("attack needs an attack name; available: dlg")
    return importlib.import_module(".leakage.dlg", __package__).main(args)


def cmd_dp_epsilon(args: argparse.Namespace) -> int:
    from .privacy import accounting

    print(f"{accounting.epsilon(args.noise, args.sample_rate, args.steps, args.delta, args.accountant):.6g}")
    return 0


def cmd_dp_noise(args: argparse.Namespace) -> int:
    from .privacy import accounting

    sigma = accounting.noise_multiplier(args.target_epsilon, args.sample_rate, args.steps, args.delta,
                                        args.accountant)
    print(f"{sigma:.6g}")
    return 0


def _load_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SgdlabError(f"cannot read {path}: {e}") from None


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and torchrun_env() is not None:
        # A torchrun worker whose work is done and saved: leave without interpreter finalisation, where gloo's
        # worker threads can still abort the process (SIGABRT) and make torchrun report a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"sgdlab: warning: {message}", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    commands = {"run": cmd_run, "compare": cmd_compare, "report": cmd_report, "list": cmd_list,
                "bench": cmd_bench, "dp-epsilon": cmd_dp_epsilon, "dp-noise": cmd_dp_noise, "attack": cmd_attack,
                "audit": lambda a: importlib.import_module(".privacy.audit", __package__).main(a),
                "frontier": lambda a: importlib.import_module(".frontier", __package__).main(a)}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return commands[args.command](args)
    except (DivergenceError, WorkerLostError) as e:
        print(f"sgdlab: error: {e}", file=sys.stderr)
        return 1
    except SgdlabError as e:
        print(f"sgdlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sgdlab: interrupted", file=sys.stderr)
        return 130
