"""Tests for sgdlab.optim.diffgrad.DiffGrad against the paper's update rule (Dubey et al., arXiv:1909.11015)."""

import copy
import math

import pytest
import torch

from sgdlab.optim.diffgrad import DiffGrad

SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]


def reference_diffgrad(params, grads_per_step, groups, maximize=False):
    """diffGrad as written in the paper, one parameter at a time, with g_0 = 0 and decoupled weight decay.

    ``groups`` is a list of (indices, hyperparameter dict) pairs; a hyperparameter dict may hold a
    callable ``lr(t)`` so the learning rate can change between steps.
    """
    params = [p.clone() for p in params]
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), prev=torch.zeros_like(p)) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for idx, hp in groups:
            lr = hp["lr"](t)
            beta1, beta2 = hp["betas"]
            for i in idx:
                g = -grads[i] if maximize else grads[i]
                s = state[i]
                params[i] = params[i] * (1 - lr * hp["weight_decay"])
                s["m"] = beta1 * s["m"] + (1 - beta1) * g
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                m_hat = s["m"] / (1 - beta1 ** t)
                v_hat = s["v"] / (1 - beta2 ** t)
                xi = 1 / (1 + torch.exp(-torch.abs(s["prev"] - g)))
                params[i] = params[i] - lr * xi * m_hat / (torch.sqrt(v_hat) + hp["eps"])
                s["prev"] = g.clone()
    return params, state


def _random_grads(steps, shapes, seed=0, away_from_zero=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        if away_from_zero:
            gs = [g + 0.5 * g.sign() for g in gs]
        out.append(gs)
    return out


@pytest.mark.parametrize("path", ["foreach", "eager", "compiled", "group"])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(path, maximize):
    foreach, compiled = {"foreach": (True, False), "eager": (False, False), "compiled": (None, True),
                         "group": (None, "group")}[path]
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    frozen0 = torch.randn(3, generator=gen, dtype=torch.float64)
    params = [p.clone().requires_grad_() for p in init]
    frozen = frozen0.clone().requires_grad_()
    steps = 25
    grads = _random_grads(steps, SHAPES, seed=2)

    def lr_a(t):
        return 0.01 if t <= 12 else 0.004

    def lr_b(t):
        return 0.03

    hp_a = dict(lr=lr_a, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    hp_b = dict(lr=lr_b, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.1)
    opt = DiffGrad([{"params": [params[0], frozen], "lr": 0.01, "betas": (0.9, 0.99)},
                    {"params": params[1:], "lr": 0.03, "eps": 1e-6, "weight_decay": 0.1}],
                   betas=(0.8, 0.999), foreach=foreach, compiled=compiled, maximize=maximize)
    for t, gs in enumerate(grads, start=1):
        opt.param_groups[0]["lr"] = lr_a(t)
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    ref_params, ref_state = reference_diffgrad(init, grads, [([0], hp_a), ([1, 2], hp_b)], maximize=maximize)
    tol = dict(rtol=1e-10, atol=1e-12)
    for p, rp, rs in zip(params, ref_params, ref_state, strict=True):
        torch.testing.assert_close(p.detach(), rp, **tol)
        st = opt.state[p]
        torch.testing.assert_close(st["exp_avg"], rs["m"], **tol)
        torch.testing.assert_close(st["exp_avg_sq"], rs["v"], **tol)
        torch.testing.assert_close(st["prev_grad"], rs["prev"], **tol)
        assert st["step"].item() == steps
    assert torch.equal(frozen.detach(), frozen0)
    assert frozen not in opt.state


@pytest.mark.parametrize("foreach", [True, False])
def test_rosenbrock_converges(foreach):
    # Rosenbrock (a=1, b=100) from (1.5, 1.5) to (1, 1) within atol 1e-3 (torch-optimizer's oracle);
    # the cosine learning-rate decay removes Adam-style end-of-run oscillation.
    steps = 3000
    xy = torch.tensor([1.5, 1.5], dtype=torch.float64)
    opt = DiffGrad([xy], lr=0.3, foreach=foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    for _ in range(steps):
        x, y = xy
        xy.grad = torch.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])
        opt.step()
        sched.step()
    torch.testing.assert_close(xy, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-3)


@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip(foreach):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    grads = _random_grads(10, SHAPES, seed=4)
    opt = DiffGrad(params, lr=0.01, weight_decay=0.05, foreach=foreach)

    def run(o, ps, gs):
        for step_grads in gs:
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            o.step()

    run(opt, params, grads[:5])
    saved = copy.deepcopy(opt.state_dict())
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = DiffGrad(params2, lr=0.5, foreach=not foreach)  # hyperparameters come from the state dict
    opt2.load_state_dict(saved)
    run(opt, params, grads[5:])
    run(opt2, params2, grads[5:])
    for p, p2 in zip(params, params2, strict=True):
        torch.testing.assert_close(p, p2, rtol=0, atol=0)
        for k in ("exp_avg", "exp_avg_sq", "prev_grad", "step"):
            torch.testing.assert_close(opt.state[p][k], opt2.state[p2][k], rtol=0, atol=0)


def test_closure_and_none_grad():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = DiffGrad([w], lr=0.1)
    assert opt.step() is None  # no grad yet: nothing happens
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert (w.detach().abs() < torch.tensor([1.0, 2.0])).all()


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_validation(kwargs, name):
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        DiffGrad([w], **kwargs)
    with pytest.raises(ValueError, match=name):  # per-group values are checked too
        DiffGrad([{"params": [w], **kwargs}])


def test_unknown_keyword_and_sparse():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError):
        DiffGrad([w], momentum=0.9)
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = DiffGrad(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_pytorch_optimizer(foreach):
    # pytorch_optimizer adds eps to the uncorrected sqrt(v) (Adam's "efficient" form) and 1e-15 inside the
    # square root; with eps = 0 and gradients away from zero the two agree to rounding.
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=0.0, weight_decay=0.1)
    opt_a = DiffGrad(ours, foreach=foreach, **kw)
    opt_b = po.DiffGrad(theirs, **kw)
    for gs in _random_grads(25, SHAPES, seed=6, away_from_zero=True):
        for a, b, g in zip(ours, theirs, gs, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt_a.state[a]["exp_avg"], opt_b.state[b]["exp_avg"])
            torch.testing.assert_close(opt_a.state[a]["prev_grad"], opt_b.state[b]["previous_grad"])
