"""SAM (Foret et al., 2021) and ASAM against a float64 reference of Algorithm 1, the quadratic oracle, rho = 0,
||e|| = rho, splitting invariance of the global norm, and pytorch_optimizer's SAM."""

import pytest
import torch
import torch.nn.functional as F

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim import protocol
from sgdlab.optim.sam import SAM

DT = torch.float64


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [(0.5 * torch.randn(s, generator=gen, dtype=DT)).requires_grad_() for s in [(4, 3), (4,), (2, 4)]]
    x = torch.randn(16, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 2, (16,), generator=gen)

    def loss(w=ps):
        return F.cross_entropy(torch.tanh(x @ w[0].T + w[1]) @ w[2].T, y)
    return ps, loss


def reference(ps, loss, steps, lr, mu, rho, adaptive, eps=1e-12):
    """Algorithm 1 of Foret et al. (ASAM's e when ``adaptive``), heavy-ball SGD as the base, tensor by tensor."""
    w = [p.detach().clone() for p in ps]
    buf = [None] * len(w)
    for _ in range(steps):
        wg = [t.clone().requires_grad_() for t in w]
        g = torch.autograd.grad(loss(wg), wg)
        s = [gi * wi if adaptive else gi for gi, wi in zip(g, w, strict=True)]
        norm = torch.sqrt(sum((si * si).sum() for si in s))
        e = [(si * wi if adaptive else si) * rho / (norm + eps) for si, wi in zip(s, w, strict=True)]
        we = [(wi + ei).requires_grad_() for wi, ei in zip(w, e, strict=True)]
        g2 = torch.autograd.grad(loss(we), we)
        for i in range(len(w)):
            buf[i] = g2[i].clone() if buf[i] is None else mu * buf[i] + g2[i]
            w[i] = w[i] - lr * buf[i]
    return w


def run(opt, loss, steps):
    ctx = protocol.StepContext(loss=loss)
    for _ in range(steps):
        opt.zero_grad()
        protocol.forward_backward(opt, ctx)
        protocol.step(opt, ctx)


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_the_float64_reference(adaptive):
    ps, loss = problem()
    start = [p.detach().clone() for p in ps]
    opt = optim.create("sam", ps, lr=0.1, momentum=0.9, rho=0.3, adaptive=adaptive)
    run(opt, loss, 12)
    ref = reference(start, loss, 12, lr=0.1, mu=0.9, rho=0.3, adaptive=adaptive)
    for p, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-13)


def test_rho_zero_is_the_base_optimizer_exactly():
    a, loss_a = problem()
    b, loss_b = problem()
    run(optim.create("sam", a, base="adam", lr=0.01, rho=0.0), loss_a, 8)
    base = torch.optim.Adam(b, lr=0.01)
    for _ in range(8):
        base.zero_grad()
        loss_b().backward()
        base.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_quadratic_gradient_and_perturbation_length():
    """f = 0.5 w^T A w: the SAM gradient is A (w + rho A w / ||A w||) and ||e|| = rho."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 5, generator=gen, dtype=DT)
    a = q @ q.T + torch.eye(5, dtype=DT)
    w = torch.randn(5, generator=gen, dtype=DT, requires_grad=True)
    w0, rho = w.detach().clone(), 0.2
    seen = []

    def loss():
        seen.append(w.detach().clone())
        return 0.5 * w @ a @ w
    opt = SAM(torch.optim.SGD([w], lr=1.0), rho=rho)
    loss().backward()
    seen.clear()
    opt.step(loss)
    g = a @ w0
    torch.testing.assert_close(torch.linalg.vector_norm(seen[0] - w0), torch.tensor(rho, dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(w.detach(), w0 - a @ (w0 + rho * g / g.norm()), rtol=1e-12, atol=1e-14)


def test_the_norm_is_global_splitting_a_tensor_changes_nothing():
    gen = torch.Generator().manual_seed(1)
    a, target = torch.randn(6, dtype=DT, generator=gen).abs() + 0.5, torch.randn(6, dtype=DT, generator=gen)
    whole = torch.zeros(6, dtype=DT, requires_grad=True)
    parts = [torch.zeros(2, dtype=DT, requires_grad=True), torch.zeros(4, dtype=DT, requires_grad=True)]
    run(optim.create("sam", [whole], lr=0.1, rho=0.1), lambda: (a * (whole - target) ** 2).sum(), 5)
    run(optim.create("sam", parts, lr=0.1, rho=0.1), lambda: (a * (torch.cat(parts) - target) ** 2).sum(), 5)
    torch.testing.assert_close(whole.detach(), torch.cat(parts).detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("adaptive", [False, True])
def test_same_trajectory_as_pytorch_optimizer(adaptive):
    from pytorch_optimizer import SAM as KozSAM

    a, loss_a = problem()
    b, loss_b = problem()
    run(optim.create("sam", a, lr=0.05, momentum=0.9, rho=0.1, adaptive=adaptive), loss_a, 10)
    koz = KozSAM(b, torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.05, momentum=0.9)
    for _ in range(10):
        koz.zero_grad()
        loss_b().backward()
        koz.first_step(zero_grad=True)
        loss_b().backward()
        koz.second_step(zero_grad=True)
    for p, q in zip(a, b, strict=True):  # pytorch_optimizer takes the global norm in float32, even for float64
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_step_restores_the_weights_exactly_when_the_closure_fails():
    ps, loss = problem()
    opt = optim.create("sam", ps, lr=0.1)
    loss().backward()
    before = [p.detach().clone() for p in ps]

    def bad():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(bad)
    assert all(torch.equal(p, q) for p, q in zip(ps, before, strict=True))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("kw, pattern", [({"rho": -0.1}, r"rho=-0\.1"), ({"eps": 0.0}, r"eps=0\.0"),
                                         ({"adaptive": "yes"}, "adaptive"), ({"rho": "x"}, "rho")])
def test_bad_hyperparameters_are_config_errors_naming_them(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create("sam", [torch.zeros(2, requires_grad=True)], **kw)


def test_a_base_that_needs_its_own_closure_is_refused():
    with pytest.raises(ConfigError, match="SAM's base optimizer must take a plain backward"):
        optim.create("sam", [torch.zeros(2, requires_grad=True)], base="sophia-h")
