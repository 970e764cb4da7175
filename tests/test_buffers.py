"""Buffers (BatchNorm running statistics) under every strategy, and optimizer state that mirrors the weights
under Distributed (issue 12, items 4 and 5). Oracles: the batch statistics computed by hand, the workers'
own statistics averaged by hand (in train mode running statistics never feed back into training, so a
``buffers=local`` run gives every worker's own), a single-process Lookahead written out, and the simulator
for torch.distributed (2 processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sgdlab import run, strategies
from sgdlab.distributed import NetworkModel
from sgdlab.distributed.group import SimGroup
from sgdlab.errors import ConfigError, UnknownNameError
from sgdlab.privacy import ClientDP
from sgdlab.strategies import Worker
from sgdlab.strategies.base import synced_buffers

from . import zoo
from .bn_task import RUNS, bn_config, bn_task

HERE = Path(__file__).parent
STATS = ("1.running_mean", "1.running_var")
P, B = 4 * 9 + 4 + 2 * 4 + 4 * 64 * 4 + 4, 2 * 4   # bn_cnn: parameters, floating buffer elements


def batch(rank: int, t: int):
    return zoo.bn_cnn()[1](8, seed=1000 * rank + t)  # different data per rank


def sim(strategy: str, n: int, steps: int, **opts):
    """Strategy ``strategy`` on the simulator: n bn_cnn workers from one init (seed 100, as rank 0's under
    torchrun), SGD lr 0.1, worker r's step-t batch ``batch(r, t)``. Returns (strategy, workers, group)."""
    group = SimGroup(n, NetworkModel())
    s = strategies.create(strategy, group, opts)
    workers = []
    for r in range(n):
        model, _ = zoo.bn_cnn(seed=100)
        workers.append(Worker(r, model, torch.optim.SGD(model.parameters(), lr=0.1)))
    s.setup(workers)
    for t in range(steps):
        step(s, workers, t)
    return s, workers, group


def step(s, workers, t):
    for w in workers:
        x, y = batch(w.rank, t)
        F.cross_entropy(w.model(x), y).backward()
    s.after_backward(workers, t + 1)
    for w in workers:
        w.optimizer.step()
        w.optimizer.zero_grad()
    s.after_step(workers, t + 1)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states(a, b, keys=None, atol=1e-6):
    for k in keys or a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("rule", ["average", "broadcast", "local"])
def test_ddp_buffers_follow_the_rule(rule):
    n = 3
    s, workers, group = sim("ddp", n, 1, buffers=rule)
    conv = zoo.bn_cnn(seed=100)[0][0]
    with torch.no_grad():  # the batch statistics by hand: BatchNorm2d's input is the convolution's output
        ys = [conv(batch(r, 0)[0]) for r in range(n)]
    means = [y.mean((0, 2, 3)) for y in ys]
    vars_ = [y.var((0, 2, 3), unbiased=True) for y in ys]
    own = [(0.1 * m, 0.9 + 0.1 * v) for m, v in zip(means, vars_, strict=True)]  # momentum 0.1 from (0, 1)
    if rule == "average":
        want = [(sum(m for m, _ in own) / n, sum(v for _, v in own) / n)] * n
    else:
        want = [own[0]] * n if rule == "broadcast" else own
    for w, (m, v) in zip(workers, want, strict=True):
        bn = w.model[1]
        torch.testing.assert_close(bn.running_mean, m, atol=1e-6, rtol=0)
        torch.testing.assert_close(bn.running_var, v, atol=1e-6, rtol=0)
        assert bn.num_batches_tracked.item() == 1
    grads = 2 * (n - 1) / n * 4 * P
    buffers = {"average": 2 * (n - 1) / n * 4 * B, "broadcast": (n - 1) / n * 4 * B, "local": 0}[rule]
    assert group.bytes_sent == pytest.approx(grads + buffers, rel=1e-12)
    step(s, workers, 1)  # and they stay equal (or not) step after step
    same = all(torch.equal(w.model[1].running_var, workers[0].model[1].running_var) for w in workers)
    assert same == (rule != "local")


@pytest.mark.parametrize("strategy,opts", [
    ("localsgd", {"sync_every": 2}),
    ("diloco", {"sync_every": 2, "outer_lr": 0.7}),
    ("streaming-diloco", {"sync_every": 2, "fragments": 2, "overlap": 0, "precision": "fp32"}),
])
@pytest.mark.parametrize("rule", ["average", "broadcast"])
def test_local_strategies_sync_buffers_and_the_eval_model_takes_them(strategy, opts, rule):
    n = 2
    s_loc, w_loc, g_loc = sim(strategy, n, 2, **opts, buffers="local")  # every worker's own statistics
    s, workers, group = sim(strategy, n, 1, **opts, buffers=rule)
    assert not torch.equal(workers[0].model[1].running_mean, workers[1].model[1].running_mean)  # before a sync
    step(s, workers, 1)                                                                          # the sync
    own = [state(w.model) for w in w_loc]
    want = {k: (own[0][k] + own[1][k]) / 2 if rule == "average" else own[0][k] for k in STATS}
    for w, wl in zip(workers, w_loc, strict=True):
        assert_states(state(w.model), want, STATS)
        assert_states(state(w.model), state(wl.model), [k for k in own[0] if k not in STATS], atol=0)  # params
    synced = state(s.eval_model(workers))
    assert_states(synced, want, STATS, atol=0)
    assert_states(synced, state(workers[0].model), [*STATS, "1.num_batches_tracked"], atol=0)
    extra = {"average": 2 * (n - 1) / n * 4 * B, "broadcast": (n - 1) / n * 4 * B}[rule]
    assert group.bytes_sent == pytest.approx(g_loc.bytes_sent + extra, rel=1e-12)
    step(s, workers, 2)  # local steps move the workers' statistics; the evaluated model keeps the synced ones
    assert not torch.equal(workers[0].model[1].running_mean, synced["1.running_mean"])
    assert_states(state(s.eval_model(workers)), synced, STATS, atol=0)
    # the synchronised buffers are checkpointed with the global parameters
    restored = strategies.create(strategy, SimGroup(n, NetworkModel()), {**opts, "buffers": rule})
    restored.setup([Worker(r, zoo.bn_cnn(seed=5)[0], None) for r in range(n)])
    restored.load_state_dict(s.state_dict())
    assert_states(state(restored.eval_model(workers)), synced, STATS, atol=0)


def test_local_rule_eval_model_takes_worker0s_buffers():
    s, workers, _ = sim("diloco", 2, 3, sync_every=2, buffers="local")
    assert_states(state(s.eval_model(workers)), state(workers[0].model), STATS, atol=0)


def test_buffers_rule_is_checked_and_client_dp_refuses_shared_buffers():
    with pytest.raises(UnknownNameError, match="buffers"):
        strategies.options("ddp", {"buffers": "sum"})
    model = zoo.bn_cnn()[0]
    assert [b.shape for b in synced_buffers(model)] == [torch.Size([4])] * 2  # num_batches_tracked stays local
    cdp = ClientDP(noise_multiplier=0.5, clip=0.1, participation=1.0, num_clients=2, sync_every=2, seed=0)
    s = strategies.create("localsgd", SimGroup(2, NetworkModel()), {"sync_every": 2}, client_dp=cdp)
    with pytest.raises(ConfigError, match="does not cover the model's buffers.*buffers=local"):
        s.setup([Worker(r, zoo.bn_cnn()[0], None) for r in range(2)])
    s = strategies.create("localsgd", SimGroup(2, NetworkModel()), {"sync_every": 2, "buffers": "local"},
                          client_dp=cdp)
    s.setup([Worker(r, zoo.bn_cnn()[0], None) for r in range(2)])


@pytest.mark.parametrize("strategy", list(RUNS))
def test_runner_synchronises_buffers_and_evaluates_with_them(tmp_path, strategy):
    task = bn_task()
    res = run(bn_config(strategy, str(tmp_path / strategy)), task=task)
    ck = torch.load(tmp_path / strategy / "checkpoint.pt", weights_only=True)
    m0, m1 = (w["model"] for w in ck["workers"])
    assert_states(m0, m1, ["1.running_mean", "1.running_var"], atol=0)
    assert m0["1.running_var"].ne(1).all()
    model = task.build_model()
    model.load_state_dict(m0)
    assert res.summary["final_val_loss"] == pytest.approx(task.evaluate(model)["val_loss"], abs=1e-6)
    p, b = sum(t.numel() for t in model.parameters()), 2 * 16
    syncs = 4 if strategy == "ddp" else 2
    assert res.summary["bytes_sent_per_worker"] == pytest.approx(syncs * 4 * (p + b), rel=1e-12)  # 2(N-1)/N = 1


@pytest.mark.slow
def test_torchrun_buffers_and_lookahead_follow_rank0(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "buffers_script.py"), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, strategy, steps, opts in [("ddp", "ddp", 2, {}), ("ddp-broadcast", "ddp", 2, {"buffers": "broadcast"}),
                                        ("diloco", "diloco", 3, {"sync_every": 2, "outer_lr": 0.7})]:
        s, workers, group = sim(strategy, 2, steps, **opts)
        evaluated = state(s.eval_model(workers))
        for r, got in enumerate(ranks):
            assert_states(got[name]["model"], state(workers[r].model))
            assert_states(got[name]["eval"], evaluated)
            assert got[name]["bytes"] == group.bytes_sent
        if strategy == "ddp":
            assert_states(ranks[0][name]["model"], ranks[1][name]["model"], atol=0)
    # the runner on --backend torch: every rank's worker equals the simulator's, and so do the summaries
    for strategy in RUNS:
        run(bn_config(strategy, str(tmp_path / "sim" / strategy)), task=bn_task())
        sim_ck = torch.load(tmp_path / "sim" / strategy / "checkpoint.pt", weights_only=True)
        for r, name in enumerate(["checkpoint.pt", "checkpoint.rank1.pt"]):
            got = torch.load(tmp_path / f"runner-{strategy}" / name, weights_only=True)
            assert_states(got["workers"][0]["model"], sim_ck["workers"][r]["model"])
        summaries = [json.loads((tmp_path / d / "summary.json").read_text())
                     for d in (f"runner-{strategy}", f"sim/{strategy}")]
        assert summaries[0]["bytes_sent_per_worker"] == summaries[1]["bytes_sent_per_worker"]
        assert summaries[0]["final_val_loss"] == pytest.approx(summaries[1]["final_val_loss"], abs=1e-6)
    # Lookahead: the slow weights follow the broadcast, and the run is Lookahead on the mean gradient
    torch.manual_seed(100)
    w = torch.nn.Linear(4, 1, bias=False).weight.detach().clone()
    for got in ranks:
        torch.testing.assert_close(got["slow_at_start"], w, atol=0, rtol=0)
    slow, gens = w.clone(), [torch.Generator().manual_seed(r) for r in range(2)]
    for t in range(1, 6):
        grads = []
        for g in gens:
            x = torch.randn(8, 4, generator=g)
            wr = w.clone().requires_grad_()
            (x @ wr.t()).squeeze(1).sub(x.sum(1)).pow(2).mean().backward()
            grads.append(wr.grad)
        w = w - 0.1 * (grads[0] + grads[1]) / 2
        if t % 2 == 0:  # k = 2, alpha = 0.5
            slow = slow + 0.5 * (w - slow)
            w = slow.clone()
    for got in ranks:
        torch.testing.assert_close(got["lookahead"], w, atol=1e-6, rtol=0)
    assert "ConfigError: rank 0: ranks [1] hold optimizer state of another layout" in ranks[0]["layout_error"]
    assert "ConfigError: rank 1: ranks [0] hold optimizer state of another layout" in ranks[1]["layout_error"]
