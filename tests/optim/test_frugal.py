"""Tests for sgdlab.optim.frugal.FRUGAL against the paper's Algorithm 1 (Zmushko et al., arXiv:2411.07837)."""

import copy

import pytest
import torch

from sgdlab.optim.frugal import FRUGAL

# group A: a bias-like vector and two matrices; group B: a conv weight, two matrices and a grad-less matrix
SHAPES = [(7,), (5, 3), (6, 4), (4, 2, 3, 3), (3, 5), (8, 2), (3, 3)]
GROUP_A, GROUP_B, FROZEN = [0, 1, 2], [3, 4, 5, 6], 6
HP_A = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rho=0.5, state_free="signsgd",
            state_free_lr=None)
HP_B = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, rho=0.34, state_free="sgd",
            state_free_lr=1e-3)


def _adam(s, g, hp):
    """One Adam step on state ``s`` (m, v, t) for gradient ``g``; returns the update (already times -lr)."""
    beta1, beta2 = hp["betas"]
    s["t"] += 1
    s["m"] = beta1 * s["m"] + (1 - beta1) * g
    s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
    m_hat = s["m"] / (1 - beta1 ** s["t"])
    v_hat = s["v"] / (1 - beta2 ** s["t"])
    return -hp["lr"] * m_hat / (torch.sqrt(v_hat) + hp["eps"])


def _state_free(r, hp):
    lr = hp["lr"] if hp["state_free_lr"] is None else hp["state_free_lr"]
    return -lr * (torch.sign(r) if hp["state_free"] == "signsgd" else r)


def reference_frugal(init, grads_per_step, groups, projection, update_gap, seed=0):
    """FRUGAL(Adam, signSGD/SGD), Algorithm 1, one parameter at a time.

    Every ``update_gap`` steps: "svd" takes the top-r singular vectors of each matrix gradient on its smaller
    side, "blocks" draws round(rho * N) of the group's N matrices with ``randperm`` from a generator seeded with
    ``seed``; either way the Adam state is reset. Vectors are plain AdamW.
    """
    params = [p.clone() for p in init]
    gen = torch.Generator().manual_seed(seed)
    state = [{} for _ in params]
    for k, grads in enumerate(grads_per_step):
        for idx, hp in groups:
            mats = [i for i in idx if params[i].ndim >= 2]
            if projection == "blocks" and k % update_gap == 0:
                chosen = [mats[j] for j in torch.randperm(len(mats), generator=gen)[:round(hp["rho"] * len(mats))]]
                for i in mats:
                    state[i] = {"active": i in chosen}
            for i in idx:
                g = grads[i]
                if g is None:
                    continue
                p = params[i] * (1 - hp["lr"] * hp["weight_decay"])
                s = state[i]
                if p.ndim < 2 or (projection == "blocks" and s["active"]):
                    if "m" not in s:
                        s.update(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0)
                    p = p + _adam(s, g, hp)
                elif projection == "blocks":
                    p = p + _state_free(g, hp)
                else:
                    G = g.reshape(g.shape[0], -1)
                    m, n = G.shape
                    right = m >= n
                    if k % update_gap == 0:
                        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
                        r = round(hp["rho"] * min(m, n))
                        s["proj"] = Vh[:r].T if right else U[:, :r]
                        low_shape = (m, r) if right else (r, n)
                        s.update(m=torch.zeros(low_shape, dtype=G.dtype), v=torch.zeros(low_shape, dtype=G.dtype),
                                 t=0)
                    Q = s["proj"]
                    low = G @ Q if right else Q.T @ G
                    up = _adam(s, low, hp)
                    step = up @ Q.T if right else Q @ up
                    if Q.shape[1] < min(m, n):
                        step = step + _state_free(G - (low @ Q.T if right else Q @ low), hp)
                    p = p + step.reshape(p.shape)
                params[i] = p
    return params, state


def _grads(steps, shapes=SHAPES, frozen=FROZEN, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [[None if i == frozen else torch.randn(s, generator=gen, dtype=torch.float64)
             for i, s in enumerate(shapes)] for _ in range(steps)]


def _init(shapes=SHAPES, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _make(params, **kw):
    return FRUGAL([{"params": [params[i] for i in GROUP_A], **HP_A},
                   {"params": [params[i] for i in GROUP_B], **HP_B}], **kw)


def _run(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("projection", ["svd", "blocks"])
def test_matches_reference(foreach, projection):
    init = _init()
    grads = _grads(23)
    params = [p.clone().requires_grad_() for p in init]
    opt = _make(params, update_gap=5, projection=projection, foreach=foreach)
    _run(opt, params, grads)
    ref_params, ref_state = reference_frugal(init, grads, [(GROUP_A, HP_A), (GROUP_B, HP_B)], projection, 5)
    tol = dict(rtol=1e-10, atol=1e-12)
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        torch.testing.assert_close(p.detach(), q, **tol)
        st, rs = opt.state[p], ref_state[i]
        if "m" in rs:
            torch.testing.assert_close(st["exp_avg"], rs["m"], **tol)
            torch.testing.assert_close(st["exp_avg_sq"], rs["v"], **tol)
            assert st["step"].item() == rs["t"]
        else:
            assert "exp_avg" not in st
        if "proj" in rs:
            torch.testing.assert_close(st["proj"], rs["proj"], **tol)
        if "active" in rs:
            assert bool(st["active"]) == rs["active"]
    assert torch.equal(params[FROZEN].detach(), init[FROZEN])
    if projection == "blocks":  # the draw did leave some blocks state-free
        assert any(not bool(opt.state[p]["active"]) for p in params[1:] if "active" in opt.state[p])


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("update_gap", [5, 100])
def test_blocks_rho_one_is_adamw_restarted_every_update_gap(foreach, update_gap):
    """All blocks state-full: AdamW whose state is reset every update_gap steps (the paper's reset rule).

    Only matrices here: vectors are never split, so their AdamW state is never reset."""
    init, grads = _init(SHAPES[1:6]), _grads(17, SHAPES[1:6], frozen=None)
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    _run(FRUGAL(a, rho=1.0, projection="blocks", update_gap=update_gap, foreach=foreach, **hp), a, grads)
    for start in range(0, len(grads), update_gap):
        _run(torch.optim.AdamW(b, foreach=foreach, **hp), b, grads[start:start + update_gap])
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("projection", ["svd", "blocks"])
def test_rho_zero_sgd_is_sgd(foreach, projection):
    shapes = [(5, 3), (4, 2, 3, 3), (3, 6)]
    init, grads = _init(shapes), _grads(9, shapes, frozen=None)
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    _run(FRUGAL(a, lr=1e-2, rho=0.0, state_free="sgd", state_free_lr=0.05, projection=projection, update_gap=4,
                foreach=foreach), a, grads)
    _run(torch.optim.SGD(b, lr=0.05), b, grads)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)


def test_full_rank_svd_has_no_state_free_step():
    shapes = [(5, 3), (3, 6)]
    init, grads = _init(shapes), _grads(6, shapes, frozen=None)
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    _run(FRUGAL(a, lr=1e-2, rho=1.0, update_gap=3), a, grads)
    _run(FRUGAL(b, lr=1e-2, rho=0.3, rank=10, update_gap=3, state_free_lr=0.0), b, grads)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_rank_overrides_rho_and_split_false_is_adamw():
    w = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    e = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    e2 = e.detach().clone().requires_grad_()
    opt = FRUGAL([{"params": [w], "rank": 2}, {"params": [e], "split": False}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([e2], lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        w.grad = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        e.grad = torch.randn(e.shape, generator=gen, dtype=torch.float64)
        e2.grad = e.grad.clone()
        opt.step()
        ref.step()
    assert opt.state[w]["proj"].shape == (6, 2) and opt.state[w]["exp_avg"].shape == (2, 10)
    torch.testing.assert_close(e, e2, rtol=1e-12, atol=1e-14)


def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("projection", ["svd", "blocks"])
def test_state_memory_below_adamw(projection):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 64, bias=False) for _ in range(8)])  # weights 64 x 16
    frugal, adamw = copy.deepcopy(model), copy.deepcopy(model)
    opts = [FRUGAL(frugal.parameters(), rho=0.25, projection=projection), torch.optim.AdamW(adamw.parameters())]
    for m, opt in zip([frugal, adamw], opts, strict=True):
        x = torch.randn(4, 16)
        for layer in m:
            x = torch.tanh(layer(x) @ torch.ones(64, 16) / 8)
        x.square().sum().backward()
        opt.step()
    ratio = _state_bytes(opts[0]) / _state_bytes(opts[1])
    # blocks: 2 of 8 tensors hold m and v; svd: m, v of 64 x 4 plus the 16 x 4 projector = 0.28 of 2 x 64 x 16
    assert ratio <= 0.3, ratio
