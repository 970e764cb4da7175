"""MT-DAO (Iacob et al., 2025, arXiv:2510.05361): the ``mtdao`` optimizer against a float64 transcription
of its rule, its reductions (one moment at weight 1 = AdamW bit for bit, weight 0 ignores the moments,
two equal moments = one), MT-DAO = ``mtdao`` under ``desloc`` against a float64 reference of the whole
method, resume, bad options."""

import math
from pathlib import Path

import pytest
import torch

from sgdlab import Config, optim, run
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics

from .test_desloc import TOL, W, _batch, _model, _train

DT = torch.float64


def _reference_step(x, us, v, g, t, lr, betas, weights, eps, wd):
    """One MT-DAO step of one tensor in float64: N first moments, one second moment, weighted numerator."""
    us = [b * u + (1 - b) * g for u, b in zip(us, betas[:-1], strict=True)]
    b2 = betas[-1]
    v = b2 * v + (1 - b2) * g * g
    num = (1 - sum(weights)) * g + sum(w * u / (1 - b ** t) for u, b, w in zip(us, betas[:-1], weights, strict=True))
    x = x * (1 - lr * wd) - lr * num / ((v / (1 - b2 ** t)).sqrt() + eps)
    return x, us, v


def _quadratic_grads(steps, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=DT) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("foreach", [False, True])
def test_optimizer_matches_float64_reference(foreach):
    hp = dict(lr=0.01, betas=(0.9, 0.995, 0.999), weights=(0.3, 0.5), eps=1e-8, weight_decay=0.1)
    shapes = [(4, 3), (3,)]
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=DT, requires_grad=True) for s in shapes]
    ref = [p.detach().clone() for p in params]
    us = [[torch.zeros_like(p) for _ in range(2)] for p in ref]
    vs = [torch.zeros_like(p) for p in ref]
    opt = optim.create("mtdao", params, foreach=foreach, **hp)
    for t, grads in enumerate(_quadratic_grads(7, shapes), start=1):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref[i], us[i], vs[i] = _reference_step(ref[i], us[i], vs[i], g, t, hp["lr"], hp["betas"], hp["weights"],
                                                   hp["eps"], hp["weight_decay"])
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
    assert sorted(opt.state[params[0]]) == ["exp_avg", "exp_avg_2", "exp_avg_sq", "step"]
    for i, p in enumerate(params):
        torch.testing.assert_close(opt.state[p]["exp_avg_2"], us[i][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
def test_one_moment_at_weight_one_is_adamw_bit_for_bit(foreach):
    shapes = [(4, 3), (3,)]
    a = [torch.randn(s, dtype=torch.float32, generator=torch.Generator().manual_seed(i), requires_grad=True)
         for i, s in enumerate(shapes)]
    b = [p.detach().clone().requires_grad_() for p in a]
    oa = optim.create("mtdao", a, lr=0.01, betas=(0.9, 0.99), weights=(1.0,), weight_decay=0.1, foreach=foreach)
    ob = torch.optim.AdamW(b, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    for grads in _quadratic_grads(6, shapes):
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.float(), g.float()
        oa.step()
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_weight_zero_ignores_the_moments_and_equal_moments_merge():
    shapes = [(5,)]

    def train(**hp):
        p = torch.ones(5, dtype=DT, requires_grad=True)
        opt = optim.create("mtdao", [p], lr=0.01, **hp)
        for grads in _quadratic_grads(6, shapes):
            p.grad = grads[0].clone()
            opt.step()
        return p.detach()

    assert torch.equal(train(betas=(0.5, 0.99), weights=(0.0,)), train(betas=(0.9, 0.99), weights=(0.0,)))
    torch.testing.assert_close(train(betas=(0.95, 0.95, 0.999), weights=(0.3, 0.4)),
                               train(betas=(0.95, 0.999), weights=(0.7,)), rtol=1e-12, atol=1e-14)


def _mtdao_reference(steps, kx, periods, hp, world=W):
    """MT-DAO in float64: every worker's mtdao step, then the averages due at step t (parameters every
    ``kx``, state j every ``periods[j]``: moments ``exp_avg``, ``exp_avg_2``, then ``exp_avg_sq``)."""
    m0 = _model()
    x = [[p.detach().clone() for p in m0.parameters()] for _ in range(world)]
    n = len(hp["weights"])
    us = [[[torch.zeros_like(p) for _ in range(n)] for p in xs] for xs in x]
    v = [[torch.zeros_like(p) for p in xs] for xs in x]
    for t in range(1, steps + 1):
        for r in range(world):
            wt, b = (p.clone().requires_grad_() for p in x[r])
            xb, yb = _batch(r, t)
            grads = torch.autograd.grad((xb @ wt.T + b - yb).square().mean(), [wt, b])
            for i, g in enumerate(grads):
                x[r][i], us[r][i], v[r][i] = _reference_step(x[r][i], us[r][i], v[r][i], g, t, hp["lr"], hp["betas"],
                                                             hp["weights"], 1e-8, 0.0)
        if t % kx == 0:
            for i in range(2):
                mean = sum(x[r][i] for r in range(world)) / world
                for r in range(world):
                    x[r][i] = mean.clone()
        for j, period in enumerate(periods):
            if t % period:
                continue
            for i in range(2):
                if j < n:
                    mean = sum(us[r][i][j] for r in range(world)) / world
                    for r in range(world):
                        us[r][i][j] = mean.clone()
                else:
                    mean = sum(v[r][i] for r in range(world)) / world
                    for r in range(world):
                        v[r][i] = mean.clone()
    return x, us, v


def test_mtdao_under_desloc_matches_float64_reference():
    hp = dict(lr=0.05, betas=(0.9, 0.99, 0.999), weights=(0.4, 0.4))
    workers, group, _ = _train("desloc", {"sync_every": 2, "sync_u": 2, "sync_v": 6, "state_sync": {"exp_avg_2": 4}},
                               lambda params: optim.create("mtdao", params, **hp), 12)
    x, us, v = _mtdao_reference(12, 2, [2, 4, 6], hp)
    for r, w in enumerate(workers):
        for i, p in enumerate(w.params):
            st = w.optimizer.state[p]
            torch.testing.assert_close(p.detach(), x[r][i], **TOL)
            torch.testing.assert_close(st["exp_avg"], us[r][i][0], **TOL)
            torch.testing.assert_close(st["exp_avg_2"], us[r][i][1], **TOL)
            torch.testing.assert_close(st["exp_avg_sq"], v[r][i], **TOL)
    assert math.isfinite(group.bytes_sent) and group.bytes_sent > 0


BASE = dict(task="digits", lr=3e-3, batch_size=16, workers=2, device="cpu", step_time=0.01, log_every=1,
            eval_every=5, steps=10, strategy="desloc")


def _final(out):
    ck = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    recs = read_metrics(Path(out) / "metrics.jsonl")
    return ck["workers"][0]["model"], [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]


def test_one_moment_reduces_to_desloc_with_adamw_bit_for_bit(tmp_path):
    args = {"sync_every": 2, "sync_u": 4, "sync_v": 4}
    # sgdlab builds torch's AdamW fused by default (other bits); its for-loop path is the same arithmetic
    a = Config(**BASE, optimizer="adamw", strategy_args=args,
               optimizer_args={"betas": [0.9, 0.999], "weight_decay": 0.01, "foreach": False}, out=str(tmp_path / "a"))
    b = Config(**BASE, optimizer="mtdao", optimizer_args={"betas": [0.9, 0.999], "weights": [1.0],
                                                          "weight_decay": 0.01},
               strategy_args=args, out=str(tmp_path / "b"))
    run(a)
    run(b)
    (ma, ra), (mb, rb) = _final(a.out), _final(b.out)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert ra == rb


def test_runner_resume_is_bit_identical(tmp_path):
    kw = dict(**BASE, optimizer="mtdao", optimizer_args={"betas": [0.9, 0.995, 0.999], "weights": [0.3, 0.5]},
              strategy_args={"sync_every": 2, "sync_u": 2, "sync_v": 2, "state_sync": {"exp_avg_2": 6}})
    whole, part = Config(**kw, out=str(tmp_path / "w")), Config(**kw, out=str(tmp_path / "p"))
    run(whole)
    run(part, stop_at=5)
    run(part, resume=True)
    (ma, ra), (mb, rb) = _final(whole.out), _final(part.out)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert ra == rb


@pytest.mark.parametrize("hp, msg", [
    ({"weights": [0.7, 0.5], "betas": [0.9, 0.99, 0.999]}, r"weights=\(0.7, 0.5\) sum to 1.2; allowed: sum <= 1"),
    ({"weights": [0.7], "betas": [0.9, 0.99, 0.999]}, r"do not match: betas holds one decay rate per weight, then "
                                                       r"beta2 \(2 values for 1 weights\)"),
    ({"betas": 0.9}, r"hyperparameter betas of optimizer .mtdao. must be tuple"),
    ({"weights": [-0.1]}, r"weights\[0\]=-0.1 is out of range"),
    ({"weights": []}, r"weights must be a non-empty tuple"),
    ({"betas": [0.9, 1.0]}, r"betas\[1\]=1.0 is out of range"),
])
def test_bad_hyperparameters_are_one_config_error(hp, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(task="digits", optimizer="mtdao", optimizer_args=hp).validate()


def test_set_syntax():
    cfg = Config(task="digits", optimizer="mtdao", strategy="desloc").set("weights=[0.3, 0.4]").set(
        "betas=[0.9, 0.99, 0.999]").set("state_sync={exp_avg_2=96}")
    cfg.validate()
    assert cfg.optimizer_args == {"weights": [0.3, 0.4], "betas": [0.9, 0.99, 0.999]}
    assert cfg.strategy_args == {"state_sync": {"exp_avg_2": 96}}
