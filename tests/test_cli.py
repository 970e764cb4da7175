import json
import subprocess
import sys

import pytest

from sgdlab.cli import main

TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "context=32",
        "--set", "max_bytes=60000", "--set", "eval_windows=8"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_version_subprocess():
    r = subprocess.run([sys.executable, "-m", "sgdlab", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "compare" in r.stdout and "report" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sgdlab", "run", "--optimizer", "nope", "--steps", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0  # one line, no traceback
    assert "unknown optimizer 'nope'" in r.stderr and "Valid: adam, adamomentum, adamp, adamw, ademamix" in r.stderr


def test_run_and_report(capsys, tmp_path):
    out = tmp_path / "r"
    code, stdout, err = cli(capsys, "run", "--task", "digits", "--optimizer", "sgd", "--lr", "0.1", "--steps", 20,
                            "--eval-every", 10, "--set", "momentum=0.9", "--out", out)
    assert code == 0, err
    assert "completed: 20/20 steps" in stdout
    assert json.loads((out / "config.json").read_text())["optimizer_args"]["momentum"] == 0.9
    code, stdout, _ = cli(capsys, "report", out)
    assert code == 0 and "| sgd | digits | single | 1 | sgd |" in stdout
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_file_then_flags_override(capsys, tmp_path):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text('task = "digits"\noptimizer = "sgd"\nlr = 0.05\nsteps = 50\n')
    code, _, err = cli(capsys, "run", "--config", cfgf, "--steps", 5, "--out", tmp_path / "r")
    assert code == 0, err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["steps"] == 5 and cfg["lr"] == 0.05


@pytest.mark.parametrize("argv,message", [
    (["--task", "charlmm"], "unknown task 'charlmm'. Did you mean 'charlm'?"),
    (["--strategy", "ddpp"], "unknown strategy 'ddpp'"),
    (["--set", "stepss=3"], "unknown config key 'stepss'. Did you mean 'steps'?"),
    (["--lr", "-1"], "lr=-1.0 is out of range; allowed: 0 <= lr"),
    (["--steps", "0"], "steps=0 is out of range; allowed: 1 <= steps"),
    (["--task", "digits", "--batch-size", "100000"], "batch_size=100000 is larger than the data"),
    (["--task", "textfile", "--data", "/nonexistent/file.txt"], "--data /nonexistent/file.txt: no such file"),
    (["--stop-at", "0"], "--stop-at=0 is out of range"),
])
def test_bad_input_is_one_clear_line(capsys, tmp_path, argv, message):
    code, _, err = cli(capsys, "run", "--out", tmp_path / "r", *argv)
    assert code == 2
    assert err.startswith("sgdlab: error: ") and message in err and err.count("\n") == 1


def test_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "f"
    f.write_text("keep me")
    code, _, err = cli(capsys, "run", "--task", "digits", "--steps", 2, "--out", f)
    assert code == 2 and "is a file, not a directory" in err
    assert f.read_text() == "keep me"


def test_stop_resume_via_cli(capsys, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--task", "charlm", "--steps", 8, "--batch-size", 4, "--eval-every", 4, "--log-every", 2, *TINY]
    assert cli(capsys, "run", *args, "--out", full)[0] == 0
    code, stdout, _ = cli(capsys, "run", *args, "--out", part, "--stop-at", 3)
    assert code == 0 and "stopped: 3/8" in stdout and "--resume" in stdout
    code, stdout, err = cli(capsys, "run", "--out", part, "--resume")
    assert code == 0, err
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["final_val_loss"] == b["final_val_loss"] and a["final_train_loss"] == b["final_train_loss"]


def test_corrupt_checkpoint_resume_cli(capsys, tmp_path):
    out = tmp_path / "r"
    assert cli(capsys, "run", "--task", "digits", "--steps", 4, "--out", out)[0] == 0
    (out / "checkpoint.pt").write_bytes(b"\x00\x01 truncated")
    code, _, err = cli(capsys, "run", "--out", out, "--resume")
    assert code == 2 and "corrupt or unreadable" in err
    assert (out / "checkpoint.pt").read_bytes() == b"\x00\x01 truncated"


def test_nan_loss_exits_with_step(capsys, tmp_path):
    out = tmp_path / "r"
    code, _, err = cli(capsys, "run", "--task", "quadratic", "--optimizer", "sgd", "--lr", 0.5, "--steps", 300,
                       "--eval-every", 2, "--log-every", 1, "--out", out)
    assert code == 1 and "training diverged" in err and "at step" in err and "last good checkpoint" in err
    assert (out / "checkpoint.pt").is_file()


def test_list(capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0
    for name in ("charlm", "textfile", "digits", "quadratic", "logreg", "rosenbrock", "sgd", "adamw", "single",
                 "demo"):
        assert name in out
    code, out, _ = cli(capsys, "list", "optimizers", "-v")
    assert "momentum=0" in out


def _digits_configs(tmp_path, runs, steps=10, eval_every=5):
    """One digits TOML file per (name, optimizer, lr)."""
    files = []
    for name, optimizer, lr in runs:
        p = tmp_path / f"{name}.toml"
        p.write_text(f'task = "digits"\noptimizer = "{optimizer}"\nlr = {lr}\nsteps = {steps}\n'
                     f'eval_every = {eval_every}\n')
        files.append(p)
    return files


def test_compare_config_files(capsys, tmp_path):
    files = _digits_configs(tmp_path, [("slow", "sgd", 0.01), ("fast", "sgd", 0.1)])
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", *files, "--out", out)
    assert code == 0, err
    assert "| slow |" in stdout and "| fast |" in stdout
    # the two differ only in lr: a sweep, summarised by its best learning rate
    assert "Learning-rate sweeps" in stdout and "| sgd | sgd | 0.01, 0.1 |" in stdout
    assert (out / "report.png").is_file() and (out / "slow" / "summary.json").is_file()
    # `sgdlab report runs/cmp/*` (the glob takes report.png too) reports the runs and skips the file
    code, stdout2, err = cli(capsys, "report", *sorted(out.iterdir()), "--no-plot")
    assert code == 0, err
    assert "| slow |" in stdout2 and "| fast |" in stdout2
    code, _, err = cli(capsys, "report", out / "report.png")
    assert code == 2 and "no run directories" in err
    # again without --resume/--overwrite: refused, runs kept
    code, _, err = cli(capsys, "compare", *files, "--out", out)
    assert code == 2 and "already holds a run" in err
    code, _, err = cli(capsys, "compare", *files, "--out", out, "--resume")
    assert code == 0 and "already completed, skipped" in err
    code, _, err = cli(capsys, "compare", "--out", out)
    assert code == 2 and "--preset NAME" in err
    code, _, err = cli(capsys, "compare", "--preset", "demoo")
    assert code == 2 and "unknown preset 'demoo'. Did you mean 'demo'?" in err


def test_report_missing_dir(capsys, tmp_path):
    code, _, err = cli(capsys, "report", tmp_path / "nothing")
    assert code == 2 and "not a run directory" in err


def test_presets_are_valid():
    from sgdlab import presets

    demo = presets.registry.get("demo")()
    assert {c.strategy for c in demo} == {"ddp", "localsgd", "diloco", "streaming-diloco"}
    assert {c.workers for c in demo} == {4} and len({(c.steps, c.batch_size) for c in demo}) == 1  # same budget
    quick = presets.registry.get("optimizers-quick")()
    assert {c.optimizer for c in quick} >= {"sgd", "adamw"}
    assert any(c.optimizer_args.get("momentum") for c in quick)
    from sgdlab import optim

    sweep = presets.registry.get("optimizers")()  # every optimizer at 0.3x-10x its default lr, same budget
    assert sorted({c.optimizer for c in sweep}) == optim.registry.names()
    free = presets.PARAMETER_FREE  # DoG, L-DoG: one run at their lr multiplier 1, no sweep
    assert len(sweep) == 4 * len(optim.registry.names()) - 3 * len(free)
    assert [c.lr for c in sweep if c.optimizer in free] == [1.0] * len(free)
    assert len({(c.task, c.steps, c.batch_size, c.schedule) for c in sweep}) == 1
    muon = sorted(c.lr for c in sweep if c.optimizer == "muon")
    assert muon == pytest.approx([0.006, 0.02, 0.06, 0.2]) and all(c.io_adamw for c in sweep if c.optimizer == "muon")
    for name in presets.registry.names():
        cfgs = presets.registry.get(name)()
        assert len({c.name for c in cfgs}) == len(cfgs)  # distinct run directories
        for c in cfgs:
            c.validate()


def test_bench_loop_smoke(capsys):
    code, out, err = cli(capsys, "bench", "loop", "--steps", 3, "--repeats", 1, "--batch-size", 4, "--device", "cpu",
                         *TINY)
    assert code == 0, err
    assert "| bare PyTorch |" in out and "| sgdlab runner (training loop) |" in out and "overhead" in out


def test_compare_only_trains_the_matching_runs_and_reports_the_others(capsys, tmp_path):
    files = _digits_configs(tmp_path, [("sgd-a", "sgd", 0.05), ("sgd-b", "sgd", 0.1), ("adam-a", "adam", 0.01)],
                            steps=4, eval_every=2)
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", *files, "--out", out, "--only", "sgd-*")
    assert code == 0, err
    assert (out / "sgd-a" / "summary.json").is_file() and not (out / "adam-a").exists()
    assert "| sgd-b |" in stdout and "| adam-a |" not in stdout
    code, stdout, err = cli(capsys, "compare", *files, "--out", out, "--only", "adam-a")
    assert code == 0, err
    assert "| sgd-a |" in stdout and "| adam-a |" in stdout  # the earlier runs are reported too
    code, _, err = cli(capsys, "compare", *files, "--out", out, "--only", "muon-*")
    assert code == 2 and "matches no run; the runs are: sgd-a, sgd-b, adam-a" in err


def test_compare_goes_on_after_a_diverging_run(capsys, tmp_path):
    files = _digits_configs(tmp_path, [("ok", "sgd", 0.1), ("boom", "sgd", 1e30), ("after", "sgd", 0.2)])
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", *files, "--out", out)
    assert code == 0, err
    assert "boom diverged" in err and "diverged (status 'diverged' in the table" in err
    assert (out / "after" / "summary.json").is_file()  # the run after the diverged one still ran
    assert "| boom |" in stdout and "diverged |" in stdout
    assert "0.1, 0.2, 1e+30 (diverged)" in stdout  # the sweep lists it, its best is a finished run


def test_compare_resume_restarts_a_run_without_checkpoint(capsys, tmp_path):
    p = tmp_path / "a.toml"
    p.write_text('task = "digits"\noptimizer = "sgd"\nsteps = 4\n')
    out = tmp_path / "cmp"
    (out / "a").mkdir(parents=True)
    (out / "a" / "config.json").write_text("{}")  # a run that died before its first checkpoint
    code, _, err = cli(capsys, "compare", p, "--out", out, "--resume")
    assert code == 0, err
    assert json.loads((out / "a" / "summary.json").read_text())["status"] == "completed"


def test_run_help_reads_defaults_from_the_config_and_the_registries():
    import dataclasses

    from sgdlab import strategies
    from sgdlab.cli import FLAG_FIELDS, build_parser
    from sgdlab.config import Config, describe
    from sgdlab.privacy import DPOptions

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    helps = {a.dest: a.help for a in run_parser._actions}
    for name in FLAG_FIELDS:
        if name != "dp":
            assert helps[name] == describe(name), name
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    assert f"default {defaults['steps']}" in helps["steps"] and f"default {defaults['task']}" in helps["task"]
    dp_defaults = {f.name: f.default for f in dataclasses.fields(DPOptions)}
    assert f"delta={dp_defaults['delta']}" in helps["dp"]
    assert f"max_physical_batch={dp_defaults['max_physical_batch']}" in helps["dp"]
    diloco = strategies.registry.get("diloco").Options()
    assert f"default {diloco.outer_lr}" in helps["strategy_outer_lr"]
    sync_every = "diloco: default 50; edit: default 50; gossip: default 1; localsgd: default 50"
    assert sync_every in helps["strategy_sync_every"]


def test_list_settings(capsys):
    from sgdlab.config import describe

    code, out, _ = cli(capsys, "list", "settings")
    assert code == 0 and describe("batch_size") in out and describe("strategy_args") in out
    code, out, _ = cli(capsys, "list", "-v")
    assert code == 0 and "settings (config keys" in out
