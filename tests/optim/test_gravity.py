"""Tests for sgdlab.optim.gravity.Gravity against the paper's rule (Bahrami & Pouriyan Zadeh, arXiv:2101.09192)
and pytorch_optimizer.Gravity."""

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim.gravity import Gravity

SHAPES = [(7,), (5, 3), (2, 2, 3)]
DT = torch.float64


def reference(params, v0s, grads_per_step, lr, beta):
    """The paper's update, one tensor at a time, from given initial velocities (t counted from 1)."""
    params = [p.clone() for p in params]
    vs = [v.clone() for v in v0s]
    for t, grads in enumerate(grads_per_step, start=1):
        beta_hat = (beta * t + 1) / (t + 2)
        for i, g in enumerate(grads):
            big_m = g.abs().max()
            zeta = g / (1 + (g * big_m) ** 2)
            vs[i] = beta_hat * vs[i] + (1 - beta_hat) * zeta
            params[i] = params[i] - lr * vs[i]
    return params, vs


def _grads(steps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(s, generator=gen, dtype=DT) for s in SHAPES] for _ in range(steps)]


def _init(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("path", ["foreach", "eager", "compiled"])
def test_matches_reference(path):
    foreach, compiled = {"foreach": (True, False), "eager": (False, False), "compiled": (None, True)}[path]
    init = _init()
    params = [p.clone().requires_grad_() for p in init]
    opt = Gravity(params, lr=0.05, alpha=0.02, beta=0.8, seed=3, foreach=foreach, compiled=compiled)
    grads = _grads(15, 2, scale=3.0)
    p0 = [p.detach().clone() for p in params]
    for p, g in zip(params, grads[0], strict=True):
        p.grad = g.clone()
    opt.step()
    # v_0 from theta_1 = theta_0 - lr (b v_0 + (1 - b) zeta_0), b = (beta + 1) / 3
    b = (0.8 + 1) / 3
    v0s = []
    for p, q, g in zip(params, p0, grads[0], strict=True):
        zeta = g / (1 + (g * g.abs().max()) ** 2)
        v0s.append(((q - p.detach()) / 0.05 - (1 - b) * zeta) / b)
    _run(opt, params, grads[1:])
    ref, vs = reference(init, v0s, grads, 0.05, 0.8)
    for p, rp, v in zip(params, ref, vs, strict=True):
        torch.testing.assert_close(p.detach(), rp, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(opt.state[p]["v"], v, rtol=1e-9, atol=1e-11)


def test_initial_velocity_is_seeded_with_std_alpha_over_lr():
    p = torch.zeros(20000, dtype=DT, requires_grad=True)
    opt = Gravity([p], lr=0.1, alpha=0.01, seed=7)
    p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: zeta = 0, v_1 = b v_0, p_1 = -lr b v_0
    v1 = opt.state[p]["v"] / ((0.9 + 1) / 3)
    assert abs(v1.std().item() - 0.1) < 3e-3 and abs(v1.mean().item()) < 3e-3
    q = torch.zeros(20000, dtype=DT, requires_grad=True)
    opt2 = Gravity([q], lr=0.1, alpha=0.01, seed=7)
    q.grad = torch.zeros_like(q)
    opt2.step()
    assert torch.equal(p, q)  # same seed, same start


def test_alpha_zero_first_step_and_zeta_bound():
    """alpha = 0: v_0 = 0 and theta_1 = theta_0 - lr (1 - b_1) zeta_0; |zeta| <= min(|g|, 1 / (2 M))."""
    g = torch.tensor([5.0, -0.1, 0.3, 2.0, -4.0], dtype=DT)
    p = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = Gravity([p], lr=0.1, alpha=0.0)
    p.grad = g.clone()
    opt.step()
    zeta = g / (1 + (g * 5.0) ** 2)
    torch.testing.assert_close(p.detach(), -0.1 * (1 - 1.9 / 3) * zeta, rtol=1e-12, atol=0)
    assert (zeta.abs() <= torch.minimum(g.abs(), torch.full_like(g, 1 / 10)) + 1e-15).all()


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_pytorch_optimizer(foreach):
    po = pytest.importorskip("pytorch_optimizer")
    init = _init(5)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=0.05, alpha=0.01, beta=0.9)
    opt_a = Gravity(ours, foreach=foreach, compiled=False, **kw)
    opt_b = po.Gravity(theirs, foreach=foreach, **kw)
    grads = _grads(20, 6, scale=2.0)
    for a, g in zip(ours, grads[0], strict=True):  # create our v_0, then hand it to theirs
        a.grad = torch.zeros_like(g)
    opt_a._prepare([(opt_a.param_groups[0], ours)])
    for a, b in zip(ours, theirs, strict=True):
        opt_b.state[b]["v"] = opt_a.state[a]["v"].clone()
    for gs in grads:
        for a, b, g in zip(ours, theirs, gs, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt_a.state[a]["v"], opt_b.state[b]["v"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw, pattern", [(dict(alpha=-0.1), "alpha"), (dict(alpha=float("inf")), "alpha"),
                                         (dict(beta=1.5), "beta"), (dict(beta=-0.1), "beta"),
                                         (dict(seed=-1), "seed"), (dict(lr=-1.0), "lr")])
def test_bad_hyperparameters(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Gravity([torch.zeros(2, requires_grad=True)], **kw)
