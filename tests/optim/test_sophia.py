"""Tests for Sophia (Liu et al., 2023): reference algorithm box, estimators, pytorch_optimizer, round trip."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sgdlab.optim.sophia import Sophia, SophiaG, SophiaH, gnb_loss

DT = torch.float64
SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]


# ------------------------------------------------------------------------------------------------------
# Reference: the paper's Algorithm 3, one parameter at a time, written out plainly.
#   m_t = b1 m_{t-1} + (1 - b1) g_t
#   if t mod k == 1: h_t = b2 h_{t-k} + (1 - b2) h_hat_t   else h_t = h_{t-1}
#   theta = theta - lr * wd * theta
#   theta = theta - lr * clip(m_t / max(gamma * h_t, eps), 1)
# ------------------------------------------------------------------------------------------------------
class RefSophia:
    def __init__(self, theta, lr, b1, b2, gamma, eps, wd):
        self.theta = theta.clone()
        self.m = torch.zeros_like(theta)
        self.h = torch.zeros_like(theta)
        self.lr, self.b1, self.b2, self.gamma, self.eps, self.wd = lr, b1, b2, gamma, eps, wd

    def hessian(self, h_hat):
        self.h = self.b2 * self.h + (1 - self.b2) * h_hat

    def step(self, g):
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.theta = self.theta - self.lr * self.wd * self.theta
        ratio = self.m / torch.maximum(self.gamma * self.h, torch.full_like(self.h, self.eps))
        self.theta = self.theta - self.lr * torch.clamp(ratio, -1.0, 1.0)


GROUP_HP = [dict(lr=0.05, gamma=0.02, weight_decay=0.1), dict(lr=0.01, gamma=0.5, weight_decay=0.0)]
COMMON = dict(betas=(0.9, 0.95), eps=1e-12)


def _make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g, dtype=DT).requires_grad_() for s in SHAPES]
    frozen = torch.randn(3, 3, generator=g, dtype=DT).requires_grad_()
    return ps, frozen


def _groups(ps, frozen):
    return [dict(params=[ps[0], ps[1]], **GROUP_HP[0]), dict(params=[ps[2], frozen], **GROUP_HP[1])]


def _refs(ps):
    hp = [GROUP_HP[0], GROUP_HP[0], GROUP_HP[1]]
    return [RefSophia(p.detach(), h["lr"], *COMMON["betas"], h["gamma"], COMMON["eps"], h["weight_decay"])
            for p, h in zip(ps, hp, strict=True)]


@pytest.mark.parametrize("path", ["foreach", "eager", "compiled", "group"])
def test_gnb_path_matches_reference(path):
    foreach, compiled = {"foreach": (True, False), "eager": (False, False), "compiled": (None, True),
                         "group": (None, "group")}[path]
    """Fixed random gradients and fixed sampled-label gradients; k = 3; 24 steps; float64."""
    k, steps, B = 3, 24, 6
    ps, frozen = _make_params()
    frozen0 = frozen.detach().clone()
    opt = Sophia(_groups(ps, frozen), **COMMON, estimator="gnb", k=k, foreach=foreach, compiled=compiled)
    refs = _refs(ps)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        assert opt.hessian_due == (t % k == 1)
        if t % k == 1:
            g_hat = [torch.randn(p.shape, generator=gen, dtype=DT) for p in ps]
            for p, gh in zip(ps, g_hat, strict=True):
                p.grad = gh.clone()
            opt.update_hessian(batch_size=B)
            for r, gh in zip(refs, g_hat, strict=True):
                r.hessian(B * gh * gh)
        grads = [torch.randn(p.shape, generator=gen, dtype=DT) * 3 for p in ps]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for r, g in zip(refs, grads, strict=True):
            r.step(g)
        for p, r in zip(ps, refs, strict=True):
            torch.testing.assert_close(p.detach(), r.theta, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg"], r.m, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["hessian"], r.h, rtol=1e-12, atol=1e-12)
            assert opt.state[p]["step"].item() == t
    assert torch.equal(frozen.detach(), frozen0) and frozen not in opt.state


def _coupled_loss(A, ps):
    """A smooth non-convex loss coupling all params (its Hessian has negative entries)."""
    flat = torch.cat([p.reshape(-1) for p in ps])
    return 0.5 * flat @ A @ flat + 0.3 * torch.cos(2 * flat).sum() + 0.05 * (flat ** 3).sum()


def _coupled_matrix(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT) * 0.1
    return M @ M.T + torch.diag(torch.rand(n, generator=g, dtype=DT) * 2)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_path_matches_reference(foreach, probe):
    """Reference h_hat = u * (H u) with the FULL Hessian from torch.autograd.functional and the same probes."""
    k, steps, seed = 3, 21, 11
    ps, frozen = _make_params()
    frozen0 = frozen.detach().clone()
    sizes = [p.numel() for p in ps]
    A = _coupled_matrix(sum(sizes))
    opt = Sophia(_groups(ps, frozen), **COMMON, estimator="hutchinson", k=k, probe=probe, seed=seed,
                 foreach=foreach)
    refs = _refs(ps)
    probe_gen = torch.Generator().manual_seed(seed)   # same seed, same order (param order) as the optimizer

    def flat_loss(flat):
        return _coupled_loss(A, list(torch.split(flat, sizes)))

    for t in range(1, steps + 1):
        opt.zero_grad()
        _coupled_loss(A, ps).backward()
        opt.step(lambda: _coupled_loss(A, ps))
        theta = torch.cat([r.theta.reshape(-1) for r in refs])
        if t % k == 1:
            H = torch.autograd.functional.hessian(flat_loss, theta)
            if probe == "gaussian":
                us = [torch.randn(r.theta.shape, generator=probe_gen, dtype=DT) for r in refs]
            else:
                us = [torch.randint(0, 2, r.theta.shape, generator=probe_gen).to(DT) * 2 - 1 for r in refs]
            u = torch.cat([x.reshape(-1) for x in us])
            h_hat = torch.split(u * (H @ u), sizes)
            for r, hh in zip(refs, h_hat, strict=True):
                r.hessian(hh.reshape(r.theta.shape))
        g = torch.func.grad(flat_loss)(theta)
        for r, gi in zip(refs, torch.split(g, sizes), strict=True):
            r.step(gi.reshape(r.theta.shape))
        for p, r in zip(ps, refs, strict=True):
            torch.testing.assert_close(p.detach(), r.theta, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg"], r.m, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["hessian"], r.h, rtol=1e-10, atol=1e-12)
    assert any((opt.state[p]["hessian"] < 0).any() for p in ps)   # the max(gamma h, eps) floor was exercised
    assert torch.equal(frozen.detach(), frozen0)


def test_hutchinson_estimate_is_unbiased_on_a_quadratic():
    """E[u * Hu] = diag(H): with lr = 0 and beta2 = 0, h is a fresh probe estimate each step."""
    g = torch.Generator().manual_seed(0)
    n, draws = 6, 1500
    M = torch.randn(n, n, generator=g, dtype=DT)
    H = M @ M.T / n + torch.diag(torch.linspace(1, 4, n, dtype=DT))
    x = torch.randn(n, generator=g, dtype=DT).requires_grad_()
    loss = lambda: 0.5 * x @ H @ x  # noqa: E731
    opt = SophiaH([x], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, k=1, seed=5)
    samples = []
    for _ in range(draws):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
        samples.append(opt.state[x]["hessian"].clone())
    S = torch.stack(samples)
    se = S.std(0) / draws ** 0.5
    assert ((S.mean(0) - torch.diagonal(H)).abs() < 5 * se).all()
    # Rademacher probes are exact when H is diagonal: u_i^2 = 1.
    D = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DT))
    y = torch.randn(3, dtype=DT, requires_grad=True)
    opt = SophiaH([y], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, k=1, probe="rademacher")
    (0.5 * y @ D @ y).backward()
    opt.step(lambda: 0.5 * y @ D @ y)
    torch.testing.assert_close(opt.state[y]["hessian"], torch.diagonal(D))


def test_gnb_loss_scaling_gives_gauss_newton_diagonal():
    """B * grad(mean sampled CE)^2 averages to diag of the Gauss-Newton matrix of the MEAN loss."""
    g = torch.Generator().manual_seed(0)
    B, d, C, draws = 4, 3, 3, 1500
    X = torch.randn(B, d, generator=g, dtype=DT)
    W = (torch.randn(d, C, generator=g, dtype=DT) * 0.5).requires_grad_()
    p = torch.softmax(X @ W, dim=-1).detach()
    gn_diag = ((X ** 2).T @ (p * (1 - p))) / B     # (1/B) sum_b x_bj^2 p_bc (1 - p_bc)
    sg = torch.Generator().manual_seed(1)
    est = []
    for _ in range(draws):
        (grad,) = torch.autograd.grad(gnb_loss(X @ W, generator=sg), W)
        est.append(B * grad * grad)
    S = torch.stack(est)
    assert ((S.mean(0) - gn_diag).abs() < 5 * S.std(0) / draws ** 0.5 + 1e-12).all()
    # sequence logits (batch, time, vocab) are flattened: B = batch * time
    logits = torch.randn(2, 5, 7, dtype=DT, requires_grad=True)
    assert gnb_loss(logits).shape == ()


def test_pytorch_optimizer_sophiah_same_trajectory():
    """pytorch_optimizer.SophiaH writes the v1 form lr' * clip(m / max(h, eps'), p). With gamma = p,
    lr = p * lr', eps = p * eps' and weight_decay = wd' / p it is the same rule; with the same probes
    (its global-RNG randn_like vs. our seeded generator, same seed and order) the runs coincide."""
    po = pytest.importorskip("pytorch_optimizer")
    k, steps, seed = 3, 24, 7
    lr_po, p_clip, eps_po, wd_po, betas = 0.2, 0.05, 1e-10, 0.3, (0.9, 0.95)
    ps, _ = _make_params()
    A = _coupled_matrix(sum(p.numel() for p in ps))
    qs = [p.detach().clone().requires_grad_() for p in ps]
    ours = SophiaH(ps, lr=p_clip * lr_po, betas=betas, gamma=p_clip, eps=p_clip * eps_po,
                   weight_decay=wd_po / p_clip, k=k, seed=seed)
    theirs = po.SophiaH(qs, lr=lr_po, betas=betas, weight_decay=wd_po, p=p_clip, update_period=k,
                        eps=eps_po, hessian_distribution="gaussian")
    torch.manual_seed(seed)
    for _ in range(steps):
        ours.zero_grad()
        _coupled_loss(A, ps).backward()
        ours.step(lambda: _coupled_loss(A, ps))
        theirs.zero_grad()
        _coupled_loss(A, qs).backward(create_graph=True)
        theirs.step()
        for p, q in zip(ps, qs, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(ours.state[p]["hessian"], theirs.state[q]["hessian_moment"],
                                       rtol=1e-10, atol=1e-12)
    for q in qs:
        q.grad = None   # break the create_graph reference cycle


def test_sophia_h_converges_on_ill_conditioned_quadratic():
    """Condition number 1e3 in 10-D: ||x - x*|| < 1e-6 after 400 steps (GD would need ~1e4)."""
    g = torch.Generator().manual_seed(0)
    d = 10
    a = torch.logspace(0, 3, d, dtype=DT)
    A = torch.diag(a) + 0.1 * torch.outer(a.sqrt(), a.sqrt()) * (torch.rand(d, d, generator=g, dtype=DT) - 0.5)
    A = 0.5 * (A + A.T)
    c = torch.randn(d, generator=g, dtype=DT)
    x = torch.zeros(d, dtype=DT, requires_grad=True)
    f = lambda: 0.5 * (x - c) @ A @ (x - c)  # noqa: E731
    opt = SophiaH([x], lr=0.05, gamma=0.05, betas=(0.9, 0.99), weight_decay=0.0, k=5)
    for _ in range(400):
        opt.zero_grad()
        f().backward()
        opt.step(f)
    assert (x - c).norm() < 1e-6


def test_sophia_g_converges_on_softmax_regression():
    """L2-regularised softmax regression; optimum from L-BFGS; gap < 1e-7 after 300 steps."""
    g = torch.Generator().manual_seed(0)
    n, d, C, lam = 200, 5, 3, 1e-2
    X = torch.randn(n, d, generator=g, dtype=DT) * torch.tensor([1, 3, 0.3, 1, 2.0], dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)

    def loss_of(W, b):
        return F.cross_entropy(X @ W + b, y) + 0.5 * lam * (W ** 2).sum()

    W = torch.zeros(d, C, dtype=DT, requires_grad=True)
    b = torch.zeros(C, dtype=DT, requires_grad=True)
    lbfgs = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        value = loss_of(W, b)
        value.backward()
        return value

    lbfgs.step(closure)
    f_star = loss_of(W, b).item()
    W = torch.zeros(d, C, dtype=DT, requires_grad=True)
    b = torch.zeros(C, dtype=DT, requires_grad=True)
    opt = SophiaG([W, b], lr=0.1, gamma=0.1, weight_decay=0.0, k=2)
    sg = torch.Generator().manual_seed(1)
    for _ in range(300):
        if opt.hessian_due:
            opt.zero_grad()
            gnb_loss(X @ W + b, generator=sg).backward()
            opt.update_hessian(batch_size=n)
        opt.zero_grad()
        loss_of(W, b).backward()
        opt.step()
    assert loss_of(W, b).item() - f_star < 1e-7


def test_usage_errors_are_clear():
    x = torch.ones(3, requires_grad=True)
    f = lambda: (x ** 4).sum()  # noqa: E731
    opt = SophiaH([x], k=2)
    f().backward()
    with pytest.raises(RuntimeError, match=r"step\(closure\).*RETURNS it without calling backward"):
        opt.step()

    def backward_closure():   # a torch.optim-style closure frees the graph: explained, not a bare autograd error
        value = f()
        value.backward()
        return value

    with pytest.raises(RuntimeError, match=r"without calling backward"):
        opt.step(backward_closure)
    with pytest.raises(RuntimeError, match=r"update_hessian\(\) is for Sophia-G"):
        opt.update_hessian(batch_size=4)
    g_opt = SophiaG([x])
    with pytest.raises(ValueError, match=r"batch_size=0"):
        g_opt.update_hessian(batch_size=0)
    emb = torch.nn.Embedding(5, 2, sparse=True)
    s_opt = SophiaG(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        s_opt.step()


def test_gnb_step_without_hessian_is_sign_momentum_and_returns_closure_loss():
    """Before any Hessian estimate h = 0, so every coordinate is clipped: theta -= lr * sign(m)."""
    x = torch.tensor([1.0, -2.0, 3.0], dtype=DT, requires_grad=True)
    opt = SophiaG([x], lr=0.1, weight_decay=0.0)

    def closure():
        opt.zero_grad()
        value = (x * torch.tensor([2.0, -1.0, 0.5], dtype=DT)).sum()
        value.backward()
        return value

    before = x.detach().clone()
    loss = opt.step(closure)
    assert loss is not None
    torch.testing.assert_close(x.detach(), before - 0.1 * torch.tensor([1.0, -1.0, 1.0], dtype=DT))
    assert copy.deepcopy(opt.state_dict())["sophia"]["step"] == 1
