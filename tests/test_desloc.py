"""DES-LOC (Iacob et al., 2025, arXiv:2505.22549): a float64 reference of the paper's rule (post-step
averaging, as the authors' port), the exact reductions (all periods H with SGD-M = Local SGD with state
averaging; K_u = K_v = ∞ = localsgd; K_x = 1 with SGD-M = mini-batch SGD-M), bytes, resume, bad options."""

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

DT = torch.float64
W = 3
# the exchange sends fp32 (its default precision), so float64 models agree with the float64 reference to
# float32 rounding at each sync, not to the last bit
TOL = dict(rtol=1e-6, atol=1e-7)
TRUE = torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]], dtype=DT)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 5, generator=g, dtype=DT) + rank  # non-iid: a shift per worker
    return x, x @ TRUE + 0.5 * rank


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 1).to(DT)


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def _make_opt(kind, params):
    if callable(kind):  # a factory of another test file
        return kind(params)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05, betas=(0.9, 0.99))
    return torch.optim.SGD(params, lr=0.02, momentum=0.9)


def _train(name, opts, kind, steps, world=W):
    group = SimGroup(world, NetworkModel())
    strategy = strategies.create(name, group, opts)
    workers = []
    for r in range(world):
        m = _model()
        workers.append(Worker(r, m, _make_opt(kind, m.parameters())))
    strategy.setup(workers)
    for step in range(1, steps + 1):
        for w in workers:
            _loss(w.model, _batch(w.rank, step)).backward()
        strategy.after_backward(workers, step)
        for w in workers:
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
        strategy.after_step(workers, step)
    return workers, group, strategy


def _reference(kind, steps, kx, ku, kv, world=W):
    """The rule in plain float64 tensors: every worker's local step, then the averages due at step t."""
    m0 = _model()
    x = [[p.detach().clone() for p in m0.parameters()] for _ in range(world)]
    u = [[torch.zeros_like(p) for p in xs] for xs in x]
    v = [[torch.zeros_like(p) for p in xs] for xs in x]
    for t in range(1, steps + 1):
        for r in range(world):
            wt, b = (p.clone().requires_grad_() for p in x[r])
            xb, yb = _batch(r, t)
            loss = (xb @ wt.T + b - yb).square().mean()
            grads = torch.autograd.grad(loss, [wt, b])
            for i, g in enumerate(grads):
                if kind == "adam":  # Adam (Kingma & Ba), bias-corrected, eps 1e-8
                    b1, b2, lr = 0.9, 0.99, 0.05
                    u[r][i] = b1 * u[r][i] + (1 - b1) * g
                    v[r][i] = b2 * v[r][i] + (1 - b2) * g * g
                    uh, vh = u[r][i] / (1 - b1 ** t), v[r][i] / (1 - b2 ** t)
                    x[r][i] = x[r][i] - lr * uh / (vh.sqrt() + 1e-8)
                else:  # heavy-ball SGD as torch.optim.SGD: buf = mu buf + g (buf = g at the first step)
                    u[r][i] = g.clone() if t == 1 else 0.9 * u[r][i] + g
                    x[r][i] = x[r][i] - 0.02 * u[r][i]
        for period, state in ((kx, x), (ku, u), (kv, v)):
            if math.isfinite(period) and t % period == 0:
                for i in range(len(x[0])):
                    mean = sum(state[r][i] for r in range(world)) / world
                    for r in range(world):
                        state[r][i] = mean.clone()
    return x, u, v


def _state(worker, name):
    return [worker.optimizer.state[p][name] for p in worker.params]


@pytest.mark.parametrize("kx, ku, kv", [(2, 3, 6), (3, 2, 4), (2, math.inf, math.inf), (4, 4, 4)])
def test_adam_matches_float64_reference(kx, ku, kv):
    workers, _, _ = _train("desloc", {"sync_every": kx, "sync_u": ku, "sync_v": kv}, "adam", 12)
    x, u, v = _reference("adam", 12, kx, ku, kv)
    for r, w in enumerate(workers):
        for got, want in ((w.params, x[r]), (_state(w, "exp_avg"), u[r]), (_state(w, "exp_avg_sq"), v[r])):
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a.detach(), b, **TOL)


@pytest.mark.parametrize("h", [1, 3])
def test_all_periods_h_with_sgd_momentum_is_local_sgd_with_state_averaging(h):
    workers, _, _ = _train("desloc", {"sync_every": h, "sync_u": h, "sync_v": h}, "sgdm", 9)
    x, u, _ = _reference("sgdm", 9, h, h, math.inf)
    for r, w in enumerate(workers):
        for a, b in zip([*w.params, *_state(w, "momentum_buffer")], [*x[r], *u[r]], strict=True):
            torch.testing.assert_close(a.detach(), b, **TOL)
    if h == 3:  # every worker holds the same parameters and momentum after a common sync
        for w in workers[1:]:
            assert all(torch.equal(a, b) for a, b in zip(w.params, workers[0].params, strict=True))


def test_kx_one_with_sgd_momentum_is_minibatch_sgdm():
    # the parameters are averaged after every step: by linearity the mean momentum is the momentum of the
    # mean gradient, whatever K_u (here: never averaged)
    workers, _, _ = _train("desloc", {"sync_every": 1, "sync_u": math.inf}, "sgdm", 8)
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)
    for t in range(1, 9):
        (sum(_loss(m, _batch(r, t)) for r in range(W)) / W).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(workers[0].params, m.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)


def test_bytes_count_every_stream():
    T = 12
    _, g1, _ = _train("localsgd", {"sync_every": T}, "adam", T)  # one parameter round
    per_round = g1.bytes_sent
    assert per_round > 0
    _, g, _ = _train("desloc", {"sync_every": 2, "sync_u": 3, "sync_v": 4}, "adam", T)
    assert g.bytes_sent == pytest.approx(per_round * (T // 2 + T // 3 + T // 4), rel=1e-12)
    _, g, _ = _train("desloc", {"sync_every": 2}, "adam", T)  # defaults K_u = 6, K_v = 12
    assert g.bytes_sent == pytest.approx(per_round * (6 + 2 + 1), rel=1e-12)


def test_state_sync_overrides_a_state_period():
    workers, _, _ = _train("desloc", {"sync_every": 2, "sync_u": math.inf, "sync_v": math.inf,
                                      "state_sync": {"exp_avg_sq": 3}}, "adam", 9)
    _, _, v = _reference("adam", 9, 2, math.inf, 3)
    for r, w in enumerate(workers):
        for a, b in zip(_state(w, "exp_avg_sq"), v[r], strict=True):
            torch.testing.assert_close(a, b, **TOL)


BASE = dict(task="digits", optimizer="adamw", lr=3e-3, batch_size=16, workers=2, device="cpu", step_time=0.01,
            log_every=1, eval_every=5, steps=10)


def _final(out):
    ck = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    recs = read_metrics(Path(out) / "metrics.jsonl")
    return ck["workers"][0], [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]


def test_infinite_moment_periods_are_localsgd_bit_for_bit(tmp_path):
    a = Config(**BASE, strategy="localsgd", strategy_args={"sync_every": 3}, out=str(tmp_path / "a"))
    b = Config(**BASE, strategy="desloc", strategy_args={"sync_every": 3, "sync_u": math.inf, "sync_v": math.inf},
               out=str(tmp_path / "b"))
    run(a)
    run(b)
    (wa, ra), (wb, rb) = _final(a.out), _final(b.out)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert ra == rb


def test_runner_resume_is_bit_identical(tmp_path):
    kw = dict(**BASE, strategy="desloc", strategy_args={"sync_every": 2, "sync_u": 3, "sync_v": 4},
              optimizer_args={"eps": 1e-3})  # eps: see the pitfall in sgdlab.strategies.desloc
    whole, part = Config(**kw, out=str(tmp_path / "w")), Config(**kw, out=str(tmp_path / "p"))
    run(whole)
    run(part, stop_at=5)  # after a parameter sync at 4 and a moment sync at 4, before the u sync at 6
    run(part, resume=True)
    (wa, ra), (wb, rb) = _final(whole.out), _final(part.out)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert ra == rb


@pytest.mark.parametrize("args, msg", [
    ({"sync_u": 0}, r"sync_u=0 is out of range; allowed: 1 <= sync_u"),
    ({"sync_v": -2}, r"sync_v=-2 is out of range"),
    ({"sync_u": 2.5}, r"sync_u=2.5; allowed: an integer >= 1 \(steps between syncs\) or inf \(never\)"),
    ({"sync_every": 0}, r"sync_every=0 is out of range"),
    ({"state_sync": {"step": 2}}, r"state_sync: 'step' is a step counter"),
    ({"state_sync": {"exp_avg": 0}}, r"state_sync.exp_avg=0 is out of range"),
    ({"period": 3}, r"unknown option of strategy 'desloc' 'period'"),
])
def test_bad_options_are_one_config_error(args, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(task="digits", strategy="desloc", strategy_args=args).validate()


def test_unknown_state_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"state_sync: optimizer Adam has no state 'exp_avg_2'; its states: "
                                          r"exp_avg, exp_avg_sq"):
        _train("desloc", {"sync_every": 2, "state_sync": {"exp_avg_2": 4}}, "adam", 2)


def test_client_dp_is_refused():
    with pytest.raises(ConfigError, match="not 'desloc'"):
        Config(task="digits", strategy="desloc", workers=2, dp="noise=1,clip=1,unit=client").validate()
