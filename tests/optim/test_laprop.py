"""Tests for sgdlab.optim.laprop.LaProp against the paper's Algorithm 1 (Ziyin et al., arXiv:2002.04839)."""


import pytest
import torch

from sgdlab.optim.laprop import LaProp

SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]


def reference_laprop(params, grads_per_step, groups, maximize=False):
    """LaProp as in the paper's Algorithm 1 (mu = beta1, nu = beta2), one parameter at a time, plus
    decoupled weight decay on theta_{t-1}. ``groups`` is a list of (indices, hyperparameter dict) pairs;
    ``lr`` is a callable ``lr(t)`` (the paper's lr_t multiplies the whole momentum).
    """
    params = [p.clone() for p in params]
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for idx, hp in groups:
            lr = hp["lr"](t)
            mu, nu = hp["betas"]
            for i in idx:
                g = -grads[i] if maximize else grads[i]
                s = state[i]
                c_n = 1 - nu ** t
                c_m = 1 - mu ** t
                s["v"] = nu * s["v"] + (1 - nu) * g * g
                s["m"] = mu * s["m"] + (1 - mu) * g / (torch.sqrt(s["v"] / c_n) + hp["eps"])
                params[i] = params[i] * (1 - lr * hp["weight_decay"]) - lr * s["m"] / c_m
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

    hp_a = dict(lr=lr_a, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.0)
    hp_b = dict(lr=lr_b, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.1)
    opt = LaProp([{"params": [params[0], frozen], "lr": 0.01, "betas": (0.9, 0.99)},
                    {"params": params[1:], "lr": 0.03, "eps": 1e-6, "weight_decay": 0.1}],
                   betas=(0.8, 0.999), foreach=foreach, compiled=compiled, maximize=maximize)
    for t, gs in enumerate(grads, start=1):
        opt.param_groups[0]["lr"] = lr_a(t)
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    ref_params, ref_state = reference_laprop(init, grads, [([0], hp_a), ([1, 2], hp_b)], maximize=maximize)
    tol = dict(rtol=1e-10, atol=1e-12)
    for p, rp, rs in zip(params, ref_params, ref_state, strict=True):
        torch.testing.assert_close(p.detach(), rp, **tol)
        st = opt.state[p]
        torch.testing.assert_close(st["exp_avg"], rs["m"], **tol)
        torch.testing.assert_close(st["exp_avg_sq"], rs["v"], **tol)
        assert st["step"].item() == steps
    assert torch.equal(frozen.detach(), frozen0)
    assert frozen not in opt.state


def _po_pair(po, init, foreach, **kw):
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    return ours, theirs, LaProp(ours, foreach=foreach, **kw), po.LaProp(theirs, foreach=False, **kw)


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_pytorch_optimizer(foreach):
    # With a constant lr and no weight decay the paper and pytorch_optimizer (the authors' code) coincide;
    # their momentum holds lr times ours. Gradients are kept away from zero so their extra 1e-15 inside
    # sqrt(v) stays below rounding. Their foreach path keeps step sizes in float32, so we use their
    # per-parameter path.
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    lr = 0.01
    ours, theirs, opt_a, opt_b = _po_pair(po, init, foreach, lr=lr, betas=(0.8, 0.99), eps=1e-15)
    for gs in _random_grads(25, SHAPES, seed=6, away_from_zero=True):
        for a, b, g in zip(ours, theirs, gs, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(lr * opt_a.state[a]["exp_avg"], opt_b.state[b]["exp_avg"])
            torch.testing.assert_close(opt_a.state[a]["exp_avg_sq"], opt_b.state[b]["exp_avg_sq"])


def test_weight_decay_order_differs_from_pytorch_optimizer():
    # Documented difference: we decay theta_{t-1} before the step, they decay after it.
    po = pytest.importorskip("pytorch_optimizer")
    init = [torch.linspace(-1, 1, 6, dtype=torch.float64)]
    grad = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    lr, wd = 0.1, 0.5
    results = {}
    for decay in (0.0, wd):
        ours, theirs, opt_a, opt_b = _po_pair(po, init, False, lr=lr, weight_decay=decay)
        ours[0].grad, theirs[0].grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
        results[decay] = (ours[0].detach(), theirs[0].detach())
    step = init[0] - results[0.0][0]
    torch.testing.assert_close(results[0.0][1], results[0.0][0])
    torch.testing.assert_close(results[wd][0], init[0] * (1 - lr * wd) - step)
    torch.testing.assert_close(results[wd][1], (init[0] - step) * (1 - lr * wd))
