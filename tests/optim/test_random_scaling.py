"""Tests for sgdlab.optim.random_scaling.RandomScalingSGDM against the rule of Zhang & Cutkosky (ICML 2024,
arXiv:2405.09742)."""

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim.random_scaling import RandomScalingSGDM

SHAPES = [(7,), (5, 3)]
DT = torch.float64


def reference(params, grads_per_step, scales, lr, beta, wd):
    """x <- x + s_t Delta_t, Delta_t = -lr (m_t + wd x), m_t = beta m + (1 - beta) g; one tensor at a time."""
    xs = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    for grads, s in zip(grads_per_step, scales, strict=True):
        for i, g in enumerate(grads):
            ms[i] = beta * ms[i] + (1 - beta) * g
            xs[i] = xs[i] + s * (-lr * (ms[i] + wd * xs[i]))
    return xs, ms


def _grads(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=DT) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_matches_reference_with_the_seeded_exponential_scales(foreach, wd):
    init = [torch.randn(s, dtype=DT) for s in SHAPES]
    params = [p.clone().requires_grad_() for p in init]
    opt = RandomScalingSGDM(params, lr=0.05, beta=0.8, weight_decay=wd, seed=11, foreach=foreach)
    grads = _grads(15, 3)
    seen = []
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        seen.append(opt.scale)
    gen = torch.Generator().manual_seed(11)
    scales = [torch.empty((), dtype=DT).exponential_(generator=gen).item() for _ in grads]
    assert seen == scales
    xs, ms = reference(init, grads, scales, 0.05, 0.8, wd)
    for p, x, m in zip(params, xs, ms, strict=True):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=1e-12, atol=1e-13)


def test_every_tensor_moves_by_the_same_multiple_of_its_step():
    """One s per step, shared by every tensor of every group: the move over the unscaled step is s for all."""
    a, b = torch.randn(4, dtype=DT, requires_grad=True), torch.randn(3, 2, dtype=DT, requires_grad=True)
    opt = RandomScalingSGDM([{"params": [a]}, {"params": [b], "lr": 0.3}], lr=0.1, beta=0.0, seed=2)
    for _ in range(5):
        before = [a.detach().clone(), b.detach().clone()]
        a.grad, b.grad = torch.randn(4, dtype=DT), torch.randn(3, 2, dtype=DT)
        grads = [a.grad.clone(), b.grad.clone()]
        opt.step()
        ratios = [((q - p.detach()) / (lr * g)) for p, q, g, lr in zip([a, b], before, grads, [0.1, 0.3],
                                                                       strict=True)]
        for r in ratios:
            torch.testing.assert_close(r, torch.full_like(r, opt.scale), rtol=1e-10, atol=0)


def test_without_random_scaling_it_is_torch_sgd_with_dampening_beta_after_the_first_step():
    """random_scaling=False: m = beta m + (1 - beta) g is torch's buffer with dampening = beta once the buffers
    agree; start torch's from our first buffer and the steps coincide."""
    init = torch.randn(6, dtype=DT)
    ours, theirs = init.clone().requires_grad_(), init.clone().requires_grad_()
    opt_a = RandomScalingSGDM([ours], lr=0.1, beta=0.9, random_scaling=False)
    opt_b = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, dampening=0.9)
    g0 = torch.randn(6, dtype=DT)
    ours.grad = g0.clone()
    opt_a.step()
    theirs.data.copy_(ours.data)
    opt_b.state[theirs]["momentum_buffer"] = opt_a.state[ours]["momentum_buffer"].clone()
    for _ in range(10):
        g = torch.randn(6, dtype=DT)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-13, atol=1e-15)
        assert opt_a.scale == 1.0 or opt_a.param_groups[0]["random_scaling"] is False


def _scales(n, seed):
    p = torch.zeros(1, dtype=DT, requires_grad=True)
    opt = RandomScalingSGDM([p], lr=0.0, seed=seed)
    p.grad = torch.zeros(1, dtype=DT)
    draws = []
    for _ in range(n):
        opt.step()
        draws.append(opt.scale)
    return torch.tensor(draws, dtype=DT)


def test_scales_have_mean_one_and_second_moment_two():
    s = _scales(20000, 4)
    n = len(s)
    assert abs(s.mean().item() - 1) < 3 / n ** 0.5 and abs(s.square().mean().item() - 2) < 3 * 20 ** 0.5 / n ** 0.5


def test_exponential_scaling_identity_on_a_quadratic():
    """For s ~ Exp(1) and f = 0.5 x^T A x + b^T x: E[f(x + s D) - f(x)] = E[<grad f(x + s D), D>] = <grad f(x), D>
    + D^T A D (E s = 1, E s^2 = 2), checked by Monte Carlo (3 sigma) over the optimizer's own scales."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, generator=gen, dtype=DT)
    a_mat, b_vec = q @ q.T + torch.eye(4, dtype=DT), torch.randn(4, generator=gen, dtype=DT)
    x, d = torch.randn(4, generator=gen, dtype=DT), torch.randn(4, generator=gen, dtype=DT)
    s = _scales(20000, 9)[:, None]
    z = x + s * d
    lhs = 0.5 * ((z @ a_mat) * z).sum(1) + z @ b_vec - (0.5 * x @ a_mat @ x + b_vec @ x)
    rhs = (z @ a_mat + b_vec) @ d
    exact = ((a_mat @ x + b_vec) @ d + d @ a_mat @ d).item()
    for v in (lhs, rhs):
        assert abs(v.mean().item() - exact) < 3 * v.std().item() / len(v) ** 0.5


@pytest.mark.parametrize("kw, pattern", [(dict(beta=1.0), r"beta=1\.0"), (dict(weight_decay=-1.0), "weight_decay"),
                                         (dict(random_scaling=1), "random_scaling"), (dict(seed=-1), "seed"),
                                         (dict(lr=-1.0), "lr")])
def test_bad_hyperparameters(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RandomScalingSGDM([torch.zeros(2, requires_grad=True)], **kw)
