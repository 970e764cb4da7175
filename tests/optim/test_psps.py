"""Tests for sgdlab.optim.psps.PSPS against the rule of Abdukhakimov et al. (arXiv:2310.02093)."""

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim import protocol
from sgdlab.optim.psps import PSPS

DT = torch.float64


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(12, 4, generator=gen, dtype=DT) * torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=DT)
    b = torch.randn(12, generator=gen, dtype=DT)
    w = torch.randn(4, generator=gen, dtype=DT)
    c = torch.randn(2, generator=gen, dtype=DT)
    return a, b, w, c


def _loss(a, b, w, c):  # a smooth non-quadratic loss over two tensors
    return torch.nn.functional.softplus(a @ w - b).mean() + 0.5 * (c ** 2).sum() + 0.1 * (c * w[:2]).sum()


def _step(opt, params, closure):
    ctx = protocol.StepContext(loss=closure)
    opt.zero_grad()
    protocol.forward_backward(opt, ctx)
    return protocol.step(opt, ctx)


def reference(a, b, w0, c0, steps, beta, alpha, init_samples, seed, lr=1.0, f_star=0.0):
    """PSPS with Hutchinson's D, written out: the probes are the optimizer's (same generator and order)."""
    w, c = w0.clone(), c0.clone()
    gen = torch.Generator().manual_seed(seed)

    def probe(shape):
        return torch.randint(0, 2, shape, generator=gen).to(DT).mul_(2).sub_(1)

    d = None
    for t in range(steps):
        wv, cv = w.clone().requires_grad_(), c.clone().requires_grad_()
        loss = _loss(a, b, wv, cv)
        gw, gc = torch.autograd.grad(loss, [wv, cv], create_graph=True)
        rounds = init_samples if t == 0 else 1
        est = [torch.zeros(4, dtype=DT), torch.zeros(2, dtype=DT)]
        for _ in range(rounds):
            zw, zc = probe((4,)), probe((2,))
            hw, hc = torch.autograd.grad([gw, gc], [wv, cv], grad_outputs=[zw, zc], retain_graph=True)
            est[0] += hw * zw
            est[1] += hc * zc
        est = [e / rounds for e in est]
        d = est if d is None else [beta * di + (1 - beta) * e for di, e in zip(d, est, strict=True)]
        dhat = [torch.clamp(di.abs(), min=alpha) for di in d]
        g = [gw.detach(), gc.detach()]
        n = sum(float((gi * gi / di).sum()) for gi, di in zip(g, dhat, strict=True))
        step = max(0.0, loss.item() - f_star) / n
        w = w - lr * step * g[0] / dhat[0]
        c = c - lr * step * g[1] / dhat[1]
    return w, c, d


def test_matches_reference():
    a, b, w0, c0 = _problem()
    w, c = w0.clone().requires_grad_(), c0.clone().requires_grad_()
    opt = PSPS([w, c], beta=0.9, alpha=1e-3, init_samples=7, seed=3)
    for _ in range(6):
        _step(opt, [w, c], lambda: _loss(a, b, w, c))
    rw, rc, rd = reference(a, b, w0, c0, 6, beta=0.9, alpha=1e-3, init_samples=7, seed=3)
    torch.testing.assert_close(w.detach(), rw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.detach(), rc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.state[w]["hessian_diag"], rd[0], rtol=1e-10, atol=1e-12)


def test_no_preconditioner_is_sps():
    """D^ = I: x <- x - (f - f*) / ||g||^2 g."""
    a, b, w0, c0 = _problem(1)
    w, c = w0.clone().requires_grad_(), c0.clone().requires_grad_()
    opt = PSPS([w, c], preconditioner="none", f_star=0.05)
    loss = _step(opt, [w, c], lambda: _loss(a, b, w, c))
    wv, cv = w0.clone().requires_grad_(), c0.clone().requires_grad_()
    gw, gc = torch.autograd.grad(_loss(a, b, wv, cv), [wv, cv])
    size = (loss.item() - 0.05) / (gw.square().sum() + gc.square().sum()).item()
    torch.testing.assert_close(w.detach(), w0 - size * gw, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c.detach(), c0 - size * gc, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_step_halves_a_single_sample_least_squares_residual(seed):
    """f = 0.5 (a^T x - b)^2: the step is (f / (g^T D^-1 g)) D^-1 g with g = r a, so r' = r / 2 for any D."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(5, generator=gen, dtype=DT), torch.randn((), generator=gen, dtype=DT)
    x = torch.randn(5, generator=gen, dtype=DT, requires_grad=True)
    r0 = (a @ x - b).item()
    opt = PSPS([x], alpha=1e-6, init_samples=3, seed=seed)  # D^ = max(alpha, |z * (a a^T z)|): some SPD diagonal
    _step(opt, [x], lambda: 0.5 * (a @ x - b) ** 2)
    assert (a @ x - b).item() == pytest.approx(r0 / 2, rel=1e-12)


def test_step_is_invariant_to_scaling_the_loss():
    """f -> c f scales g, D and f - f* (f* = 0) alike: the same step."""
    a, b, w0, c0 = _problem(2)
    out = []
    for scale in (1.0, 250.0):
        w, c = w0.clone().requires_grad_(), c0.clone().requires_grad_()
        opt = PSPS([w, c], alpha=1e-12, init_samples=4, seed=0)
        for _ in range(3):
            _step(opt, [w, c], lambda scale=scale, w=w, c=c: scale * _loss(a, b, w, c))
        out.append(torch.cat([w.detach(), c.detach()]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-12)


def test_a_loss_below_f_star_does_not_step_and_no_closure_is_an_error():
    x = torch.ones(3, dtype=DT, requires_grad=True)
    opt = PSPS([x], preconditioner="none", f_star=10.0)
    _step(opt, [x], lambda: (x ** 2).sum())
    assert torch.equal(x.detach(), torch.ones(3, dtype=DT))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("kw, pattern", [(dict(preconditioner="adam"), r"preconditioner='adam'.*hutchinson, none"),
                                         (dict(beta=1.0), r"beta=1\.0"), (dict(alpha=0.0), r"alpha=0\.0"),
                                         (dict(init_samples=0), "init_samples"), (dict(seed=-1), "seed"),
                                         (dict(f_star=float("nan")), "f_star"), (dict(lr=-1.0), "lr")])
def test_bad_hyperparameters(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        PSPS([torch.zeros(2, requires_grad=True)], **kw)
