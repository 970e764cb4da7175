"""Scaled local methods (Chezhegov et al., 2024, arXiv:2406.00846; ``scaled-local``): the brief's oracles
against plain float64 reference loops — D̂ = I is localsgd bit for bit; H = 1 with SGD is centralised
mini-batch SGD preconditioned by the same D̂; M = 1 is single-device scaled SGD with D̂ refreshed every H
steps; D̂ is one for all workers (also with a lossy exchange) and within [α, Γ]; the per-worker ablation is
local RMSProp/Adam between averages — plus bytes, resume, bad options and the torch backend."""

import json
import math
from pathlib import Path

import pytest
import torch

from sgdlab import Config, run, strategies
from sgdlab.distributed.group import SimGroup
from sgdlab.distributed.network import NetworkModel
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics
from sgdlab.strategies import Worker

from .test_desloc import _loss, _model  # the same float64 linear model and squared loss

HERE = Path(__file__).parent
DT = torch.float64
W = 3
LR = 0.02
# the exchange sends fp32 (its default precision): float64 models agree with the float64 references to
# float32 rounding of each averaged update and statistic
TOL = dict(rtol=1e-6, atol=1e-7)
TRUE = torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]], dtype=DT)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 5, generator=g, dtype=DT) * torch.tensor([1.0, 0.1, 3.0, 1.0, 0.5], dtype=DT) + rank
    return x, x @ TRUE + 0.5 * rank  # badly scaled features, non-iid (a shift per worker)


def _average(x):
    """Every worker's copy of the mean over workers of their tensor lists ``x``."""
    mean = [sum(x[r][i] for r in range(len(x))) / len(x) for i in range(len(x[0]))]
    return [[m.clone() for m in mean] for _ in range(len(x))]


def _train(opts, steps, world=W, optimizer=None, precision=None, spy=None):
    group = SimGroup(world, NetworkModel())
    if precision is not None:
        opts = {**opts, "precision": precision}
    strategy = strategies.create(opts.pop("name", "scaled-local"), group, opts)
    workers = []
    for r in range(world):
        m = _model()
        opt = optimizer(m.parameters()) if optimizer else torch.optim.SGD(m.parameters(), lr=LR)
        workers.append(Worker(r, m, opt))
    strategy.setup(workers)
    for step in range(1, steps + 1):
        for w in workers:
            _loss(w.model, _batch(w.rank, step)).backward()
        raw = [[p.grad.clone() for p in w.params] for w in workers]
        strategy.after_backward(workers, step)
        if spy is not None:
            spy(strategy, workers, raw, step)
        for w in workers:
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
        strategy.after_step(workers, step)
    return workers, group, strategy


def _grads(x, rank, t):
    wt, b = (p.clone().requires_grad_() for p in x)
    xb, yb = _batch(rank, t)
    return list(torch.autograd.grad((xb @ wt.T + b - yb).square().mean(), [wt, b]))


class _RefDiag:
    """The preconditioner rule in plain tensors (the module docstring's formulas)."""

    def __init__(self, kind, beta, alpha, gamma, shapes):
        self.kind, self.beta, self.alpha, self.gamma, self.k = kind, beta, alpha, gamma, 0
        self.v = [torch.zeros(s, dtype=DT) for s in shapes]

    def refresh(self, h):
        self.k += 1
        for i, x in enumerate(h):
            if self.kind == "rmsprop" and self.k == 1:
                self.v[i] = x * x
            else:
                self.v[i] = self.beta * self.v[i] + (1 - self.beta) * x * x
        corr = 1 - self.beta ** self.k if self.kind == "adam" else 1.0
        return [(v / corr).sqrt().clamp(self.alpha, self.gamma) for v in self.v]


def _x0():
    return [p.detach().clone() for p in _model().parameters()]


OPTS = dict(beta=0.9, alpha_min=0.05, gamma_max=20.0)


@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_h1_sgd_is_centralised_minibatch_sgd_with_the_same_preconditioner(kind):
    workers, _, _ = _train({"sync_every": 1, "preconditioner": kind, **OPTS}, 8)
    x = _x0()
    pc = _RefDiag(kind, shapes=[p.shape for p in x], beta=0.9, alpha=0.05, gamma=20.0)
    for t in range(1, 9):
        gs = [_grads(x, r, t) for r in range(W)]
        h = [sum(g[i] for g in gs) / W for i in range(len(x))]
        d = pc.refresh(h)
        x = [xi - LR * hi / di for xi, hi, di in zip(x, h, d, strict=True)]
    for w in workers:
        for a, b in zip(w.params, x, strict=True):
            torch.testing.assert_close(a.detach(), b, **TOL)


@pytest.mark.parametrize("kind, h", [("rmsprop", 3), ("adam", 3), ("adam", 1)])
def test_one_worker_is_scaled_sgd_refreshed_every_h_steps(kind, h):
    workers, group, _ = _train({"sync_every": h, "preconditioner": kind, **OPTS}, 10, world=1)
    x = _x0()
    pc = _RefDiag(kind, shapes=[p.shape for p in x], beta=0.9, alpha=0.05, gamma=20.0)
    for t in range(1, 11):
        g = _grads(x, 0, t)
        if (t - 1) % h == 0:
            d = pc.refresh(g)
        x = [xi - LR * gi / di for xi, gi, di in zip(x, g, d, strict=True)]
    assert pc.k == math.ceil(10 / h)
    for a, b in zip(workers[0].params, x, strict=True):
        torch.testing.assert_close(a.detach(), b, **TOL)


def test_local_rounds_match_the_reference():
    # M = 3 workers, H = 4: local steps with the D̂ of the round's first step, then the average
    h, steps = 4, 10
    workers, _, strategy = _train({"sync_every": h, "preconditioner": "adam", **OPTS}, steps)
    x = [_x0() for _ in range(W)]
    pc = _RefDiag("adam", shapes=[p.shape for p in x[0]], beta=0.9, alpha=0.05, gamma=20.0)
    for t in range(1, steps + 1):
        gs = [_grads(x[r], r, t) for r in range(W)]
        if (t - 1) % h == 0:
            assert all(torch.equal(a, b) for xr in x[1:] for a, b in zip(xr, x[0], strict=True))
            d = pc.refresh([sum(g[i] for g in gs) / W for i in range(len(gs[0]))])
        x = [[xi - LR * gi / di for xi, gi, di in zip(x[r], gs[r], d, strict=True)] for r in range(W)]
        if t % h == 0:
            x = _average(x)
    for r, w in enumerate(workers):
        for a, b in zip(w.params, x[r], strict=True):
            torch.testing.assert_close(a.detach(), b, **TOL)
    for a, b in zip(strategy.preconditioner(), d, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_per_worker_ablation_is_local_preconditioning_between_averages():
    h, steps = 3, 8
    workers, group, strategy = _train({"sync_every": h, "preconditioner": "rmsprop", "per_worker": True, **OPTS},
                                      steps)
    _, g_local, _ = _train({"name": "localsgd", "sync_every": h}, steps)
    assert group.bytes_sent == g_local.bytes_sent  # D̂_m is never communicated
    x = [_x0() for _ in range(W)]
    pcs = [_RefDiag("rmsprop", shapes=[p.shape for p in x[0]], beta=0.9, alpha=0.05, gamma=20.0) for _ in range(W)]
    for t in range(1, steps + 1):
        for r in range(W):
            g = _grads(x[r], r, t)
            d = pcs[r].refresh(g)
            x[r] = [xi - LR * gi / di for xi, gi, di in zip(x[r], g, d, strict=True)]
        if t % h == 0:
            x = _average(x)
    for r, w in enumerate(workers):
        for a, b in zip(w.params, x[r], strict=True):
            torch.testing.assert_close(a.detach(), b, **TOL)
    assert not torch.equal(strategy.preconditioner(0)[0], strategy.preconditioner(1)[0])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_preconditioner_is_one_for_all_workers_and_within_bounds(precision):
    alpha, gamma = 6.5, 15.0  # both bounds bind on this problem (D̂ spans about 4.6 to 23.6)
    seen = {"low": False, "high": False, "steps": 0}

    def spy(strategy, workers, raw, step):
        d = strategy.preconditioner()
        for w, g in zip(workers, raw, strict=True):  # every worker's gradient was divided by the same D̂
            for p, gi, di in zip(w.params, g, d, strict=True):
                assert torch.equal(p.grad, gi / di)
        flat = torch.cat([x.flatten() for x in d])
        assert bool((flat >= alpha).all()) and bool((flat <= gamma).all())
        seen["low"] |= bool((flat == alpha).any())
        seen["high"] |= bool((flat == gamma).any())
        seen["steps"] += 1

    _train({"sync_every": 2, "preconditioner": "adam", "beta": 0.9, "alpha_min": alpha, "gamma_max": gamma}, 8,
           precision=precision, spy=spy)
    assert seen == {"low": True, "high": True, "steps": 8}


def test_bytes_one_statistic_per_round():
    T, h = 12, 3
    _, g_local, _ = _train({"name": "localsgd", "sync_every": h}, T)
    _, g, _ = _train({"sync_every": h, "preconditioner": "rmsprop"}, T)
    assert g_local.bytes_sent > 0
    assert g.bytes_sent == pytest.approx(2 * g_local.bytes_sent, rel=1e-12)  # h has the parameters' size
    _, g_id, _ = _train({"sync_every": h, "preconditioner": "identity"}, T)
    assert g_id.bytes_sent == g_local.bytes_sent


BASE = dict(task="digits", optimizer="sgd", lr=0.05, batch_size=16, workers=2, device="cpu", step_time=0.01,
            log_every=1, eval_every=5, steps=10)


def _final(out):
    ck = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    recs = read_metrics(Path(out) / "metrics.jsonl")
    return ck["workers"], [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]


def _same(wa, wb):
    return all(torch.equal(a["model"][k], b["model"][k]) for a, b in zip(wa, wb, strict=True) for k in a["model"])


def test_identity_is_localsgd_bit_for_bit(tmp_path):
    a = Config(**BASE, strategy="localsgd", strategy_args={"sync_every": 3}, out=str(tmp_path / "a"))
    b = Config(**BASE, strategy="scaled-local", strategy_args={"sync_every": 3, "preconditioner": "identity"},
               out=str(tmp_path / "b"))
    run(a)
    run(b)
    (wa, ra), (wb, rb) = _final(a.out), _final(b.out)
    assert _same(wa, wb) and ra == rb


@pytest.mark.parametrize("args, stop", [({"preconditioner": "adam"}, 5), ({"preconditioner": "rmsprop"}, 3),
                                        ({"preconditioner": "adam", "per_worker": True}, 4)])
def test_runner_resume_is_bit_identical(tmp_path, args, stop):
    kw = dict(**{**BASE, "lr": 0.01}, strategy="scaled-local", strategy_args={"sync_every": 3, "beta": 0.9, **args})
    whole, part = Config(**kw, out=str(tmp_path / "w")), Config(**kw, out=str(tmp_path / "p"))
    run(whole)
    run(part, stop_at=stop)
    run(part, resume=True)
    (wa, ra), (wb, rb) = _final(whole.out), _final(part.out)
    assert _same(wa, wb) and ra == rb
    assert all("precond_min" in r for r in ra if "train_loss" in r)


@pytest.mark.parametrize("args, msg", [
    ({"sync_every": 0}, r"sync_every=0 is out of range"),
    ({"preconditioner": "oasis"}, r"unknown preconditioner 'oasis'\. Valid: adam, identity, rmsprop\."),
    ({"beta": 1.0}, r"beta=1.0 is out of range; allowed: 0 <= beta < 1"),
    ({"alpha_min": 0.0}, r"alpha_min=0.0 is out of range; allowed: 0 < alpha_min"),
    ({"alpha_min": math.inf}, r"alpha_min=inf; allowed: a finite number > 0"),
    ({"alpha_min": 0.1, "gamma_max": 0.01}, r"gamma_max=0.01 is out of range; allowed: 0.1 <= gamma_max"),
    ({"per_worker": True, "preconditioner": "identity"}, r"preconditioner=identity has none"),
    ({"precision": "fp8"}, r"unknown precision 'fp8'"),
    ({"buffers": "mean"}, r"unknown buffers 'mean'"),
    ({"period": 3}, r"unknown option of strategy 'scaled-local' 'period'"),
])
def test_bad_options_are_one_config_error(args, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(task="digits", strategy="scaled-local", strategy_args=args).validate()


def test_client_dp_is_refused():
    with pytest.raises(ConfigError, match="not 'scaled-local'"):
        Config(task="digits", strategy="scaled-local", workers=2, dp="noise=1,clip=1,unit=client").validate()


TORCH_CASES = {
    "adam": dict(strategy="scaled-local", optimizer="sgd", lr=0.01,
                 strategy_args={"sync_every": 2, "beta": 0.9, "precision": "int8"}),
    "per-worker": dict(strategy="scaled-local", optimizer="sgd", lr=0.01,
                       strategy_args={"sync_every": 3, "preconditioner": "rmsprop", "per_worker": True}),
}


@pytest.mark.slow
def test_torch_backend_matches_simulator(tmp_path):
    from .test_torch_backend import COMMON, assert_matches_sim, torchrun

    configs = {name: {**COMMON, **kw, "workers": 2} for name, kw in TORCH_CASES.items()}
    resumed = {**configs["adam"], "stop_at": 3}  # mid-round, after the refresh at step 3
    res = torchrun(2, str(HERE / "dist_script.py"), str(tmp_path / "torch"),
                   json.dumps({**configs, "adam-resumed": resumed}))
    assert res.returncode == 0, res.stderr[-3000:]
    for name, kw in configs.items():
        s_t, s_s, _ = assert_matches_sim(tmp_path, name, kw)
        assert s_s["bytes_sent_per_worker"] > 0, name
    resumed_kw = {k: v for k, v in resumed.items() if k != "stop_at"}
    assert_matches_sim(tmp_path, "adam-resumed", resumed_kw)
