"""AuON / Hybrid-AuON against a plain per-parameter transcription of the paper's update (arXiv:2509.24320)."""

import math

import pytest
import torch

from sgdlab.optim.auon import AuON, HybridAuON

CLASSES = [AuON, HybridAuON]


def reference_step(params_groups, states, hybrid):
    """One step, per parameter, straight from the formulas: AdamW for ndim < 2, AuON for matrices."""
    for group in params_groups:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            st = states.setdefault(p, {})
            if p.ndim < 2:
                b1, b2 = group["adamw_betas"]
                alr = lr * group["adamw_lr_ratio"]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"].item()
                p.mul_(1 - alr * wd)
                st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
                st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                m_hat = st["exp_avg"] / (1 - b1 ** t)
                v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
                p.sub_(alr * m_hat / (v_hat.sqrt() + group["adamw_eps"]))
                continue
            if not st:
                st["momentum_buffer"] = torch.zeros_like(p)
            st["momentum_buffer"] = beta * st["momentum_buffer"] + (1 - beta) * g
            v = (1 - beta) * g + beta * st["momentum_buffer"] if group["nesterov"] else st["momentum_buffer"]
            rows = p.shape[0]
            v = v.reshape(rows, -1)
            cols = v.shape[1]
            if hybrid:
                x = v / (torch.linalg.norm(v) + 1e-7)
                if rows > cols:
                    x = x.T
                a = x @ x.T
                x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
                v = x.T if rows > cols else x
            G = v / (torch.linalg.norm(v) + 1e-7)
            r = torch.sqrt(torch.mean(torch.cosh(G) ** 2))
            U = G / (r + 1e-8)
            p.mul_(1 - lr * wd)
            p.sub_(lr * math.sqrt(max(1, rows / cols)) * U.reshape(p.shape))


def make_params():
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (5, 3), (4, 2, 3, 3), (3, 6), (5, 3), (2,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def groups_of(ps):
    return [dict(params=ps[:3], lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
            dict(params=ps[3:], lr=0.02, momentum=0.8, weight_decay=0.0, nesterov=False)]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference(cls, foreach):
    ps = make_params()
    ref = [p.clone() for p in ps]
    opt = cls(groups_of(ps), foreach=foreach)
    ref_groups = [dict(opt.defaults, **{k: v for k, v in g.items() if k != "params"}, params=rg)
                  for g, rg in zip(groups_of(ps), [ref[:3], ref[3:]], strict=True)]
    ref_states = {}
    frozen = ps[-1].clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        for p, r in zip(ps[:-1], ref[:-1], strict=True):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        reference_step(ref_groups, ref_states, cls is HybridAuON)
    for p, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
        if r in ref_states:
            for k, v in ref_states[r].items():
                torch.testing.assert_close(opt.state[p][k], v, rtol=1e-10, atol=1e-12)
    assert torch.equal(ps[-1], frozen) and ps[-1] not in opt.state


def test_update_is_spectrally_bounded():
    # ||U||_2 < 1: with lr=1, no momentum and a square matrix the step's spectral norm is below 1.
    w = torch.zeros(6, 6, dtype=torch.float64)
    w.grad = torch.randn(6, 6, dtype=torch.float64) * 100
    AuON([w], lr=1.0, momentum=0.0, weight_decay=0.0).step()
    assert 0.5 < torch.linalg.matrix_norm(w, ord=2) < 1.0
