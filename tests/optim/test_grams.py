"""Tests for sgdlab.optim.grams.Grams against the paper's Algorithm 1 (Cao, Li & Song, arXiv:2412.17107)."""


import pytest
import torch

from sgdlab.optim.grams import Grams

SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]


def reference_grams(params, grads_per_step, groups, maximize=False):
    """Grams as in the paper's Algorithm 1, one parameter at a time (decoupled weight decay on theta_{t-1}).

    ``groups`` is a list of (indices, hyperparameter dict) pairs; ``lr`` is a callable ``lr(t)``.
    """
    params = [p.clone() for p in params]
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for idx, hp in groups:
            lr = hp["lr"](t)
            beta1, beta2 = hp["betas"]
            for i in idx:
                g = -grads[i] if maximize else grads[i]
                s = state[i]
                s["m"] = beta1 * s["m"] + (1 - beta1) * g
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                m_hat = s["m"] / (1 - beta1 ** t)
                v_hat = s["v"] / (1 - beta2 ** t)
                u = m_hat / (torch.sqrt(v_hat) + hp["eps"])
                u_hat = torch.sign(g) * torch.abs(u)
                params[i] = params[i] - lr * (u_hat + hp["weight_decay"] * params[i])
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

    hp_a = dict(lr=lr_a, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)
    hp_b = dict(lr=lr_b, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.1)
    opt = Grams([{"params": [params[0], frozen], "lr": 0.01, "betas": (0.9, 0.99)},
                    {"params": params[1:], "lr": 0.03, "eps": 1e-6, "weight_decay": 0.1}],
                   betas=(0.8, 0.999), foreach=foreach, compiled=compiled, maximize=maximize)
    for t, gs in enumerate(grads, start=1):
        opt.param_groups[0]["lr"] = lr_a(t)
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    ref_params, ref_state = reference_grams(init, grads, [([0], hp_a), ([1, 2], hp_b)], maximize=maximize)
    tol = dict(rtol=1e-10, atol=1e-12)
    for p, rp, rs in zip(params, ref_params, ref_state, strict=True):
        torch.testing.assert_close(p.detach(), rp, **tol)
        st = opt.state[p]
        torch.testing.assert_close(st["exp_avg"], rs["m"], **tol)
        torch.testing.assert_close(st["exp_avg_sq"], rs["v"], **tol)
        assert st["step"].item() == steps
    assert torch.equal(frozen.detach(), frozen0)
    assert frozen not in opt.state


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_pytorch_optimizer(foreach):
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    opt_a = Grams(ours, foreach=foreach, **kw)
    opt_b = po.Grams(theirs, **kw)
    for gs in _random_grads(25, SHAPES, seed=6):
        for a, b, g in zip(ours, theirs, gs, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt_a.state[a]["exp_avg"], opt_b.state[b]["exp_avg"])
            torch.testing.assert_close(opt_a.state[a]["exp_avg_sq"], opt_b.state[b]["exp_avg_sq"])
