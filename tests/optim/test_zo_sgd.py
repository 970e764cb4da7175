"""Zeroth-order SGD (MeZO, Malladi et al. 2023): the exact projected gradient for a fixed seed (z replayed in the
test), the estimate's expectation and second moment against the true gradient (Monte Carlo, float64), the
restore of theta, forward-only evaluation, and convergence on a well-conditioned quadratic."""

import math

import pytest
import torch

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim import protocol
from sgdlab.optim.zo_sgd import ZOSGD

DT = torch.float64


def quadratic(seed=0, shapes=((3, 2), (4,))):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=DT).requires_grad_() for s in shapes]
    d = sum(p.numel() for p in ps)
    q = torch.randn(d, d, generator=gen, dtype=DT)
    a = q @ q.T / d + torch.eye(d, dtype=DT)
    b = torch.randn(d, generator=gen, dtype=DT)

    def flat(w):
        return torch.cat([t.reshape(-1) for t in w])

    def loss(w=ps):
        x = flat(w)
        return 0.5 * x @ a @ x - b @ x
    return ps, loss, lambda w: a @ flat(w) - b


def replay(params, seed):
    """z for ``params`` in order from one generator seeded with ``seed`` (how MeZO regenerates it)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def test_one_step_is_the_exact_projected_gradient_step_for_its_seed():
    ps, loss, grad = quadratic()
    w0 = [p.detach().clone() for p in ps]
    lr, wd = 0.05, 0.1
    opt = ZOSGD(ps, lr=lr, eps=1e-3, weight_decay=wd, seed=7)
    returned = opt.step(loss)
    (seed,) = opt.seeds(1)
    z = replay(w0, seed)
    p_true = float(grad(w0) @ torch.cat([t.reshape(-1) for t in z]))  # the central difference is exact here
    assert opt.last_projected[0] == pytest.approx(p_true, rel=1e-8)
    plus = loss([w + 1e-3 * zi for w, zi in zip(w0, z, strict=True)])
    assert returned.item() == pytest.approx(plus.item(), rel=1e-12)  # l+ of the first direction
    for p, w, zi in zip(ps, w0, z, strict=True):
        expected = w - lr * (opt.last_projected[0] * zi + wd * w)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_n_directions_average_their_estimates():
    ps, loss, grad = quadratic(1)
    w0 = [p.detach().clone() for p in ps]
    opt = ZOSGD(ps, lr=0.1, n=3, seed=2)
    opt.step(loss)
    zs = [replay(w0, s) for s in opt.seeds(1)]
    g = grad(w0)
    for j, z in enumerate(zs):
        assert opt.last_projected[j] == pytest.approx(float(g @ torch.cat([t.reshape(-1) for t in z])), rel=1e-8)
    for i, p in enumerate(ps):
        expected = w0[i] - 0.1 * sum(pj * z[i] for pj, z in zip(opt.last_projected, zs, strict=True)) / 3
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_expectation_is_the_gradient_and_second_moment_is_d_plus_2_times_its_norm():
    """E[p z] = grad f and E||p z||^2 = (d + 2) ||grad f||^2 for Gaussian z (Monte Carlo, 4-sigma bounds)."""
    ps, loss, grad = quadratic(2)
    n = 4000
    opt = ZOSGD(ps, lr=0.0, n=n, seed=3)  # lr = 0: theta stays, the estimates are read back
    opt.step(loss)
    g = grad(ps).detach()
    d = g.numel()
    est = torch.stack([pj * torch.cat([t.reshape(-1) for t in replay(ps, s)])
                       for pj, s in zip(opt.last_projected, opt.seeds(1), strict=True)])
    mean, sd = est.mean(0), est.std(0) / math.sqrt(n)
    assert ((mean - g).abs() <= 4 * sd).all()
    second = est.square().sum(1)
    expected = (d + 2) * g.square().sum()
    assert abs(second.mean() - expected) <= 4 * second.std() / math.sqrt(n)


def test_theta_is_restored_after_the_evaluations_and_the_closure_has_no_graph():
    ps, loss, _ = quadratic(3)
    w0 = [p.detach().clone() for p in ps]
    grad_modes = []

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        out = loss()
        assert out.grad_fn is None
        return out
    opt = ZOSGD(ps, lr=0.0, n=5)
    opt.step(closure)
    assert grad_modes == [False] * 10
    for p, w in zip(ps, w0, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-15)
    assert all(p.grad is None for p in ps)


def test_protocol_declares_forward_only_closure_steps():
    need = protocol.needs(optim.create("zo-sgd", [torch.zeros(2, requires_grad=True)]))
    assert need.closure and not need.backward


def test_converges_on_a_well_conditioned_quadratic():
    ps, loss, grad = quadratic(4)
    opt = optim.create("zo-sgd", ps, lr=0.05)
    ctx = protocol.StepContext(loss=loss)
    for _ in range(1500):
        protocol.forward_backward(opt, ctx)
        protocol.step(opt, ctx)
    assert grad(ps).norm() < 1e-3


def test_state_dict_restores_the_seed_sequence():
    a, loss_a, _ = quadratic(5)
    b, loss_b, _ = quadratic(5)
    opt_a = ZOSGD(a, lr=0.05, seed=11)
    for _ in range(3):
        opt_a.step(loss_a)
    opt_b = ZOSGD(b, lr=0.05, seed=0)
    for p, q in zip(a, b, strict=True):
        q.data.copy_(p.data)
    opt_b.load_state_dict(opt_a.state_dict())
    for _ in range(3):
        opt_a.step(loss_a)
        opt_b.step(loss_b)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("kw, pattern", [({"eps": 0.0}, r"eps=0\.0"), ({"n": 0}, "n=0"),
                                         ({"n": 1.5}, r"\bn\b.*must be an integer"), ({"seed": -1}, "seed=-1"),
                                         ({"weight_decay": -1.0}, "weight_decay"), ({"lr": -1.0}, "lr")])
def test_bad_hyperparameters_are_config_errors_naming_them(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create("zo-sgd", [torch.zeros(2, requires_grad=True)], **kw)


def test_step_without_a_closure_says_what_it_needs():
    with pytest.raises(RuntimeError, match="closure"):
        ZOSGD([torch.zeros(2, requires_grad=True)]).step()
