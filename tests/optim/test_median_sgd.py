"""Tests for sgdlab.optim.median_sgd.MedianSGD against the rule of Schaipp et al. (TMLR 2025, arXiv:2402.12828)."""

import math

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim.median_sgd import MedianSGD

SHAPES = [(7,), (5, 3)]
DT = torch.float64


def reference(params, grads_per_step, lr, tau, norm):
    xs = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        r = [g - m for g, m in zip(grads, ms, strict=True)]
        if norm == "coordinate":
            r = [ri.clamp(-tau, tau) for ri in r]
        elif norm == "tensor":
            r = [ri * min(1.0, tau / max(float(ri.norm()), 1e-300)) for ri in r]
        else:
            total = math.sqrt(sum(float((ri ** 2).sum()) for ri in r))
            r = [ri * min(1.0, tau / max(total, 1e-300)) for ri in r]
        ms = [m + ri for m, ri in zip(ms, r, strict=True)]
        xs = [x - lr * m for x, m in zip(xs, ms, strict=True)]
    return xs, ms


def _grads(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[3 * torch.randn(s, generator=gen, dtype=DT) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("norm", ["group", "tensor", "coordinate"])
def test_matches_reference(norm):
    init = [torch.randn(s, dtype=DT) for s in SHAPES]
    params = [p.clone().requires_grad_() for p in init]
    opt = MedianSGD(params, lr=0.05, tau=0.7, norm=norm)
    grads = _grads(12, 1)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    xs, ms = reference(init, grads, 0.05, 0.7, norm)
    for p, x, m in zip(params, xs, ms, strict=True):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["median"], m, rtol=1e-12, atol=1e-13)


def test_first_step_is_sgd_with_clip_grad_norm_and_tau_inf_is_sgd():
    init = [torch.randn(s, dtype=DT) for s in SHAPES]
    grads = _grads(5, 2)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt = MedianSGD(ours, lr=0.1, tau=1.5)
    for p, q, g in zip(ours, theirs, grads[0], strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    torch.optim.SGD(theirs, lr=0.1).step()
    for p, q in zip(ours, theirs, strict=True):  # clip_grad_norm_ divides by (norm + 1e-6)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt_a, opt_b = MedianSGD(ours, lr=0.1, tau=math.inf), torch.optim.SGD(theirs, lr=0.1)
    for gs in grads:
        for p, q, g in zip(ours, theirs, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("norm", ["group", "tensor"])
def test_the_estimate_moves_at_most_tau(norm):
    params = [torch.zeros(s, dtype=DT, requires_grad=True) for s in SHAPES]
    opt = MedianSGD(params, lr=0.01, tau=0.3, norm=norm)
    for gs in _grads(10, 3):
        before = [opt.state[p]["median"].clone() if p in opt.state else torch.zeros_like(p) for p in params]
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        moves = [torch.linalg.vector_norm(opt.state[p]["median"] - b).item() for p, b in zip(params, before,
                                                                                                strict=True)]
        if norm == "group":
            assert math.sqrt(sum(m * m for m in moves)) <= 0.3 * (1 + 1e-12)
        else:
            assert max(moves) <= 0.3 * (1 + 1e-12)


def test_coordinate_median_of_a_cauchy_stream():
    """Cauchy(c, 1) samples (no mean): with a decaying tau the coordinate-wise estimate settles near c, an EMA
    does not."""
    c = torch.tensor([2.0, -1.0, 0.5], dtype=DT)
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = MedianSGD([p], lr=0.0, tau=1.0, norm="coordinate")
    ema = torch.zeros(3, dtype=DT)
    worst_ema = 0.0
    for t in range(1, 8001):
        g = c + torch.tan(math.pi * (torch.rand(3, generator=gen, dtype=DT) - 0.5))
        opt.param_groups[0]["tau"] = 1.0 / math.sqrt(t)
        p.grad = g
        opt.step()
        ema = 0.99 * ema + 0.01 * g
        if t > 4000:
            worst_ema = max(worst_ema, (ema - c).abs().max().item())
    assert (opt.state[p]["median"] - c).abs().max().item() < 0.2
    assert worst_ema > 0.3


@pytest.mark.parametrize("kw, pattern", [(dict(tau=0.0), r"tau=0\.0"), (dict(tau=-1.0), "tau"),
                                         (dict(norm="l2"), r"norm='l2'.*group, tensor, coordinate"),
                                         (dict(lr=-1.0), "lr")])
def test_bad_hyperparameters(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MedianSGD([torch.zeros(2, requires_grad=True)], **kw)
