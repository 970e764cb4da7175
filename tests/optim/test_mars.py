"""Tests for sgdlab.optim.mars.MARS (MARS-AdamW, approximate variant) against a plain transcription of the
paper's MARS-AdamW box (Yuan et al., 2024, arXiv:2411.10438) with grad f(x_{t-1}, xi_t) replaced by the
previous step's gradient, as MARS-approx does."""

import math

import pytest
import torch

from sgdlab.optim.mars import MARS

SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]


def reference_step(params, grads, states, lr, beta1, beta2, gamma, eps, wd, maximize=False):
    """MARS-AdamW (approx.), one parameter at a time, no cleverness."""
    for x, g, st in zip(params, grads, states, strict=True):
        if g is None:
            continue
        if maximize:
            g = -g
        if not st:
            st.update(step=0, m=torch.zeros_like(x), v=torch.zeros_like(x), g_prev=torch.zeros_like(x))
        st["step"] += 1
        t = st["step"]
        c = g + gamma * beta1 / (1 - beta1) * (g - st["g_prev"])
        norm = math.sqrt(float((c * c).sum()))
        c_tilde = c / norm if norm > 1 else c
        st["m"] = beta1 * st["m"] + (1 - beta1) * c_tilde
        st["v"] = beta2 * st["v"] + (1 - beta2) * c_tilde * c_tilde
        m_hat = st["m"] / (1 - beta1 ** t)
        v_hat = st["v"] / (1 - beta2 ** t)
        x.copy_(x - lr * (m_hat / (v_hat.sqrt() + eps) + wd * x))
        st["g_prev"] = g.clone()


def _grads(gen, step):
    # Mix small gradients (norm < 1, not clipped) and large ones (clipped).
    scale = 0.05 if step % 3 else 2.0
    gs = [scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    if step in (3, 7, 8):  # the conv weight skips some steps, so step counts differ within a group
        gs[2] = None
    return gs


GROUP_HP = [dict(lr=0.01, betas=(0.95, 0.99), gamma=0.025, eps=1e-8, weight_decay=0.1),
            dict(lr=0.003, betas=(0.9, 0.999), gamma=0.5, eps=1e-6, weight_decay=0.0)]


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
    opt = MARS([dict(params=params[:2], **GROUP_HP[0]), dict(params=[params[2], frozen], **GROUP_HP[1])],
               foreach=foreach, compiled=compiled, maximize=maximize)
    for step in range(1, 26):
        gs = _grads(gen, step)
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        for sl, hp in ((slice(0, 2), GROUP_HP[0]), (slice(2, 3), GROUP_HP[1])):
            b1, b2 = hp["betas"]
            reference_step(ref[sl], gs[sl], ref_states[sl], hp["lr"], b1, b2, hp["gamma"], hp["eps"],
                           hp["weight_decay"], maximize)
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    for p, rs in zip(params, ref_states, strict=True):
        st = opt.state[p]
        assert int(st["step"]) == rs["step"]
        torch.testing.assert_close(st["exp_avg"], rs["m"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st["exp_avg_sq"], rs["v"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st["last_grad"], rs["g_prev"], rtol=0, atol=0)
    assert ref_states[2]["step"] == 22
    assert torch.equal(frozen.detach(), frozen0) and frozen not in opt.state


def test_clipping_bounds_the_first_step():
    """With a huge gradient, c~_1 has norm 1, so |m_hat / sqrt(v_hat)| = 1 per entry and the step is lr."""
    x = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = MARS([x], lr=0.1, eps=0.0)
    x.grad = torch.tensor([1e6, -1e6, 2e6, 3.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(x.detach(), torch.tensor([-0.1, 0.1, -0.1, -0.1], dtype=torch.float64))
    assert float(opt.state[x]["exp_avg"].norm()) == pytest.approx(1 - 0.95)


@pytest.mark.parametrize("po_foreach", [True, False])
def test_matches_pytorch_optimizer(po_foreach):
    """pytorch_optimizer.MARS(mars_type="adamw", optimize_1d=True) is the same algorithm at eps = 0.

    It adds eps before dividing by sqrt(1 - beta2^t) (the paper adds it after), and puts 1e-15 inside
    the square root; at eps = 0 and with v_t away from 0 the two agree to ~1e-11 relative."""
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    hp = dict(lr=0.02, betas=(0.95, 0.99), gamma=0.025, eps=0.0, weight_decay=0.05)
    opt_a = MARS(ours, **hp)
    opt_b = po.MARS(theirs, mars_type="adamw", optimize_1d=True, weight_decouple=True, foreach=po_foreach, **hp)
    # Entries with fixed signs and magnitudes in [1, 2] * scale keep every |c_t| entry, hence v_t, away from 0,
    # where the 1e-15 inside their square root would matter.
    signs = [torch.randn(s, generator=gen, dtype=torch.float64).sign() for s in SHAPES]
    for step in range(20):
        scale = 0.05 if step % 3 else 2.0
        gs = [scale * sg * (1 + torch.rand(sg.shape, generator=gen, dtype=torch.float64)) for sg in signs]
        for pa, pb, g in zip(ours, theirs, gs, strict=True):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(ours, theirs, strict=True):
            torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-9, atol=1e-11)


def test_differs_from_pytorch_optimizer_default_1d_split():
    """By default pytorch_optimizer (like the authors' code) runs plain AdamW on 1-D tensors; we run MARS."""
    po = pytest.importorskip("pytorch_optimizer")
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt_a, opt_b = MARS([a], lr=0.1), po.MARS([b], lr=0.1, weight_decay_1d=0.0)
    for g in ([1.0, 2.0, 3.0], [3.0, -1.0, 0.5]):
        a.grad = torch.tensor(g, dtype=torch.float64)
        b.grad = torch.tensor(g, dtype=torch.float64)
        opt_a.step()
        opt_b.step()
    assert not torch.allclose(a, b)
