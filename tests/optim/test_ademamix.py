"""Tests for sgdlab.optim.ademamix.AdEMAMix against a plain transcription of Algorithm 1 of
Pagliardini, Ablin & Grangier (2024), arXiv:2409.03137."""

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
