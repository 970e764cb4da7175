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


def _drun(name, loss, nbytes, strategy="ddp", compress=None, status="completed", lr=1e-3):
    r = _run(name, "adamw", lr, loss, status=status, strategy=strategy, workers=4, compress=compress,
             strategy_args={"precision": "fp32", "buffers": "average"})  # as config.json writes them
    r["summary"].update(bytes_sent_per_worker=nbytes, sim_time_s=1.0)
    return r


def test_frontier_table_and_plot_in_the_report(tmp_path):
    from sgdlab import frontier

    runs = [_drun("ddp", 2.00, 1e9), _drun("topk", 2.01, 1e7, compress="topk,ratio=0.01"),
            _drun("bad", 2.50, 5e7, compress="int4"), _drun("tiny", 2.30, 1e5, strategy="diloco"),
            _drun("worse-same-bytes", 2.40, 1e5, strategy="diloco", lr=2e-3),
            _drun("nan", 1.0, 1.0, status="diverged")]
    assert [p.label for p in frontier.points(runs) if p.front2] == ["tiny", "topk", "ddp"]
    md = frontier.table(runs)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| configuration")}
    assert rows["topk"][2] == "+0.50" and rows["topk"][4] == "100" and rows["topk"][8] == "yes"
    assert rows["bad"][8] == "" and rows["ddp"][4] == "1" and "nan" not in rows
    assert "at most 1% above ddp's final validation loss: topk reaches 1.005× ddp's loss" in md
    assert "with 100× fewer bytes per worker" in md
    assert frontier.plot(runs, tmp_path / "f.png").stat().st_size > 0
    # no uncompressed ddp run to compare with: nothing to report
    assert frontier.table(runs[1:]) is None and frontier.plot(runs[1:], tmp_path / "g.png") is None


def test_time_helpers_against_a_diloco_run(tmp_path):
    """time_to_target / loss_at_time read a run's evaluations; with no slowdowns, re-timing a synchronous
    local run gives its own simulated clock back at every evaluation."""
    import pytest

    from sgdlab import Config, run
    from sgdlab.report import loss_at_time, sync_times_with_slowdowns, time_to_target
    from sgdlab.runner import load_run

    out = tmp_path / "d"
    run(Config(task="digits", strategy="diloco", workers=2, steps=12, batch_size=8, eval_every=4, step_time=0.01,
               worker_speeds=[1.0, 2.0], strategy_args={"sync_every": 4}, device="cpu", out=str(out)))
    ev = [(m["step"], m["sim_time_s"], m["val_loss"]) for m in load_run(out)["metrics"] if "val_loss" in m]
    t_target = next(t for _, t, v in ev if v <= ev[1][2])
    assert time_to_target(str(out), ev[1][2]) == t_target and time_to_target(str(out), -1.0) is None
    (_, t0, l0), (_, t1, l1) = ev[1], ev[2]
    assert loss_at_time(str(out), (t0 + t1) / 2) == pytest.approx((l0 + l1) / 2)
    assert loss_at_time(str(out), t1 * 100) is None
    retimed = sync_times_with_slowdowns(str(out), 0.0, 4.0)
    assert [(k, v) for k, _, v in retimed] == [(k, v) for k, _, v in ev if k > 0]
    assert [t for _, t, _ in retimed] == pytest.approx([t for k, t, _ in ev if k > 0], rel=1e-9)
