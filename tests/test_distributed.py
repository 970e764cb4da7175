"""Oracles for the distributed strategies: exact equivalences, analytic byte counts, the time model."""

import math
from pathlib import Path

import pytest
import torch

from sgdlab import Config, run
from sgdlab.distributed import NetworkModel
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics

BASE = dict(task="digits", optimizer="sgd", lr=0.05, steps=12, batch_size=16, eval_every=6, log_every=1,
            device="cpu", step_time=0.01)


def _run(tmp_path, name, **kw):
    cfg = Config(**{**BASE, **kw, "out": str(tmp_path / name)})
    res = run(cfg)
    ck = torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=True)
    models = [w["model"] for w in ck["workers"]]
    recs = read_metrics(Path(cfg.out) / "metrics.jsonl")
    return res.summary, models, recs


def _close(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def _losses(recs):
    return [r["train_loss"] for r in recs if "train_loss" in r]


def test_localsgd_h1_equals_ddp(tmp_path):
    _, ddp, r1 = _run(tmp_path, "ddp", strategy="ddp", workers=3)
    _, loc, r2 = _run(tmp_path, "loc", strategy="localsgd", workers=3, strategy_args={"sync_every": 1})
    for a, b in zip(ddp, loc, strict=True):
        _close(a, b)
    assert _losses(r1) == pytest.approx(_losses(r2), abs=1e-6)


def test_diloco_outer_sgd_lr1_equals_localsgd(tmp_path):
    _, loc, r1 = _run(tmp_path, "loc", strategy="localsgd", workers=3, strategy_args={"sync_every": 4})
    _, dil, r2 = _run(tmp_path, "dil", strategy="diloco", workers=3,
                      strategy_args={"sync_every": 4, "outer_lr": 1.0, "outer_args": {}})
    for a, b in zip(loc, dil, strict=True):
        _close(a, b)
    assert _losses(r1) == pytest.approx(_losses(r2), abs=1e-6)


def test_diloco_one_worker_outer_lr1_equals_single(tmp_path):
    _, single, r1 = _run(tmp_path, "single")
    _, dil, r2 = _run(tmp_path, "dil", strategy="diloco", workers=1,
                      strategy_args={"sync_every": 3, "outer_lr": 1.0, "outer_args": {}})
    _close(single[0], dil[0])
    assert _losses(r1) == pytest.approx(_losses(r2), abs=1e-6)


def test_streaming_one_fragment_no_overlap_no_mixing_equals_diloco(tmp_path):
    args = {"sync_every": 4, "outer_lr": 0.7}
    _, dil, r1 = _run(tmp_path, "dil", strategy="diloco", workers=2, optimizer="adamw", lr=1e-3, strategy_args=args)
    _, stm, r2 = _run(tmp_path, "stm", strategy="streaming-diloco", workers=2, optimizer="adamw", lr=1e-3,
                      strategy_args={**args, "fragments": 1, "overlap": 0, "mix_alpha": 0.0, "precision": "fp32"})
    for a, b in zip(dil, stm, strict=True):
        _close(a, b, atol=0)
    assert _losses(r1) == _losses(r2)


def test_streaming_fragments_are_staggered_and_overlapped(tmp_path):
    s, _, recs = _run(tmp_path, "stm", strategy="streaming-diloco", workers=2, steps=8,
                      strategy_args={"sync_every": 4, "fragments": 2, "overlap": 1, "mix_alpha": 0.5})
    p = 26122  # digits MLP parameters
    sent = [r["bytes_sent"] for r in recs if "train_loss" in r]
    # a fragment is sent every 2 steps (steps 2, 4, 6, 8); all-reduce: 2(N-1)/N = 1 x payload
    increments = [b - a for a, b in zip([0.0, *sent], sent, strict=False)]
    assert [i > 0 for i in increments] == [False, True] * 4
    assert sum(increments) == pytest.approx(2 * 4 * p)  # each parameter synced twice in 8 steps


def test_ddp_bytes_are_analytic(tmp_path):
    n, p, steps = 3, 26122, BASE["steps"]
    s, _, recs = _run(tmp_path, "ddp", strategy="ddp", workers=n)
    per_step = 2 * (n - 1) / n * 4 * p
    assert s["bytes_sent_per_worker"] == pytest.approx(per_step * steps, rel=1e-12)
    assert s["bytes_sent_total"] == pytest.approx(per_step * steps * n, rel=1e-12)
    assert recs[1]["bytes_sent"] == pytest.approx(per_step, rel=1e-12)


@pytest.mark.parametrize("strategy", ["localsgd", "diloco"])
def test_local_strategies_send_one_hth(tmp_path, strategy):
    n, p, h = 3, 26122, 4
    s, _, _ = _run(tmp_path, strategy, strategy=strategy, workers=n, strategy_args={"sync_every": h})
    ddp_per_step = 2 * (n - 1) / n * 4 * p
    assert s["bytes_sent_per_worker"] == pytest.approx(ddp_per_step * BASE["steps"] / h, rel=1e-12)


@pytest.mark.parametrize("precision,per_elem", [("bf16", 2), ("fp16", 2), ("int8", 1), ("int4", 0.5)])
def test_low_precision_bytes(tmp_path, precision, per_elem):
    n, p, h = 4, 26122, 4
    s, _, _ = _run(tmp_path, precision, strategy="diloco", workers=n,
                   strategy_args={"sync_every": h, "precision": precision})
    scales = 0 if precision in ("bf16", "fp16") else 4 * math.ceil(p / 128)
    payload = math.ceil(p * per_elem) + scales
    # low-precision payloads are averaged by a quantised reduce-scatter + all-gather: each worker sends
    # 2(N-1)/N x its payload per sync (it was (N-1) x payload while they were all-gathered)
    assert s["bytes_sent_per_worker"] == pytest.approx(2 * (n - 1) / n * payload * (BASE["steps"] // h), rel=1e-12)


def test_sim_time_waits_for_the_slowest(tmp_path):
    net = "bandwidth=1e6,latency=0.001"
    n, p = 2, 26122
    s, _, _ = _run(tmp_path, "ddp", strategy="ddp", workers=n, worker_speeds=[1.0, 3.0], network=net)
    comm = 2 * (n - 1) * 0.001 + 8 * (2 * (n - 1) / n * 4 * p) / 1e6
    # per step: the slow worker's backward half (0.015), the all-reduce, then its optimizer half (0.015)
    assert s["sim_time_s"] == pytest.approx(BASE["steps"] * (0.03 + comm), rel=1e-9)
    s, _, _ = _run(tmp_path, "loc", strategy="localsgd", workers=n, worker_speeds=[1.0, 3.0], network=net,
                   strategy_args={"sync_every": 4})
    assert s["sim_time_s"] == pytest.approx(3 * (4 * 0.03 + comm), rel=1e-9)


def test_workers_get_different_shards(tmp_path):
    s, models, _ = _run(tmp_path, "loc", strategy="localsgd", workers=2, steps=3,
                        strategy_args={"sync_every": 100}, data_split="dirichlet:0.3")
    assert not torch.equal(models[0]["net.1.weight"], models[1]["net.1.weight"])


@pytest.mark.parametrize("strategy,args", [("diloco", {"sync_every": 4}),
                                           ("streaming-diloco", {"sync_every": 4, "overlap": 1,
                                                                 "precision": "int4"})])
def test_distributed_resume_is_bit_identical(tmp_path, strategy, args):
    kw = dict(strategy=strategy, workers=2, optimizer="adamw", lr=1e-3, strategy_args=args)
    _, full, r1 = _run(tmp_path, "full", **kw)
    cfg = Config(**{**BASE, **kw, "out": str(tmp_path / "part")})
    run(cfg, stop_at=5)
    run(cfg, resume=True)
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for a, b in zip(full, [w["model"] for w in ck["workers"]], strict=True):
        _close(a, b, atol=0)
    r2 = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert _losses(r1) == _losses(r2)
    assert [r.get("bytes_sent") for r in r1] == [r.get("bytes_sent") for r in r2]
    assert [r.get("sim_time_s") for r in r1] == pytest.approx([r.get("sim_time_s") for r in r2], rel=1e-12)


@pytest.mark.parametrize("kw,pattern", [
    ({"strategy": "ddp", "workers": 0}, r"workers=0 is out of range"),
    ({"strategy": "single", "workers": 2}, r"strategy 'single' trains one worker"),
    ({"strategy": "localsgd", "workers": 2, "strategy_args": {"sync_every": 0}}, r"sync_every=0 is out of range"),
    ({"strategy": "streaming-diloco", "workers": 2, "strategy_args": {"sync_every": 10, "fragments": 3}},
     r"sync_every=10 must be divisible by fragments=3"),
    ({"strategy": "streaming-diloco", "workers": 2, "strategy_args": {"sync_every": 10, "fragments": 2,
                                                                      "overlap": 5}},
     r"overlap=5 must be smaller than sync_every/fragments=5"),
    ({"strategy": "diloco", "workers": 2, "strategy_args": {"precision": "int3"}}, r"unknown precision 'int3'"),
    ({"strategy": "diloco", "workers": 2, "strategy_args": {"outer_optimizer": "adamw",
                                                            "outer_args": {"momentum": 0.9}}},
     r"optimizer 'adamw' has no hyperparameter 'momentum'"),
    ({"strategy": "ddp", "workers": 2, "backend": "mpi"}, r"unknown backend 'mpi'"),
    ({"strategy": "ddp", "workers": 2, "worker_speeds": [1.0]}, r"worker_speeds has 1 entries"),
    ({"strategy": "ddp", "workers": 2, "network": "bandwidth=fast"}, r"cannot read bandwidth"),
    ({"strategy": "ddp", "workers": 2, "data_split": "dirichlet:0"}, r"positive concentration"),
])
def test_bad_distributed_config(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config(**kw).validate()


def test_torch_backend_without_torchrun(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="must be started by torchrun"):
        run(Config(**{**BASE, "strategy": "ddp", "workers": 2, "backend": "torch", "out": str(tmp_path / "r")}))


def test_network_parse_and_costs():
    net = NetworkModel.parse("bandwidth=10G,latency=5ms")
    assert (net.bandwidth, net.latency) == (1e10, 5e-3)
    assert NetworkModel.parse(None) == NetworkModel(1e9, 1e-3)
    net = NetworkModel.parse("bandwidth=100Mbps, latency=20us")
    assert net.bandwidth == 1e8 and net.latency == pytest.approx(2e-5)
    sent, secs = NetworkModel(8e6, 0.0).all_reduce(1000, 4)
    assert sent == 1500 and secs == pytest.approx(1500 * 8 / 8e6)
    assert NetworkModel().all_reduce(1000, 1) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="unknown key 'bw'"):
        NetworkModel.parse("bw=1G")
