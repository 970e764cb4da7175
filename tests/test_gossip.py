"""Oracles for gossip SGD and the single global merge: exact equivalences, hand-written mixing matrices,
consensus, hand-counted bytes and time, sim == torch (4 gloo processes), bad input, bit-identical resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sgdlab import Config, run, strategies
from sgdlab.distributed import NetworkModel
from sgdlab.distributed.group import SimGroup
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics
from sgdlab.strategies import Worker
from sgdlab.strategies.gossip import TOPOLOGIES, contraction, mixing_matrix, period

from .test_torch_backend import torchrun

HERE = Path(__file__).parent
BASE = dict(task="digits", optimizer="sgd", lr=0.05, steps=8, batch_size=16, eval_every=4, log_every=1,
            device="cpu", step_time=0.01)
P = 26122  # parameters of the digits model (no buffers)


def _run(tmp_path, name, **kw):
    cfg = Config(**{**BASE, **kw, "out": str(tmp_path / name)})
    res = run(cfg)
    ck = torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=True)
    return res.summary, [w["model"] for w in ck["workers"]], read_metrics(Path(cfg.out) / "metrics.jsonl")


def _close(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _losses(recs):
    return [r["train_loss"] for r in recs if "train_loss" in r]


def _mean(models: list[dict]) -> dict:
    return {k: torch.stack([m[k].double() for m in models]).mean(0).float() for k in models[0]}


# ---- exact equivalences --------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [1, 3])
def test_complete_graph_uniform_weights_equals_localsgd(tmp_path, h):
    kw = dict(workers=3, optimizer_args={"momentum": 0.9})
    _, loc, r1 = _run(tmp_path, "loc", strategy="localsgd", strategy_args={"sync_every": h}, **kw)
    s, gos, r2 = _run(tmp_path, "gos", strategy="gossip", strategy_args={"topology": "complete", "sync_every": h},
                      **kw)
    for a, b in zip(loc, gos, strict=True):
        _close(a, b)
    assert _losses(r1) == pytest.approx(_losses(r2), abs=1e-6)
    if h == 1:  # with H = 3 Local SGD evaluates its last sync (step 6), gossip the average now (step 8)
        assert r2[-1]["val_loss"] == pytest.approx(r1[-1]["val_loss"], abs=1e-6)
    # bytes: every worker sends its 4P bytes to the 2 others each round (an all-gather, not an all-reduce)
    assert s["bytes_sent_per_worker"] == 2 * 4 * P * (BASE["steps"] // h)


def test_single_merge_is_no_sync_then_one_average(tmp_path):
    kw = dict(workers=3, data_split="dirichlet:0.5")
    s0, apart, r0 = _run(tmp_path, "apart", strategy="gossip", strategy_args={"topology": "none"}, **kw)
    s1, merged, r1 = _run(tmp_path, "merged", strategy="gossip",
                          strategy_args={"topology": "none", "merge_at": BASE["steps"]}, **kw)
    assert not torch.equal(apart[0]["net.1.weight"], apart[1]["net.1.weight"])  # they did drift apart
    by_hand = _mean(apart)
    for m in merged:
        _close(m, by_hand)
    assert _losses(r0) == _losses(r1)  # the merge comes after the last step's losses
    # the evaluated model is the uncounted average: without the merge the same val loss, and no bytes
    assert s0["final_val_loss"] == pytest.approx(s1["final_val_loss"], abs=1e-6)
    assert s0["bytes_sent_per_worker"] == 0
    assert s1["bytes_sent_per_worker"] == pytest.approx(2 * 2 / 3 * 4 * P, rel=1e-12)  # one ring all-reduce
    assert r0[-1]["consensus_distance"] > 0 and r1[-1]["consensus_distance"] == pytest.approx(0, abs=1e-12)


def test_merge_at_a_chosen_step(tmp_path):
    """No gossip, one merge after step 4 of 8: the average at step 8 is Local SGD's (H = 4) model, whose
    workers averaged at 4 and 8 and trained apart in between from the same point."""
    kw = dict(workers=3, data_split="dirichlet:0.5")
    _, loc, r1 = _run(tmp_path, "loc", strategy="localsgd", strategy_args={"sync_every": 4}, **kw)
    s, gos, r2 = _run(tmp_path, "gos", strategy="gossip", strategy_args={"topology": "none", "merge_at": 4}, **kw)
    _close(_mean(gos), loc[0])
    assert _losses(r1) == pytest.approx(_losses(r2), abs=1e-6)
    assert r2[-1]["val_loss"] == pytest.approx(r1[-1]["val_loss"], abs=1e-6)
    assert s["bytes_sent_per_worker"] == pytest.approx(2 * 2 / 3 * 4 * P, rel=1e-12)


def test_buffers_are_mixed_like_parameters(tmp_path):
    """BatchNorm running statistics: complete-graph gossip every 2 steps is Local SGD (H = 2) with exactly
    averaged buffers; buffers=local leaves every worker its own."""
    from .bn_task import bn_task

    kw = dict(task="digits", optimizer="sgd", lr=0.05, steps=4, batch_size=16, eval_every=4, log_every=1,
              device="cpu", step_time=0.01, workers=3, data_split="dirichlet:0.3")
    out = {}
    for name, strategy, args in [("loc", "localsgd", {"sync_every": 2}),
                                 ("gos", "gossip", {"topology": "complete", "sync_every": 2}),
                                 ("gos-local", "gossip", {"topology": "complete", "sync_every": 2,
                                                          "buffers": "local"})]:
        res = run(Config(**kw, strategy=strategy, strategy_args=args, out=str(tmp_path / name)), task=bn_task())
        ck = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        out[name] = res.summary, [w["model"] for w in ck["workers"]]
    for a, b in zip(out["loc"][1], out["gos"][1], strict=True):
        _close({k: v for k, v in a.items() if "num_batches" not in k}, {k: v for k, v in b.items()
                                                                        if "num_batches" not in k})
    assert out["gos"][0]["final_val_loss"] == pytest.approx(out["loc"][0]["final_val_loss"], abs=1e-6)
    p_bn, b_bn = 64 * 16 + 16 + 2 * 16 + 16 * 10 + 10, 2 * 16  # parameters, floating buffer elements
    assert out["gos"][0]["bytes_sent_per_worker"] == 2 * 2 * 4 * (p_bn + b_bn)
    assert out["gos-local"][0]["bytes_sent_per_worker"] == 2 * 2 * 4 * p_bn
    m = out["gos-local"][1]
    assert torch.equal(m[0]["0.weight"], m[1]["0.weight"])
    assert not torch.equal(m[0]["1.running_mean"], m[1]["1.running_mean"])


# ---- mixing matrices -----------------------------------------------------------------------------------
def _from_neighbours(table: dict[int, list[int]]) -> torch.Tensor:
    n = len(table)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, js in table.items():
        for j in [i, *js]:
            w[i, j] = 1 / (len(js) + 1)
    return w


def test_mixing_matrices_match_hand_written():
    t = 1 / 3
    ring4 = torch.tensor([[t, t, 0, t], [t, t, t, 0], [0, t, t, t], [t, 0, t, t]], dtype=torch.float64)
    assert torch.equal(mixing_matrix("ring", 4), ring4)
    # 2x2 torus: rank r*2 + c; the row and the column neighbours are one rank each
    torus22 = torch.tensor([[t, t, t, 0], [t, t, 0, t], [t, 0, t, t], [0, t, t, t]], dtype=torch.float64)
    assert torch.equal(mixing_matrix("torus", 4), torus22)
    ring8 = {i: [(i - 1) % 8, (i + 1) % 8] for i in range(8)}
    assert torch.equal(mixing_matrix("ring", 8), _from_neighbours(ring8))
    # 2x4 torus: one vertical neighbour (2 rows), two horizontal ones
    torus24 = {0: [1, 3, 4], 1: [0, 2, 5], 2: [1, 3, 6], 3: [0, 2, 7],
               4: [0, 5, 7], 5: [1, 4, 6], 6: [2, 5, 7], 7: [3, 4, 6]}
    assert torch.equal(mixing_matrix("torus", 8), _from_neighbours(torus24))
    assert torch.equal(mixing_matrix("torus", 8, shape="4x2"), _from_neighbours(
        {0: [1, 2, 6], 1: [0, 3, 7], 2: [0, 3, 4], 3: [1, 2, 5], 4: [2, 5, 6], 5: [3, 4, 7], 6: [0, 4, 7],
         7: [1, 5, 6]}))
    # static exponential graph, N = 8: i receives from i+1, i+2, i+4; weights 1/4
    exp8 = {i: [(i + 1) % 8, (i + 2) % 8, (i + 4) % 8] for i in range(8)}
    assert torch.equal(mixing_matrix("exponential", 8), _from_neighbours(exp8))
    # one-peer: rounds use i+1, i+2, i+4 in turn, weights 1/2; the three together average exactly
    assert period("one-peer-exponential", 8) == 3
    ws = [mixing_matrix("one-peer-exponential", 8, k) for k in range(3)]
    for k, w in enumerate(ws):
        assert torch.equal(w, _from_neighbours({i: [(i + 2 ** k) % 8] for i in range(8)}))
    assert torch.equal(ws[2] @ ws[1] @ ws[0], torch.full((8, 8), 1 / 8, dtype=torch.float64))
    assert contraction(ws) == pytest.approx(0, abs=1e-15)
    assert torch.equal(mixing_matrix("complete", 4), torch.full((4, 4), 0.25, dtype=torch.float64))
    assert torch.equal(mixing_matrix("none", 3), torch.eye(3, dtype=torch.float64))
    assert contraction([ring4]) == pytest.approx(1 / 3)  # eigenvalues 1, 1/3, 1/3, -1/3


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_mixing_matrices_are_doubly_stochastic(topology):
    for n in range(1, 17):
        if topology == "torus" and (n < 4 or all(n % d for d in range(2, math.isqrt(n) + 1))):
            continue
        for k in range(period(topology, n)):
            w = mixing_matrix(topology, n, k)
            assert (w >= 0).all()
            torch.testing.assert_close(w.sum(0), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
            torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)


# ---- mixing on a group, directly -----------------------------------------------------------------------
def _workers(values: list[torch.Tensor]) -> list[Worker]:
    out = []
    for r, v in enumerate(values):
        m = nn.Linear(v.numel(), 1, bias=False)
        with torch.no_grad():
            m.weight.copy_(v.view(1, -1))
        out.append(Worker(r, m, torch.optim.SGD(m.parameters(), lr=0.0)))
    return out


def _strategy(n: int, network: NetworkModel | None = None, **opts):
    group = SimGroup(n, network or NetworkModel())
    s = strategies.create("gossip", group, opts)
    return s, group


@pytest.mark.parametrize("topology,n", [("ring", 8), ("torus", 8), ("exponential", 6),
                                        ("one-peer-exponential", 8), ("complete", 5)])
def test_consensus(topology, n):
    s, _ = _strategy(n, topology=topology)
    const = torch.linspace(-2, 3, 7)
    workers = _workers([const.clone() for _ in range(n)])
    s.setup(workers)
    for step in range(1, 4):
        s.after_step(workers, step)
    for w in workers:  # a constant vector stays (weights sum to 1: at most rounding)
        torch.testing.assert_close(w.model.weight.detach().view(-1), const, rtol=0, atol=1e-6)
    # different vectors: the float64 reference x ← W x, the mean kept, the distance to it non-increasing
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 7, generator=g, dtype=torch.float64)
    workers = _workers([x.float() for x in xs])
    s.setup(workers)
    ref, mean = xs.float().double(), xs.float().double().mean(0)
    dist = [((ref - mean) ** 2).sum().item()]
    for step in range(1, 25):
        s.after_step(workers, step)
        ref = mixing_matrix(topology, n, (step - 1) % period(topology, n)) @ ref
        got = torch.stack([w.model.weight.detach().view(-1).double() for w in workers])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.mean(0), mean, rtol=0, atol=1e-5)
        dist.append(((ref - mean) ** 2).sum().item())
    assert all(b <= a + 1e-12 for a, b in zip(dist[:-1], dist[1:], strict=True))
    assert dist[-1] < 1e-3 * dist[0]
    if topology == "one-peer-exponential":  # exact averaging after log2(8) = 3 rounds
        assert dist[3] == pytest.approx(0, abs=1e-20)


def test_bytes_and_time_per_round_by_hand():
    net = NetworkModel(bandwidth=1e6, latency=1e-3)
    nbytes = 4 * 7
    for topology, n, degree in [("ring", 8, 2), ("ring", 2, 1), ("torus", 8, 3), ("torus", 4, 2),
                                ("torus", 9, 4), ("exponential", 8, 3), ("exponential", 5, 3),
                                ("one-peer-exponential", 8, 1), ("complete", 5, 4), ("none", 3, 0)]:
        s, group = _strategy(n, net, topology=topology)
        workers = _workers([torch.randn(7) for _ in range(n)])
        s.setup(workers)
        s.after_step(workers, 1)
        assert group.bytes_sent == degree * nbytes, topology
        secs = degree * (1e-3 + 8 * nbytes / 1e6)
        assert group.clocks == pytest.approx([secs] * n, rel=1e-12), topology
        assert s.log_info()["gossip"]["degree"] == degree
    # a worker waits for its senders only: ring of 4, worker 3 arrives late
    s, group = _strategy(4, net, topology="ring")
    workers = _workers([torch.randn(7) for _ in range(4)])
    s.setup(workers)
    group.clocks = [0.0, 0.0, 0.0, 5.0]
    s.after_step(workers, 1)
    tau = 2 * (1e-3 + 8 * nbytes / 1e6)
    assert group.clocks == pytest.approx([5 + tau, tau, 5 + tau, 5 + tau], rel=1e-12)


def test_runner_counts_degree_times_payload_and_logs_the_matrix_once(tmp_path):
    s, _, recs = _run(tmp_path, "ring", strategy="gossip", workers=4, strategy_args={"topology": "ring",
                                                                                     "sync_every": 2})
    assert s["bytes_sent_per_worker"] == 2 * 4 * P * (BASE["steps"] // 2)
    assert recs[2]["bytes_sent"] == 2 * 4 * P and recs[1]["bytes_sent"] == 0
    info = recs[0]["gossip"]
    assert info["W"] == [mixing_matrix("ring", 4).tolist()] and info["degree"] == 2
    assert info["weights"] == "uniform 1/(d+1)" and info["rho"] == pytest.approx(1 / 3)
    assert all("gossip" not in r for r in recs[1:])
    assert all("consensus_distance" in r for r in recs if "val_loss" in r)
    summary = json.loads((tmp_path / "ring" / "summary.json").read_text())
    assert summary["consensus_distance"] == recs[-1]["consensus_distance"]


# ---- resume, bad input ---------------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path):
    kw = dict(strategy="gossip", workers=4, optimizer="adamw", lr=1e-3, steps=12, eval_every=3,
              strategy_args={"topology": "one-peer-exponential", "sync_every": 2, "merge_at": 8})
    _, full, r1 = _run(tmp_path, "full", **kw)
    cfg = Config(**{**BASE, **kw, "out": str(tmp_path / "part")})
    run(cfg, stop_at=5)
    run(cfg, resume=True)
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for a, b in zip(full, [w["model"] for w in ck["workers"]], strict=True):
        _close(a, b, atol=0)
    r2 = read_metrics(tmp_path / "part" / "metrics.jsonl")
    def drop_wall(recs):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]
    # losses, bytes, sim time, val loss, consensus distance; the matrix once
    assert drop_wall(r1) == drop_wall(r2)


@pytest.mark.parametrize("kw,pattern", [
    ({"workers": 4, "strategy_args": {"topology": "star"}}, r"unknown topology 'star'"),
    ({"workers": 7, "strategy_args": {"topology": "torus"}}, r"topology=torus needs workers = R x C with R, C >= 2; "
                                                             r"workers=7"),
    ({"workers": 2, "strategy_args": {"topology": "torus"}}, r"workers=2 has no such factorisation"),
    ({"workers": 8, "strategy_args": {"topology": "torus", "torus_shape": "2x3"}},
     r"torus_shape='2x3' has 6 nodes but workers=8"),
    ({"workers": 8, "strategy_args": {"topology": "torus", "torus_shape": "8x1"}}, r"torus_shape='8x1'; allowed: RxC"),
    ({"workers": 8, "strategy_args": {"topology": "ring", "torus_shape": "2x4"}}, r"applies to topology=torus"),
    ({"workers": 4, "strategy_args": {"sync_every": 0}}, r"sync_every=0 is out of range"),
    ({"workers": 4, "strategy_args": {"merge_at": -1}}, r"merge_at=-1 is out of range"),
    ({"workers": 4, "strategy_args": {"buffers": "average"}}, r"unknown buffers 'average'"),
    ({"workers": 4, "strategy_args": {"evaluate": "best"}}, r"unknown evaluate 'best'"),
])
def test_bad_gossip_config(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config(strategy="gossip", **kw).validate()


def test_compressed_gossip_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="strategy gossip sends exact parameters"):
        run(Config(**{**BASE, "strategy": "gossip", "workers": 2, "compress": "bf16", "out": str(tmp_path / "r")}))


# ---- sim == torch --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_backend_matches_simulator(tmp_path):
    n = 4
    configs = {t: {**BASE, "workers": n, "strategy": "gossip", "optimizer_args": {"momentum": 0.9},
                   "network": "bandwidth=1e8,latency=1e-4", "worker_speeds": [1.0, 1.0, 2.0, 1.5],
                   "strategy_args": {"topology": t, "merge_at": 6 if t in ("none", "ring") else 0}}
               for t in TOPOLOGIES}
    res = torchrun(n, str(HERE / "dist_script.py"), str(tmp_path / "torch"), json.dumps(configs))
    assert res.returncode == 0, res.stderr[-3000:]
    for name, kw in configs.items():
        run(Config(**{**kw, "out": str(tmp_path / "sim" / name)}))
        sim_ck = torch.load(tmp_path / "sim" / name / "checkpoint.pt", weights_only=True)
        for r in range(n):
            ck_name = "checkpoint.pt" if r == 0 else f"checkpoint.rank{r}.pt"
            m_t = torch.load(tmp_path / "torch" / name / ck_name, weights_only=True)["workers"][0]["model"]
            _close(m_t, sim_ck["workers"][r]["model"])
        r_t = read_metrics(tmp_path / "torch" / name / "metrics.jsonl")
        r_s = read_metrics(tmp_path / "sim" / name / "metrics.jsonl")
        assert _losses(r_t) == pytest.approx(_losses(r_s), abs=1e-6), name
        assert r_t[0]["gossip"] == r_s[0]["gossip"], name
        s_t = json.loads((tmp_path / "torch" / name / "summary.json").read_text())
        s_s = json.loads((tmp_path / "sim" / name / "summary.json").read_text())
        assert s_t["bytes_sent_per_worker"] == s_s["bytes_sent_per_worker"], name
        assert s_t["sim_time_s"] == pytest.approx(s_s["sim_time_s"], rel=1e-9), name
        assert s_t["final_val_loss"] == pytest.approx(s_s["final_val_loss"], abs=1e-6), name
        assert s_t["consensus_distance"] == pytest.approx(s_s["consensus_distance"], rel=1e-4, abs=1e-9), name
