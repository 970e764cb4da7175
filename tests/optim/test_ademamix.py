"""Tests for sgdlab.optim.ademamix.AdEMAMix against a plain transcription of Algorithm 1 of
Pagliardini, Ablin & Grangier (2024), arXiv:2409.03137."""

import copy
import math

import pytest
import torch

from sgdlab.optim.ademamix import AdEMAMix

SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]


def reference_step(params, grads, states, lr, beta1, beta2, beta3, alpha, t_warm, eps, wd, maximize=False):
    """Algorithm 1 of the paper, one parameter at a time, no cleverness."""
    for theta, g, st in zip(params, grads, states, strict=True):
        if g is None:
            continue
        if maximize:
            g = -g
        if not st:
            st.update(step=0, m1=torch.zeros_like(theta), m2=torch.zeros_like(theta), nu=torch.zeros_like(theta))
        st["step"] += 1
        t = st["step"]
        if t_warm is None:
            alpha_t, beta3_t = alpha, beta3
        else:
            alpha_t = min(t * alpha / t_warm, alpha)
            frac = t / t_warm
            beta3_t = min(math.exp(math.log(beta1) * math.log(beta3)
                                   / ((1 - frac) * math.log(beta3) + frac * math.log(beta1))), beta3)
        st["m1"] = beta1 * st["m1"] + (1 - beta1) * g
        st["m2"] = beta3_t * st["m2"] + (1 - beta3_t) * g
        st["nu"] = beta2 * st["nu"] + (1 - beta2) * g * g
        m1_hat = st["m1"] / (1 - beta1 ** t)
        nu_hat = st["nu"] / (1 - beta2 ** t)
        theta.copy_(theta - lr * ((m1_hat + alpha_t * st["m2"]) / (nu_hat.sqrt() + eps) + wd * theta))


def _grads(gen, step):
    gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    if step in (3, 7, 8):  # the conv weight skips some steps, so step counts differ within a group
        gs[2] = None
    return gs


GROUP_HP = [dict(lr=0.01, betas=(0.9, 0.999, 0.999), alpha=5.0, t_alpha_beta3=10, eps=1e-8, weight_decay=0.1),
            dict(lr=0.003, betas=(0.8, 0.99, 0.995), alpha=3.0, t_alpha_beta3=None, eps=1e-6, weight_decay=0.0)]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("path", ["foreach", "eager", "compiled", "group"])
def test_matches_reference(path, maximize):
    foreach, compiled = {"foreach": (True, False), "eager": (False, False), "compiled": (None, True),
                         "group": (None, "group")}[path]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    frozen = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=gen))
    frozen0 = frozen.detach().clone()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [x.clone() for x in init]
    ref_states = [{} for _ in SHAPES]
    opt = AdEMAMix([dict(params=params[:2], **GROUP_HP[0]), dict(params=[params[2], frozen], **GROUP_HP[1])],
                   foreach=foreach, compiled=compiled, maximize=maximize)
    for step in range(1, 26):
        gs = _grads(gen, step)
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        for sl, hp in ((slice(0, 2), GROUP_HP[0]), (slice(2, 3), GROUP_HP[1])):
            b1, b2, b3 = hp["betas"]
            reference_step(ref[sl], gs[sl], ref_states[sl], hp["lr"], b1, b2, b3, hp["alpha"], hp["t_alpha_beta3"],
                           hp["eps"], hp["weight_decay"], maximize)
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    for p, rs in zip(params, ref_states, strict=True):
        st = opt.state[p]
        assert int(st["step"]) == rs["step"]
        torch.testing.assert_close(st["exp_avg_fast"], rs["m1"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st["exp_avg_slow"], rs["m2"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st["exp_avg_sq"], rs["nu"], rtol=1e-12, atol=1e-12)
    assert ref_states[2]["step"] == 22
    assert torch.equal(frozen.detach(), frozen0) and frozen not in opt.state


def test_closure_returns_loss_and_grad_untouched_by_maximize():
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdEMAMix([x], lr=0.1, maximize=True)

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(5.0)
    torch.testing.assert_close(x.grad, torch.tensor([2.0, -4.0]))


def test_converges_on_ill_conditioned_quadratic():
    """f(x) = 0.5 * sum_i h_i x_i^2, condition number 100, from x = 1 to the optimum 0 within 1e-3."""
    h = torch.logspace(0, 2, 10, dtype=torch.float64)
    x = torch.nn.Parameter(torch.ones(10, dtype=torch.float64))
    steps = 300
    opt = AdEMAMix([x], lr=0.1, betas=(0.9, 0.999, 0.99), t_alpha_beta3=steps // 2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (h * x * x).sum()).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(x.detach(), torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-3)


@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip(foreach):
    gen = torch.Generator().manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    hp = dict(lr=0.01, alpha=4.0, t_alpha_beta3=8, weight_decay=0.01, foreach=foreach)
    opt_a = AdEMAMix(a, **hp)
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(12)]
    for gs in grads[:5]:
        for p, g in zip(a, gs, strict=True):
            p.grad = g.clone()
        opt_a.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = AdEMAMix(b, lr=1.0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["t_alpha_beta3"] == 8
    for gs in grads[5:]:
        for pa, pb, g in zip(a, b, gs, strict=True):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
        for k in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][k], opt_b.state[pb][k])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(lr=-1.0), r"lr=-1\.0"),
    (dict(betas=(1.0, 0.999, 0.9999)), r"betas\[0\]=1\.0"),
    (dict(betas=(0.9, -0.1, 0.9999)), r"betas\[1\]=-0\.1"),
    (dict(betas=(0.9, 0.999, 1.5)), r"betas\[2\]=1\.5"),
    (dict(betas=(0.9, 0.999)), r"betas must be a tuple"),
    (dict(alpha=-2.0), r"alpha=-2\.0"),
    (dict(t_alpha_beta3=0), r"t_alpha_beta3=0"),
    (dict(t_alpha_beta3=2.5), r"t_alpha_beta3 must be an integer"),
    (dict(betas=(0.0, 0.999, 0.9999), t_alpha_beta3=10), r"betas\[0\]=0\.0"),
    (dict(eps=-1e-8), r"eps=-1e-08"),
    (dict(weight_decay=-0.1), r"weight_decay=-0\.1"),
    (dict(foreach="yes"), r"foreach"),
])
def test_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AdEMAMix([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_validation_of_param_group_and_unknown_keyword():
    with pytest.raises(ValueError, match=r"alpha=-1"):
        AdEMAMix([dict(params=[torch.nn.Parameter(torch.zeros(2))], alpha=-1)])
    with pytest.raises(TypeError):
        AdEMAMix([torch.nn.Parameter(torch.zeros(2))], momentum=0.9)


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdEMAMix(emb.parameters()).step()


@pytest.mark.parametrize("t_warm", [None, 7])
def test_matches_pytorch_optimizer(t_warm):
    """pytorch_optimizer.AdEMAMix with decoupled weight decay is the same algorithm."""
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    hp = dict(lr=0.02, betas=(0.9, 0.999, 0.999), alpha=5.0, t_alpha_beta3=t_warm, eps=1e-8, weight_decay=0.05)
    opt_a = AdEMAMix(ours, **hp)
    opt_b = po.AdEMAMix(theirs, weight_decouple=True, foreach=False, **hp)
    for _ in range(20):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for pa, pb, g in zip(ours, theirs, gs, strict=True):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(ours, theirs, strict=True):
            torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-10, atol=1e-12)
