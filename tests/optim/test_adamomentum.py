"""Tests for sgdlab.optim.adamomentum.AdaMomentum against the paper's rule (Wang et al., arXiv:2106.11514)."""

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim.adamomentum import AdaMomentum

SHAPES = [(7,), (5, 3), (2, 2, 3)]
DT = torch.float64


def reference(params, grads_per_step, lr, betas, eps, wd):
    """The paper's update, one parameter at a time (eps added to v every step, no outer eps)."""
    params = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * ms[i] * ms[i] + eps
            m_hat, v_hat = ms[i] / (1 - b1 ** t), vs[i] / (1 - b2 ** t)
            params[i] = params[i] * (1 - lr * wd) - lr * m_hat / torch.sqrt(v_hat)
    return params, ms, vs


def _grads(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=DT) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("path, wd", [("foreach", 0.0), ("eager", 0.0), ("foreach", 0.1), ("eager", 0.1),
                                      ("compiled", 0.1), ("group", 0.1)])
def test_matches_reference(path, wd):
    foreach, compiled = {"foreach": (True, False), "eager": (False, False), "compiled": (None, True),
                         "group": (None, "group")}[path]
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    params = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    opt = AdaMomentum(params, foreach=foreach, compiled=compiled, **kw)
    grads = _grads(20, 2)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    ref, ms, vs = reference(init, grads, kw["lr"], kw["betas"], kw["eps"], wd)
    tol = dict(rtol=1e-10, atol=1e-12)
    for p, rp, m, v in zip(params, ref, ms, vs, strict=True):
        torch.testing.assert_close(p.detach(), rp, **tol)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, **tol)
        torch.testing.assert_close(opt.state[p]["exp_avg_var"], v, **tol)


def test_first_step_with_a_constant_gradient_is_lr_over_one_minus_beta1():
    """v^_1 = (1 - beta1)^2 g^2 and m^_1 = g: the first step is -lr sign(g) / (1 - beta1) (Adam's: -lr sign(g));
    with a constant gradient it tends to -lr sign(g)."""
    g = torch.tensor([3.0, -0.2, 1e-3], dtype=DT)
    p = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = AdaMomentum([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-30)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), -1e-3 * g.sign() / 0.1, rtol=1e-9, atol=0)
    before = p.detach().clone()
    for _ in range(3000):
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
    torch.testing.assert_close(p.detach() - before, -1e-3 * g.sign(), rtol=2e-2, atol=0)


def test_v_is_at_least_the_accumulated_eps():
    p = torch.zeros(4, dtype=DT, requires_grad=True)
    eps, b2 = 1e-6, 0.99
    opt = AdaMomentum([p], betas=(0.9, b2), eps=eps)
    for t in range(1, 30):
        p.grad = torch.zeros(4, dtype=DT) if t % 3 else torch.randn(4, dtype=DT)
        opt.step()
        floor = eps * (1 - b2 ** t) / (1 - b2)
        assert (opt.state[p]["exp_avg_var"] >= floor * (1 - 1e-12)).all()


@pytest.mark.parametrize("kw, pattern", [(dict(eps=0.0), r"eps=0\.0"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
                                         (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=-1.0), "lr")])
def test_bad_hyperparameters(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        AdaMomentum([torch.zeros(2, requires_grad=True)], **kw)
