"""SWAN against a plain per-parameter transcription of the paper's operators (arXiv:2412.13148)."""

import copy

import pytest
import torch

from sgdlab.optim.swan import SWAN


def reference_step(groups, states):
    """One step per parameter: GradNorm, GradWhitening written literally as (G G^T)^{-1/2} G; AdamW for ndim < 2."""
    for group in groups:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if p.ndim < 2:
                st = states.setdefault(p, {})
                b1, b2 = group["adamw_betas"]
                alr = lr * group["adamw_lr_ratio"]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"].item()
                p.mul_(1 - alr * wd)
                st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
                st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                p.sub_(alr * (st["exp_avg"] / (1 - b1 ** t))
                       / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["adamw_eps"]))
                continue
            G = g.reshape(p.shape[0], -1)
            n = G.shape[1]
            mean = G.sum(dim=1, keepdim=True) / n
            std = torch.sqrt(((G - mean) ** 2).sum(dim=1, keepdim=True) / n)
            Gn = (G - mean) / (std + eps)
            A = Gn @ Gn.T
            c = torch.sqrt((A ** 2).sum()) + eps
            Y, Z, eye = A / c, torch.eye(A.shape[0], dtype=A.dtype), torch.eye(A.shape[0], dtype=A.dtype)
            for _ in range(group["ns_steps"]):
                T = (3 * eye - Z @ Y) / 2
                Y, Z = Y @ T, T @ Z
            D = Z @ Gn / torch.sqrt(c)
            if group["rescale"]:
                D = D * torch.sqrt((Gn ** 2).sum()) / (torch.sqrt((D ** 2).sum()) + eps)
            p.mul_(1 - lr * wd)
            p.sub_(lr * D.reshape(p.shape))


def make_params():
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (5, 3), (4, 2, 3, 3), (3, 6), (5, 3), (2,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def groups_of(ps):
    return [dict(params=ps[:3], lr=0.01, ns_steps=10, weight_decay=0.1),
            dict(params=ps[3:], lr=0.003, ns_steps=6, rescale=False)]


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference(foreach):
    ps = make_params()
    ref = [p.clone() for p in ps]
    opt = SWAN(groups_of(ps), foreach=foreach)
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
        reference_step(ref_groups, ref_states)
    for p, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-11)
        if r in ref_states:
            for k, v in ref_states[r].items():
                torch.testing.assert_close(opt.state[p][k], v, rtol=1e-10, atol=1e-12)
        elif p.ndim >= 2:
            assert not opt.state.get(p)  # stateless for matrices
    assert torch.equal(ps[-1], frozen) and ps[-1] not in opt.state


def test_whitened_update_is_orthogonal():
    # For a wide matrix with rescale off, the update is the polar factor of GradNorm(G): singular values 1.
    w = torch.zeros(3, 8, dtype=torch.float64)
    w.grad = torch.randn(3, 8, dtype=torch.float64)
    SWAN([w], lr=1.0, rescale=False, ns_steps=20).step()
    torch.testing.assert_close(torch.linalg.svdvals(w), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-8)


def test_ill_conditioned_quadratic_converges():
    # min_W 0.5 ||A (W - W*)||^2 with cond(A^T A) = 900. GradNorm centres every row of the update, so the
    # row sums of W never change (with weight_decay=0): W* is chosen with the same row sums as the start (0).
    gen = torch.Generator().manual_seed(0)
    a = torch.diag(torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=torch.float64))
    w_star = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    w_star -= w_star.mean(dim=1, keepdim=True)
    w = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    opt = SWAN([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.99 ** t)
    for _ in range(1000):
        opt.zero_grad()
        (0.5 * (a @ (w - w_star)).square().sum()).backward()
        opt.step()
        sched.step()
    assert torch.linalg.norm(w.detach() - w_star) < 1e-3
    torch.testing.assert_close(w.detach().sum(dim=1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_state_dict_round_trip():
    ps = make_params()
    opt = SWAN(groups_of(ps))
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps] for _ in range(10)]

    def run(o, params, steps):
        for gs in steps:
            for p, g in zip(params[:-1], gs[:-1], strict=True):
                p.grad = g.clone()
            o.step()

    run(opt, ps, grads[:5])
    ps2 = [p.clone() for p in ps]
    opt2 = SWAN(groups_of(ps2))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, ps, grads[5:])
    run(opt2, ps2, grads[5:])
    for p, q in zip(ps, ps2, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kw, name", [(dict(lr=-1.0), "lr"), (dict(ns_steps=0), "ns_steps"),
                                      (dict(ns_steps=2.5), "ns_steps"), (dict(eps=0.0), "eps"),
                                      (dict(weight_decay=-1.0), "weight_decay"), (dict(rescale="yes"), "rescale"),
                                      (dict(adamw_betas=(1.0, 0.9)), r"adamw_betas\[0\]"),
                                      (dict(adamw_lr_ratio=-0.5), "adamw_lr_ratio")])
def test_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        SWAN([torch.zeros(2, 2, requires_grad=True)], **kw)


def test_use_adamw_routes_a_matrix_to_adamw():
    # use_adamw=True routes a matrix (e.g. an embedding) to AdamW: it gets Adam state.
    w = torch.zeros(4, 3, requires_grad=True)
    w.grad = torch.ones(4, 3)
    opt = SWAN([{"params": [w], "use_adamw": True}])
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"}
