"""``sgdlab frontier``: the grid, seed merging and outer-lr tuning, the fronts, the takeaway, one step time per
set, named networks, and the command end to end on the tiny scale."""

import itertools
import json
from pathlib import Path

import pytest

from sgdlab import frontier, runset
from sgdlab.cli import main
from sgdlab.config import Config
from sgdlab.distributed.network import NETWORKS, NetworkModel
from sgdlab.errors import ConfigError


def _run(name, loss, nbytes, sim, strategy="diloco", seed=0, outer_lr=None, h=10, status="completed"):
    args = {"sync_every": h, **({} if outer_lr is None else {"outer_lr": outer_lr})}
    config = {"name": name, "task": "charlm", "strategy": strategy, "workers": 4, "seed": seed, "steps": 100,
              "out": f"runs/{name}", "compress": None, "strategy_args": {"precision": "fp32"} if strategy == "ddp"
              else args, "network": "cross-region"}
    summary = {"final_val_loss": loss, "bytes_sent_per_worker": nbytes, "sim_time_s": sim, "status": status}
    return {"config": config, "summary": summary, "path": Path(name), "metrics": []}


def _dominated(v, others):
    return any(all(a <= b for a, b in zip(o, v, strict=True)) and o != v for o in others)


def test_seeds_merge_outer_lrs_tune_and_fronts_match_a_brute_force_check():
    runs = [_run("ddp-s0", 2.00, 1e9, 50.0, "ddp", 0), _run("ddp-s1", 2.02, 1e9, 50.0, "ddp", 1),
            # diloco H=10 at two outer lrs and two seeds: lr 0.7 has the better mean (2.05 against 2.15)
            _run("d10-lr0.7-s0", 2.04, 1e7, 20.0, seed=0, outer_lr=0.7),
            _run("d10-lr0.7-s1", 2.06, 1e7, 20.0, seed=1, outer_lr=0.7),
            _run("d10-lr0.4-s0", 2.10, 1e7, 20.0, seed=0, outer_lr=0.4),
            _run("d10-lr0.4-s1", 2.20, 1e7, 20.0, seed=1, outer_lr=0.4),
            # fewer bytes, worse loss but slower than d10 (a loss-bytes point that time does not change)
            _run("d100-s0", 2.30, 1e6, 25.0, seed=0, h=100), _run("d100-s1", 2.30, 1e6, 25.0, seed=1, h=100),
            # more bytes and worse loss than d10, but the fastest: only on the three-way front
            _run("fast-s0", 2.50, 2e7, 10.0, strategy="localsgd"),
            _run("bad", float("nan"), 1.0, 1.0, status="diverged")]
    pts = {p.label: p for p in frontier.points(runs)}
    assert sorted(pts) == ["d10", "d100", "ddp", "fast-s0"]
    d10 = pts["d10"]
    assert d10.loss == pytest.approx(2.05) and d10.spread == pytest.approx(0.02) and d10.outer_lr == 0.7
    assert d10.outer_lrs_tried == (0.4, 0.7) and len(d10.runs) == 2
    assert pts["ddp"].loss == pytest.approx(2.01) and pts["ddp"].outer_lrs_tried == ()
    for p in pts.values():  # the fronts against a direct check of dominance
        others = [q for q in pts.values() if q is not p]
        assert p.front2 == (not _dominated((p.loss, p.nbytes), [(q.loss, q.nbytes) for q in others]))
        assert p.front3 == (not _dominated((p.loss, p.nbytes, p.sim_time),
                                           [(q.loss, q.nbytes, q.sim_time) for q in others]))
    assert [lb for lb, p in sorted(pts.items()) if p.front2] == ["d10", "d100", "ddp"]
    assert pts["fast-s0"].front3 and not pts["fast-s0"].front2
    md = frontier.table(runs)
    assert "| d10 (outer lr 0.7) | 2.0500 | 2, 0.0200 | +1.99 |" in md
    assert "network cross-region (1 Gbit/s, 30 ms)" in md
    # nothing within 1%: the takeaway names the closest, with its byte and time ratios against ddp
    assert ("no configuration within 1% of ddp; the closest, d10 (outer lr 0.7), reaches 1.020× ddp's loss "
            "(2.0500 vs 2.0100, +2.0%) with 100× fewer bytes per worker and 2.5× less simulated time.") in md


def test_takeaway_prefers_the_largest_byte_reduction_within_one_percent():
    runs = [_run("ddp", 2.00, 1e9, 50.0, "ddp"), _run("a", 2.015, 1e6, 20.0, h=10), _run("b", 2.019, 1e5, 60.0, h=20),
            _run("c", 1.90, 1e8, 30.0, h=30)]
    line = frontier.takeaway(frontier.points(runs))
    assert line.startswith("at most 1% above ddp's final validation loss: b reaches 1.010× ddp's loss")
    assert "10,000× fewer bytes per worker and 1.2× more simulated time" in line


def test_grid_same_tokens_names_and_bad_input():
    cfgs = frontier.grid("cpu")
    names = [c.name for c in cfgs]
    assert names[:3] == ["ddp", "ddp-int8", "ddp-powersgd-r4"] and len(set(names)) == len(names)
    assert "diloco-h50-int4-lr0.7" in names and "streaming-diloco-h200-fp32-lr1" in names
    assert "localsgd-h10-int4" in names and len(cfgs) == 3 + 3 * 2 * (1 + 3 + 3)
    assert len({(c.steps, c.batch_size, c.workers, c.network, c.seed) for c in cfgs}) == 1  # one budget
    d = next(c for c in cfgs if c.name == "diloco-h50-int4-lr0.7")
    assert d.compress == "int4" and d.strategy_args == {"sync_every": 50, "outer_lr": 0.7}
    s = next(c for c in cfgs if c.name == "streaming-diloco-h10-int4-lr0.4")
    assert s.compress is None and s.strategy_args["precision"] == "int4"
    for c in cfgs[:6] + cfgs[-3:]:
        c.validate()
    # the token budget sets the steps: 4 workers × batch 8 × context 128 = 4096 tokens per step
    assert frontier.grid("cpu", tokens=4096 * 300)[0].steps == 300
    two = frontier.grid("tiny", seeds=(0, 1), methods=("diloco",), compressors=())
    assert [c.name for c in two][:3] == ["ddp-s0", "diloco-h4-fp32-s0", "diloco-h4-int4-s0"]
    assert {c.seed for c in two} == {0, 1}
    for kwargs, message in [(dict(scale="huge"), "unknown frontier scale 'huge'"),
                            (dict(hs=(0,)), "sync period H=0 is out of range"),
                            (dict(methods=("gossip",)), "unknown frontier method(s) gossip"),
                            (dict(precisions=("int3",)), "unknown precision(s) int3"),
                            (dict(tokens=10), "--tokens 10 is less than one step"),
                            (dict(steps=10, tokens=10**6), "as steps or as tokens, not both")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            frontier.grid(**{"scale": "cpu", **kwargs})


def test_named_networks():
    assert NetworkModel.parse("cross-region") == NetworkModel(1e9, 0.03)
    assert NetworkModel.parse("WAN") == NetworkModel(1e8, 0.1)
    dc = NetworkModel.parse("datacenter")
    assert dc.bandwidth == 1e11 and dc.latency == pytest.approx(1e-5)
    assert NetworkModel.parse("wan").describe() == "wan (100 Mbit/s, 100 ms)"
    assert NetworkModel(2e9, 0.005).describe() == "2 Gbit/s, 5 ms"
    with pytest.raises(ConfigError, match="unknown network 'cross-regoin'. Did you mean 'cross-region'[?] Allowed: "
                       + ", ".join(NETWORKS)):
        NetworkModel.parse("cross-regoin")
    with pytest.raises(ConfigError, match="or a named network: " + ", ".join(NETWORKS)):
        NetworkModel.parse("bandwith=1G")
    assert Config(network="cross-region").spec().network == NetworkModel(1e9, 0.03)


def test_one_step_time_per_set(tmp_path, monkeypatch):
    # the real measurement: positive and finite on a tiny model
    t = runset.calibrate_step_time(Config(task="digits", batch_size=4, device="cpu"), steps=2, repeats=1)
    assert 0 < t < 5
    calls = []
    monkeypatch.setattr(runset, "calibrate_step_time", lambda cfg: calls.append(cfg.name) or 0.125)
    base = dict(task="digits", workers=2, steps=4)
    same = [Config(name="ddp", strategy="ddp", **base), Config(name="l", strategy="localsgd", **base)]
    out, line = runset.shared_step_time(same, tmp_path)
    assert [c.step_time for c in out] == [0.125, 0.125] and calls == ["ddp"] and "125.0 ms per worker step" in line
    assert json.loads((tmp_path / "step_time.json").read_text())["step_time"] == 0.125
    out, line = runset.shared_step_time(same, tmp_path)  # measured once: read back on a later call
    assert calls == ["ddp"] and out[1].step_time == 0.125 and "read from" in line
    runset.shared_step_time(same, tmp_path, reuse=False)  # --overwrite: measured again
    assert calls == ["ddp", "ddp"]
    for other in ([same[0], same[1].replace(optimizer="sgd")],  # different compute per step
                  [same[0], same[1].replace(step_time=0.5)],    # a stated step time
                  [c.replace(workers=1, strategy="single") for c in same]):  # no distributed run
        assert runset.shared_step_time(other, tmp_path / "x") == (other, None)


def test_a_stopped_run_stops_the_set(tmp_path, monkeypatch):
    started = []

    class Stopped:
        def __init__(self, cfg, **kw):
            self.cfg = cfg

        def run(self, **kw):
            started.append(self.cfg.name)
            return type("R", (), {"summary": {"status": "stopped", "steps": 3}})()

    monkeypatch.setattr("sgdlab.runner.Trainer", Stopped)
    cfgs = [Config(name=n, task="digits", workers=2, strategy="ddp", step_time=0.01) for n in ("a", "b")]
    dirs, diverged = runset.run_set(cfgs, tmp_path)
    assert started == ["a"] and diverged == []


def test_frontier_command_tiny(capsys, tmp_path):
    out = tmp_path / "f"
    args = ["frontier", "--scale", "tiny", "--steps", "8", "--methods", "diloco", "--hs", "4", "--precisions", "fp32",
            "--outer-lrs", "0.5,0.9", "--compressors", "", "--seeds", "0,1", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(args + ["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == [f"{n}-s{s}" for s, n in itertools.product((0, 1), ("ddp", "diloco-h4-fp32-lr0.5",
                                                                         "diloco-h4-fp32-lr0.9"))]
    assert main(args + ["--only", "*-s0"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ddp-s0", "diloco-h4-fp32-lr0.5-s0",
                                                                  "diloco-h4-fp32-lr0.9-s0"]
    assert main(args + ["--resume"]) == 0  # the seed-0 runs are skipped, seed 1 trains
    cap = capsys.readouterr()
    assert cap.err.count("already completed, skipped") == 3
    assert "simulated time: every run uses one step time" in cap.err
    md = (out / "report.md").read_text()
    assert "| diloco-h4-fp32 (outer lr " in md and "| 2, " in md and "0.5, 0.9 |" in md and "Takeaway (network " \
        "cross-region (1 Gbit/s, 30 ms)): " in md
    assert (out / "report-frontier.png").stat().st_size > 0
    times = {json.loads((d / "config.json").read_text())["step_time"] for d in out.iterdir() if d.is_dir()}
    assert len(times) == 1  # one step time for every run of the set
    assert main(["frontier", "--scale", "tiny", "--hs", "0", "--out", str(out)]) == 2
    assert "sync period H=0 is out of range" in capsys.readouterr().err


@pytest.mark.slow
def test_frontier_under_torchrun_trains_several_runs_in_the_same_processes(tmp_path):
    """Each run of a set makes its own process group in the same torchrun workers (a store prefix per group);
    rank 0 alone reports. The torch runs match the simulator's arithmetic (same bytes, close losses)."""
    from .test_torch_backend import torchrun

    out = tmp_path / "t"
    grid = ["--scale", "tiny", "--methods", "diloco", "--hs", "4", "--precisions", "int4", "--outer-lrs", "0.7",
            "--compressors", "", "--steps", "6", "--device", "cpu", "--no-progress", "--step-time", "0.01"]
    res = torchrun(2, "-m", "sgdlab", "frontier", *grid, "--set", "backend=torch", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("Takeaway (network cross-region") == 1  # rank 0's report only
    assert main(["frontier", *grid, "--out", str(tmp_path / "s")]) == 0
    for name in ("ddp", "diloco-h4-int4"):
        t, s = (json.loads((d / name / "summary.json").read_text()) for d in (out, tmp_path / "s"))
        assert t["status"] == "completed" and t["backend"] == "torch"
        assert t["bytes_sent_per_worker"] == s["bytes_sent_per_worker"]
        assert t["final_val_loss"] == pytest.approx(s["final_val_loss"], abs=1e-5)


def test_runs_of_different_budgets_get_separate_fronts(tmp_path):
    four = [_run("ddp", 2.0, 1e9, 50.0, "ddp"), _run("d", 2.1, 1e7, 20.0)]
    eight = [_run(n + "-8", loss, b, t, strat) for n, loss, b, t, strat in
             (("ddp", 1.9, 2e9, 60.0, "ddp"), ("d", 1.95, 2e7, 30.0, "diloco"))]
    for r in eight:
        r["config"]["workers"] = 8
    md = frontier.table(four + eight)
    assert md.count("Takeaway") == 2 and "charlm, 4 workers, 100 steps of batch None:" in md
    assert "| d-8 | 1.9500 | +2.63 |" in md  # against the 8-worker ddp, not the 4-worker one
    assert frontier.plot(four + eight, tmp_path / "p.png").stat().st_size > 0
    assert frontier.table(four[:1] + eight[1:]) is None  # no budget has both a ddp run and another one
