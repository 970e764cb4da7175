"""Tests for sgdlab.optim.dog.DoG / LDoG against the rule of Ivgi, Hinder & Carmon (ICML 2023, arXiv:2302.12022)."""

import math

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim.dog import DoG, LDoG

SHAPES = [(7,), (5, 3), (2, 2, 3)]
DT = torch.float64


def reference(params, grads_per_step, lr, reps_rel, eps, weight_decay, layerwise):
    """DoG (the whole list as one vector) or L-DoG (each tensor alone), plain loops; returns params and etas."""
    xs = [p.clone() for p in params]
    x0 = [p.clone() for p in params]
    blocks = [[i] for i in range(len(xs))] if layerwise else [list(range(len(xs)))]
    rbar, big_g, etas = {}, {}, []
    for t, grads in enumerate(grads_per_step):
        grads = [g + weight_decay * x for g, x in zip(grads, xs, strict=True)]
        step_etas = []
        for k, blk in enumerate(blocks):
            gsq = sum(float((grads[i] ** 2).sum()) for i in blk)
            if t == 0:
                rbar[k] = reps_rel * (1 + math.sqrt(sum(float((xs[i] ** 2).sum()) for i in blk)))
                big_g[k] = gsq + eps
            else:
                dist = math.sqrt(sum(float(((xs[i] - x0[i]) ** 2).sum()) for i in blk))
                rbar[k] = max(rbar[k], dist)
                big_g[k] += gsq
            eta = lr * rbar[k] / math.sqrt(big_g[k])
            step_etas.append(eta)
            for i in blk:
                xs[i] = xs[i] - eta * grads[i]
        etas.append(step_etas)
    return xs, etas


def _grads(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=DT) * (1 + t) for s in SHAPES] for t in range(steps)]


def _init(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]


@pytest.mark.parametrize("cls", [DoG, LDoG])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_reference(cls, wd):
    init = _init()
    params = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=1.0, reps_rel=1e-2, eps=1e-8, weight_decay=wd)
    opt = cls(params, **kw)
    grads = _grads(12, 2)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    ref, etas = reference(init, grads, layerwise=cls is LDoG, **kw)
    for i, (p, rp) in enumerate(zip(params, ref, strict=True)):
        torch.testing.assert_close(p.detach(), rp, rtol=1e-10, atol=1e-12)
        want = etas[-1][i if cls is LDoG else 0]
        assert opt.state[p]["eta"].item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_first_step_moves_r_eps_times_the_normalised_gradient(cls):
    """||x_1 - x_0|| = reps_rel (1 + ||x_0||) ||g_0|| / sqrt(||g_0||^2 + eps); exactly r_eps with eps = 0."""
    init = _init(3)
    grads = _grads(1, 4)[0]
    for eps in (0.0, 1e-3):
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, reps_rel=1e-4, eps=eps)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        blocks = [[i] for i in range(3)] if cls is LDoG else [[0, 1, 2]]
        for blk in blocks:
            x_norm = math.sqrt(sum(float((init[i] ** 2).sum()) for i in blk))
            g_norm = math.sqrt(sum(float((grads[i] ** 2).sum()) for i in blk))
            moved = math.sqrt(sum(float(((params[i].detach() - init[i]) ** 2).sum()) for i in blk))
            want = 1e-4 * (1 + x_norm) * g_norm / math.sqrt(g_norm ** 2 + eps)
            assert moved == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_scale_invariance_with_eps_zero(cls):
    """eta scales by 1/c when the gradients scale by c, so f and c f give the same trajectory."""
    init = _init(5)
    runs = []
    for c in (1.0, 37.0):
        x = [p.clone().requires_grad_() for p in init]
        opt = cls(x, eps=0.0, reps_rel=1e-3)
        for _ in range(15):
            opt.zero_grad()
            (c * sum(((xi - 0.5) ** 4).sum() + xi.sum() for xi in x)).backward()
            opt.step()
        runs.append([xi.detach() for xi in x])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_ldog_on_one_tensor_is_dog():
    init = torch.randn(4, 3, dtype=DT)
    out = []
    for cls in (DoG, LDoG):
        p = init.clone().requires_grad_()
        opt = cls([p], reps_rel=1e-3)
        for t in range(10):
            p.grad = torch.sin(p.detach() * (t + 1))
            opt.step()
        out.append(p.detach())
    assert torch.equal(*out)


def test_dog_is_one_step_size_over_the_group_and_invariant_to_splitting():
    """DoG treats the group as one vector: splitting a vector into two tensors changes nothing."""
    init = torch.randn(10, dtype=DT)
    whole = init.clone().requires_grad_()
    halves = [init[:4].clone().requires_grad_(), init[4:].clone().requires_grad_()]
    opt_a, opt_b = DoG([whole], reps_rel=1e-2), DoG(halves, reps_rel=1e-2)
    for t in range(10):
        whole.grad = torch.cos(whole.detach() * (t + 1))
        g = torch.cos(torch.cat([h.detach() for h in halves]) * (t + 1))
        halves[0].grad, halves[1].grad = g[:4].clone(), g[4:].clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(whole.detach(), torch.cat([h.detach() for h in halves]), rtol=1e-12, atol=1e-14)
    assert opt_b.state[halves[0]]["eta"].item() == opt_b.state[halves[1]]["eta"].item()


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_eta_times_root_g_is_non_decreasing(cls):
    params = [p.clone().requires_grad_() for p in _init(7)]
    opt = cls(params, reps_rel=1e-3)
    last = [0.0] * len(params)
    for t, gs in enumerate(_grads(20, 8)):
        for p, g in zip(params, gs, strict=True):
            p.grad = g * (-1) ** t
        opt.step()
        for i, p in enumerate(params):
            st = opt.state[p]
            now = (st["eta"] * st["G"].sqrt()).item()
            assert now >= last[i] * (1 - 1e-12)
            last[i] = now


def test_a_parameter_that_joins_later():
    """A parameter without a gradient at the first step joins later with x_0 = its value then."""
    a = torch.randn(3, dtype=DT, requires_grad=True)
    b = torch.randn(2, dtype=DT, requires_grad=True)
    b0 = b.detach().clone()
    opt = LDoG([a, b], reps_rel=1e-2)
    a.grad = torch.ones(3, dtype=DT)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), b0)
    b.grad = torch.ones(2, dtype=DT)
    a.grad = torch.ones(3, dtype=DT)
    opt.step()
    moved = torch.linalg.vector_norm(b.detach() - b0).item()
    assert moved == pytest.approx(1e-2 * (1 + torch.linalg.vector_norm(b0).item()) * math.sqrt(2) /
                                  math.sqrt(2 + 1e-8), rel=1e-12)


@pytest.mark.parametrize("cls", [DoG, LDoG])
@pytest.mark.parametrize("kw, pattern", [(dict(reps_rel=0.0), r"reps_rel=0\.0"), (dict(eps=-1.0), r"eps=-1\.0"),
                                         (dict(weight_decay=-0.1), "weight_decay"), (dict(lr=-1.0), "lr"),
                                         (dict(maximize=1), "maximize")])
def test_bad_hyperparameters(cls, kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cls([torch.zeros(2, requires_grad=True)], **kw)
