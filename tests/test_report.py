"""The learning-rate sweep summary of ``sgdlab report`` / ``compare``."""

from pathlib import Path

from sgdlab.report import sweep_table


def _run(name, optimizer, lr, loss, status="completed", **extra):
    config = {"name": name, "optimizer": optimizer, "lr": lr, "task": "charlm", "steps": 10, "out": f"runs/{name}",
              "optimizer_args": {}, **extra}
    summary = {"final_val_loss": loss, "optimizer_state_bytes": 2**20, "metric": "val_loss", "status": status}
    return {"config": config, "summary": summary, "path": Path(name), "metrics": []}


def test_sweep_rows_best_lr_default_and_edge():
    runs = [_run("muon-x0.3", "muon", 0.006, 2.5), _run("muon-x1", "muon", 0.02, 2.1),
            _run("muon-x3", "muon", 0.06, 2.3),
            _run("adamw-x0.3", "adamw", 3e-4, 2.9), _run("adamw-x1", "adamw", 1e-3, 2.6),
            _run("adamw-x3", "adamw", 3e-3, 2.2),
            _run("lonely", "sgd", 0.1, 1.0)]  # a single run is no sweep
    lines = sweep_table(runs).splitlines()
    assert len(lines) == 4  # header, rule, two sweeps
    muon, adamw = lines[2], lines[3]  # sorted by best loss
    cells = [c.strip() for c in muon.strip("|").split("|")]
    assert cells[:5] == ["muon", "muon", "0.006, 0.02, 0.06", "0.02", "2.1000"]
    assert cells[6] == "2.1000 (0.02)" and cells[7] == "no"
    cells = [c.strip() for c in adamw.strip("|").split("|")]
    assert cells[0] == "adamw" and cells[3] == "0.003" and cells[6] == "2.6000 (0.001)" and cells[7] == "yes"


def test_runs_differing_in_more_than_lr_are_separate_sweeps():
    runs = [_run("a-lr1", "sgd", 1.0, 1.0), _run("a-lr2", "sgd", 2.0, 0.5),
            _run("b-lr1", "sgd", 1.0, 0.9, steps=20), _run("b-lr2", "sgd", 2.0, 0.8, steps=20)]
    lines = sweep_table(runs).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["a", "b"]
    assert sweep_table(runs[:1] + runs[2:3]) is None


def test_a_diverged_run_is_tried_but_never_best():
    # a diverged run keeps the loss of its last evaluation before the NaN, which may look good
    runs = [_run("sgd-x1", "sgd", 0.1, 2.0), _run("sgd-x3", "sgd", 0.3, 1.5),
            _run("sgd-x10", "sgd", 1.0, 0.5, status="diverged"), _run("sgd-x30", "sgd", 3.0, float("nan"),
                                                                   status="diverged")]
    cells = [c.strip() for c in sweep_table(runs).splitlines()[2].strip("|").split("|")]
    assert cells[2] == "0.1, 0.3, 1 (diverged), 3 (diverged)"
    assert cells[3] == "0.3" and cells[4] == "1.5000" and cells[7] == "no"
    assert sweep_table([runs[2], runs[3]]) is None  # nothing finished: no best to show
