"""Tests for sgdlab.optim.coord_clip.CoordClipSGD against the rule of Pan & Li (arXiv:2306.00204)."""

import math

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim.coord_clip import CoordClipSGD

SHAPES = [(7,), (5, 3), (2, 2, 3)]
DT = torch.float64


def reference(params, grads_per_step, lr, momentum, wd, p_frac):
    """Clip the top ceil(p d) |u_i| of the whole list to the k-th largest value (sorting all coordinates)."""
    xs = [x.clone() for x in params]
    bufs = [torch.zeros_like(x) for x in params]
    for grads in grads_per_step:
        us = [g + wd * x for g, x in zip(grads, xs, strict=True)]
        if momentum:
            bufs = [momentum * b + u for b, u in zip(bufs, us, strict=True)]
            us = bufs
        flat = torch.cat([u.reshape(-1) for u in us])
        k = math.ceil(p_frac * flat.numel())
        if k:
            tau = flat.abs().sort(descending=True).values[k - 1]
            us = [u.sign() * torch.minimum(u.abs(), tau) for u in us]
        xs = [x - lr * u for x, u in zip(xs, us, strict=True)]
    return xs


def _grads(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=DT) ** 3 for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("momentum, wd, frac", [(0.0, 0.0, 0.1), (0.9, 0.01, 0.05), (0.5, 0.0, 1.0)])
def test_matches_reference(momentum, wd, frac):
    init = [torch.randn(s, dtype=DT) for s in SHAPES]
    params = [p.clone().requires_grad_() for p in init]
    opt = CoordClipSGD(params, lr=0.05, momentum=momentum, weight_decay=wd, clip_fraction=frac)
    grads = _grads(10, 1)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, gs, strict=True))  # grads left alone
    for p, x in zip(params, reference(init, grads, 0.05, momentum, wd, frac), strict=True):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_fraction_is_torch_sgd(momentum):
    init = [torch.randn(s, dtype=DT) for s in SHAPES]
    ours, theirs = [p.clone().requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]
    opt_a = CoordClipSGD(ours, lr=0.1, momentum=momentum, weight_decay=0.01, clip_fraction=0.0)
    opt_b = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=0.01)
    for gs in _grads(8, 2):
        for a, b, g in zip(ours, theirs, gs, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_exactly_ceil_pd_coordinates_end_at_the_threshold():
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    d = sum(g.numel() for g in gs)
    params = [torch.zeros(s, dtype=DT, requires_grad=True) for s in SHAPES]
    opt = CoordClipSGD(params, lr=1.0, clip_fraction=0.07)
    for p, g in zip(params, gs, strict=True):
        p.grad = g.clone()
    opt.step()
    u = torch.cat([-p.detach().reshape(-1) for p in params])
    tau = u.abs().max()
    assert int((u.abs() == tau).sum()) == math.ceil(0.07 * d)
    assert torch.equal(u.sign(), torch.cat([g.reshape(-1) for g in gs]).sign())


def test_clipping_lowers_the_directional_sharpness():
    """A quadratic with a few high-curvature, large-gradient coordinates: the clipped update has a lower
    u^T H u / ||u||^2, and gradient descent with it stays stable at a step where plain GD diverges."""
    h = torch.ones(50, dtype=DT)
    h[:3] = 100.0
    x0 = torch.ones(50, dtype=DT)
    x0[:3] = 5.0

    def sharpness(u):
        return float((u * h * u).sum() / (u * u).sum())

    g = h * x0
    p = x0.clone().requires_grad_()
    opt = CoordClipSGD([p], lr=1.0, clip_fraction=0.1)
    p.grad = g.clone()
    opt.step()
    u = x0 - p.detach()
    assert sharpness(u) < sharpness(g) / 10

    def final_loss(frac, lr=0.05, steps=60):
        q = x0.clone().requires_grad_()
        o = CoordClipSGD([q], lr=lr, clip_fraction=frac)
        for _ in range(steps):
            q.grad = h * q.detach()
            o.step()
        return float(0.5 * (h * q.detach() ** 2).sum())

    assert final_loss(0.0) > 1e6 and final_loss(0.1) < 0.5 * (h * x0 ** 2).sum().item()


@pytest.mark.parametrize("kw, pattern", [(dict(clip_fraction=1.5), r"clip_fraction=1\.5"),
                                         (dict(clip_fraction=-0.1), "clip_fraction"), (dict(momentum=1.0), "momentum"),
                                         (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=-1.0), "lr")])
def test_bad_hyperparameters(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        CoordClipSGD([torch.zeros(2, requires_grad=True)], **kw)
