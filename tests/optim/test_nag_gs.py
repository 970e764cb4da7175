"""Tests for sgdlab.optim.nag_gs.NAGGS against the rule of Leplat et al. (arXiv:2209.14937), as the authors'
PyTorch class orders it (b from the stored gamma, v-update, gamma-update, x-update)."""

import numpy as np
import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim.nag_gs import NAGGS

SHAPES = [(7,), (5, 3)]
DT = torch.float64


def reference(params, grad_fn, steps, lrs, mu, gamma0):
    """NAG-GS one tensor at a time; ``grad_fn(params)`` gives the gradients at the current params, ``lrs[k]``
    the step alpha of step k."""
    xs = [p.clone() for p in params]
    vs = [p.clone() for p in params]
    gamma = gamma0
    for k in range(steps):
        alpha = lrs[k]
        a = alpha / (1 + alpha)
        b = alpha * mu / (alpha * mu + gamma)
        grads = grad_fn(xs)
        vs = [(1 - b) * v + b * x - (b / mu) * g for v, x, g in zip(vs, xs, grads, strict=True)]
        gamma = (1 - a) * gamma + a * mu
        xs = [(1 - a) * x + a * v for x, v in zip(xs, vs, strict=True)]
    return xs, vs, gamma


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference_with_a_schedule(foreach):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    scales = [torch.rand(s, generator=gen, dtype=DT) + 0.5 for s in SHAPES]

    def grad_fn(xs):  # gradient of sum_i 0.5 * scale_i (x_i - target_i)^2 + 0.1 sin(x_i)
        return [c * (x - t) + 0.1 * torch.cos(x) for x, t, c in zip(xs, targets, scales, strict=True)]

    lrs = [0.3 if k < 10 else 0.1 for k in range(25)]
    params = [p.clone().requires_grad_() for p in init]
    opt = NAGGS(params, lr=0.3, mu=0.7, gamma=2.0, foreach=foreach)
    for k in range(25):
        opt.param_groups[0]["lr"] = lrs[k]
        for p, g in zip(params, grad_fn([p.detach() for p in params]), strict=True):
            p.grad = g
        opt.step()
    xs, vs, gamma = reference(init, grad_fn, 25, lrs, 0.7, 2.0)
    for p, x, v in zip(params, xs, vs, strict=True):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["v"], v, rtol=1e-12, atol=1e-13)
        assert opt.state[p]["gamma"] == pytest.approx(gamma, rel=1e-14)


def test_first_step_is_sgd_with_lr_ab_over_mu():
    alpha, mu, gamma = 0.5, 2.0, 1.5
    a, b = alpha / (1 + alpha), alpha * mu / (alpha * mu + gamma)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    p = torch.tensor([0.3, 0.1, -0.7], dtype=DT, requires_grad=True)
    x0 = p.detach().clone()
    opt = NAGGS([p], lr=alpha, mu=mu, gamma=gamma)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), x0 - a * b / mu * g, rtol=1e-14, atol=0)


def test_gamma_equal_to_mu_is_a_fixed_point_nag4():
    """gamma_0 = mu keeps gamma = mu: the fixed-gamma NAG4 v <- (gamma v + alpha mu x - alpha g) / (gamma + alpha mu),
    x <- (x + alpha v) / (1 + alpha)."""
    alpha, mu = 0.2, 1.3
    p = torch.tensor([1.0, -1.0], dtype=DT, requires_grad=True)
    opt = NAGGS([p], lr=alpha, mu=mu, gamma=mu)
    x, v = p.detach().clone(), p.detach().clone()
    for _ in range(10):
        g = 3 * x + 1
        p.grad = 3 * p.detach() + 1
        opt.step()
        v = (mu * v + alpha * mu * x - alpha * g) / (mu + alpha * mu)
        x = (x + alpha * v) / (1 + alpha)
        assert opt.state[p]["gamma"] == pytest.approx(mu, rel=1e-15)
    torch.testing.assert_close(p.detach(), x, rtol=1e-13, atol=1e-14)


def test_quadratic_is_the_linear_recursion_and_converges():
    """On f = 0.5 x^T A x the step is a fixed linear map of (x, v) (here with gamma_0 = mu so it is constant);
    numpy's recursion gives the same iterates, and x = v = 0 is the fixed point that they approach."""
    a_mat = np.diag([1.0, 4.0, 10.0])
    alpha, mu = 0.05, 1.0
    a, b = alpha / (1 + alpha), alpha * mu / (alpha * mu + mu)
    n = 3
    m_v = np.hstack([b * np.eye(n) - (b / mu) * a_mat, (1 - b) * np.eye(n)])  # v' = [x; v] -> v'
    m_x = (1 - a) * np.hstack([np.eye(n), np.zeros((n, n))]) + a * m_v        # x' = (1 - a) x + a v'
    z = np.concatenate([np.ones(n), np.ones(n)])
    p = torch.ones(n, dtype=DT, requires_grad=True)
    opt = NAGGS([p], lr=alpha, mu=mu, gamma=mu)
    for _ in range(200):
        z = np.concatenate([m_x @ z, m_v @ z])
        p.grad = torch.from_numpy(a_mat) @ p.detach()
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), z[:n], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(opt.state[p]["v"].numpy(), z[n:], rtol=1e-10, atol=1e-13)
    assert np.abs(z).max() < 0.1


def test_readme_quadratic():
    """The authors' README example: ||x||^2 with alpha=0.05, mu=1, gamma=1.5 for 200 steps reaches ~1e-4."""
    p = torch.ones(10, dtype=DT, requires_grad=True)
    opt = NAGGS([p], lr=0.05, mu=1.0, gamma=1.5)
    for _ in range(200):
        p.grad = 2 * p.detach()
        opt.step()
    assert p.detach().square().sum().item() < 1e-3


@pytest.mark.parametrize("kw, pattern", [(dict(mu=0.0), r"mu=0\.0"), (dict(gamma=-1.0), r"gamma=-1\.0"),
                                         (dict(lr=-0.1), "lr"), (dict(foreach="yes"), "foreach")])
def test_bad_hyperparameters(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        NAGGS([torch.zeros(2, requires_grad=True)], **kw)
