"""Issue 12: wrong-typed hyperparameters, TensorBoard event files, and the small resume/strategy mistakes —
each one clear line (exit 2), never a traceback or a silent wrong run."""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sgdlab import Config, optim, run
from sgdlab.cli import main
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- 6: hyperparameter types, every registered optimizer --------------------------------------------

def _wrong_values(default):
    """Values of the wrong type for a hyperparameter whose default is ``default``."""
    if isinstance(default, bool):
        return ["yes", 1]
    if isinstance(default, (int, float)):
        return ["abc", True]
    if isinstance(default, tuple):
        return [0.5, [0.5] * (len(default) + 1), ["a"] * len(default)]
    if isinstance(default, str):
        return [1.5, True]
    return [{"a": 1}]  # a None default: still not a table


def _cases():
    for name in optim.registry.names():
        for key, default in optim.hyperparameters(name).items():
            if key == "lr":
                continue
            for bad in _wrong_values(default):
                yield pytest.param(name, key, bad, id=f"{name}-{key}-{bad!r}")


@pytest.mark.parametrize("name,key,bad", list(_cases()))
def test_every_hyperparameter_of_every_optimizer_refuses_a_wrong_type(name, key, bad):
    params = [torch.zeros(3, 3, requires_grad=True)]
    with pytest.raises(ConfigError) as e:
        optim.create(name, params, **{key: bad})
    msg = str(e.value)
    assert "\n" not in msg and key in msg and repr(name) in msg, msg
    with pytest.raises(ConfigError, match=key):
        Config(task="quadratic", optimizer=name, optimizer_args={key: bad}).validate()


def test_wrong_types_are_type_errors_and_right_ones_still_work():
    params = [torch.zeros(3, 3, requires_grad=True)]
    with pytest.raises(TypeError, match=r"betas of optimizer 'adamw' must be a list of 2 numbers, got 0.9"):
        optim.create("adamw", params, betas=0.9)
    with pytest.raises(TypeError, match="momentum of optimizer 'lookahead' must be a number"):
        optim.create("lookahead", params, base="sgd", momentum="fast")
    with pytest.raises(TypeError, match="k of optimizer 'lookahead' must be an integer, got 2.5"):
        optim.create("lookahead", params, k=2.5)
    # ints for floats, lists for tuples (config.json's form), strings where a string is allowed
    optim.create("sgd", params, momentum=1, weight_decay=0)
    optim.create("adamw", params, betas=[0.9, 0.95], eps=1)
    optim.create("adamp", params, compiled="group")
    # the optimizer's own value checks become one ConfigError too, already when the config is checked
    with pytest.raises(ConfigError, match="optimizer 'sgd': Invalid momentum value: -1"):
        Config(task="quadratic", optimizer="sgd", optimizer_args={"momentum": -1}).validate()


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "adamw", "--set", "betas=0.9"], "betas of optimizer 'adamw' must be a list of 2 numbers, got 0.9"),
    (["--set", "eps=abc"], "eps of optimizer 'adamw' must be a number, got 'abc'"),
    (["--optimizer", "sgd", "--set", "weight_decay=true"],
     "weight_decay of optimizer 'sgd' must be a number, got True"),
    (["--optimizer", "sgd", "--set", "momentum=true"], "momentum of optimizer 'sgd' must be a number, got True"),
    (["--optimizer", "sgd", "--set", "nesterov=1"], "nesterov of optimizer 'sgd' must be true or false, got 1"),
])
def test_cli_wrong_hyperparameter_types_are_one_line(capsys, tmp_path, argv, message):
    code, out, err = cli(capsys, "run", "--task", "quadratic", "--steps", 2, "--out", tmp_path / "r", *argv)
    assert code == 2 and err.strip() == f"sgdlab: error: hyperparameter {message}", err
    assert not (tmp_path / "r").exists()  # refused before anything was built or written


# ---- 8: TensorBoard ------------------------------------------------------------------------------------

def _tensorboard_scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_tensorboard_equals_metrics(out: Path) -> set[str]:
    """Every number of metrics.jsonl is in the event files (same name, same step, float32), and nothing else."""
    expected: dict[str, dict[int, float]] = {}
    for r in read_metrics(out / "metrics.jsonl"):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(k, {})[r["step"]] = v
    got = _tensorboard_scalars(out)
    assert set(got) == set(expected)
    for tag, by_step in expected.items():
        assert sorted(got[tag]) == sorted(by_step), tag
        for step, v in by_step.items():
            assert got[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-30), (tag, step)
    return set(expected)


def test_tensorboard_single_run_with_dp_has_the_metrics(tmp_path):
    out = tmp_path / "dp"
    run(Config(task="digits", optimizer="sgd", lr=0.5, steps=12, batch_size=32, eval_every=6, log_every=3,
               dp="noise=1.0,clip=1.0", tensorboard=True, out=str(out), device="cpu"))
    tags = assert_tensorboard_equals_metrics(out)
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "wall_time_s", "epsilon", "samples"} <= tags


def test_tensorboard_distributed_run_and_resume(tmp_path):
    out = tmp_path / "diloco"
    cfg = Config(task="quadratic", optimizer="adamw", lr=0.05, steps=20, eval_every=5, log_every=2,
                 strategy="diloco", workers=2, strategy_args={"sync_every": 4}, tensorboard=True, out=str(out),
                 device="cpu")
    run(cfg, stop_at=11)  # stopped between checkpoints: the resumed run logs steps 11.. again
    run(cfg, resume=True)
    tags = assert_tensorboard_equals_metrics(out)
    assert {"train_loss", "val_loss", "optimality_gap", "lr", "bytes_sent", "sim_time_s"} <= tags
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    run(cfg, overwrite=True)  # --overwrite replaces the event files too
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert_tensorboard_equals_metrics(out)


def test_cli_tensorboard_flag_and_a_clear_error_without_the_package(capsys, tmp_path, monkeypatch):
    code, _, err = cli(capsys, "run", "--task", "quadratic", "--optimizer", "sgd", "--lr", 0.01, "--steps", 4,
                       "--eval-every", 2, "--tensorboard", "--out", tmp_path / "r")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["tensorboard"] is True
    assert_tensorboard_equals_metrics(tmp_path / "r")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    code, _, err = cli(capsys, "run", "--task", "quadratic", "--steps", 4, "--tensorboard", "--out", tmp_path / "s")
    assert code == 2 and err.count("\n") == 1, err
    assert "needs the tensorboard package" in err and "pip install 'sgdlab[tensorboard]'" in err
    assert not (tmp_path / "s").exists()


# ---- 10: the smaller ones ------------------------------------------------------------------------------

def test_sync_every_beyond_steps_warns(tmp_path, capsys):
    cfg = Config(task="quadratic", optimizer="sgd", lr=0.01, steps=5, strategy="diloco", workers=2,
                 strategy_args={"sync_every": 8}, out=str(tmp_path / "a"), device="cpu")
    with pytest.warns(UserWarning, match=r"steps=5 < sync_every=8, so no round ends and the workers never synchro"):
        run(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(cfg.replace(steps=8, out=str(tmp_path / "b")))
    code, _, err = cli(capsys, "run", "--task", "quadratic", "--optimizer", "sgd", "--lr", 0.01, "--steps", 3,
                       "--strategy", "localsgd", "--workers", 2, "--out", tmp_path / "c")
    assert code == 0 and "sgdlab: warning: strategy 'localsgd': steps=3 < sync_every=50" in err


def test_resume_cannot_shorten_a_run(capsys, tmp_path):
    out = tmp_path / "r"
    base = ["run", "--task", "quadratic", "--optimizer", "sgd", "--lr", 0.01, "--out", out]
    assert cli(capsys, *base, "--steps", 10)[0] == 0
    code, stdout, err = cli(capsys, *base, "--steps", 5, "--resume")
    assert code == 2 and "10/5" not in stdout
    assert err.strip() == (f"sgdlab: error: cannot resume with steps=5: the run in {out} is already at step 10 "
                           "(a run is not shortened); allowed: steps >= 10")
    code, stdout, _ = cli(capsys, *base, "--steps", 10, "--resume")
    assert code == 0 and "completed: 10/10 steps" in stdout
    assert cli(capsys, *base, "--steps", 20, "--stop-at", 15, "--resume")[0] == 0
    code, _, err = cli(capsys, *base, "--steps", 20, "--stop-at", 12, "--resume")
    assert code == 2 and "stop_at=12 but the run is already at step 15" in err


@pytest.mark.parametrize("change,key,was,now", [
    (["--task", "digits"], "task", "quadratic", "digits"),
    (["--set", "task=logreg"], "task", "quadratic", "logreg"),
    (["--optimizer", "adamw"], "optimizer", "sgd", "adamw"),
    (["--strategy", "ddp"], "strategy", "single", "ddp"),
])
def test_resume_says_the_task_optimizer_strategy_cannot_change(capsys, tmp_path, change, key, was, now):
    out = tmp_path / "r"
    assert cli(capsys, "run", "--task", "quadratic", "--optimizer", "sgd", "--lr", 0.01, "--steps", 4,
               "--out", out)[0] == 0
    code, _, err = cli(capsys, "run", "--out", out, "--resume", "--steps", 8, *change)
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot change {key} when resuming (the run used {was!r}, now {now!r})" in err


def test_unknown_key_lists_each_valid_key_once(capsys):
    code, _, err = cli(capsys, "run", "--task", "quadratic", "--optimizer", "sgd", "--set", "nope=1")
    assert code == 2 and "unknown config key 'nope'" in err
    valid = err.split("Valid: ")[1].rstrip(".\n").split(", ")
    assert "lr" in valid and len(valid) == len(set(valid)), valid


@pytest.mark.parametrize("name", ["sam", "zo-sgd", "sophia-h", "xgrad"])
def test_ddp_refuses_optimizers_whose_extra_gradients_would_not_be_averaged(tmp_path, name):
    # ddp averages the ordinary backward's gradient; a second pass (SAM), a forward-only estimate (MeZO), a
    # Hessian closure (Sophia-H) or predicted weights (XGrad) would be each worker's own: replicas drift apart
    cfg = Config(task="quadratic", optimizer=name, strategy="ddp", workers=2, steps=2, out=str(tmp_path / name))
    with pytest.raises(ConfigError, match=r"strategy ddp averages the gradient of the ordinary backward only; .* "
                                          r"Use localsgd or diloco"):
        run(cfg)
    run(cfg.replace(workers=1, out=str(tmp_path / f"{name}-1")))  # one worker: nothing to drift
