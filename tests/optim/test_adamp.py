"""Tests for AdamP and SGDP (Heo et al., ICLR 2021, arXiv:2006.08217) against the paper's algorithm boxes
(the optimizer contract -- state_dict, closure, validation, sparse gradients, convergence -- is in
test_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sgdlab.optim.adamp import SGDP, AdamP, _project_many, _project_one

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Reference: the paper's algorithm boxes, one parameter at a time, no cleverness.
# ----------------------------------------------------------------------------------------------------------

def ref_cos(a, b, eps):
    a, b = a.detach(), b.detach()
    return abs(float((a * b).sum())) / (max(float(a.norm()), eps) * max(float(b.norm()), eps))


def ref_projection(w, g, p, delta, eps):
    """q = Pi_w(p) if w looks scale-invariant (channel view first, then layer view), else p."""
    if w.dim() < 2:
        return p, False
    rows_w, rows_g, rows_p = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1), p.reshape(w.shape[0], -1)
    dim = rows_w.shape[1]
    if all(ref_cos(rows_w[c], rows_g[c], eps) < delta / math.sqrt(dim) for c in range(rows_w.shape[0])):
        out = []
        for c in range(rows_w.shape[0]):
            w_hat = rows_w[c] / (rows_w[c].norm() + eps)
            out.append(rows_p[c] - (w_hat * rows_p[c]).sum() * w_hat)
        return torch.stack(out).reshape(p.shape), True
    if ref_cos(w.flatten(), g.flatten(), eps) < delta / math.sqrt(w.numel()):
        w_hat = w / (w.norm() + eps)
        return p - (w_hat * p).sum() * w_hat, True
    return p, False


class RefAdamP:
    def __init__(self, groups):
        self.groups = groups  # list of (params, hyperparameter dict)
        self.state = {}

    def step(self):
        for params, h in self.groups:
            b1, b2 = h["betas"]
            for w in params:
                if w.grad is None:
                    continue
                g = w.grad
                st = self.state.setdefault(w, {"t": 0, "m": torch.zeros_like(w), "v": torch.zeros_like(w)})
                st["t"] += 1
                t = st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                m = b1 * st["m"] + (1 - b1) * g if h["nesterov"] else st["m"]
                p = (m / (1 - b1 ** t)) / ((st["v"] / (1 - b2 ** t)).sqrt() + h["eps"])
                q, projected = ref_projection(w, g, p, h["delta"], h["eps"])
                ratio = h["wd_ratio"] if projected else 1.0
                with torch.no_grad():
                    w.copy_(w * (1 - h["lr"] * h["weight_decay"] * ratio) - h["lr"] * q)


class RefSGDP:
    def __init__(self, groups):
        self.groups = groups
        self.state = {}

    def step(self):
        for params, h in self.groups:
            mu = h["momentum"]
            for w in params:
                if w.grad is None:
                    continue
                g = w.grad
                st = self.state.setdefault(w, {"b": torch.zeros_like(w)})
                st["b"] = mu * st["b"] + (1 - h["dampening"]) * g
                p = g + mu * st["b"] if h["nesterov"] else st["b"]
                q, projected = ref_projection(w, g, p, h["delta"], h["eps"])
                ratio = (h["wd_ratio"] if projected else 1.0) / (1 - mu)
                with torch.no_grad():
                    w.copy_(w * (1 - h["lr"] * h["weight_decay"] * ratio) - h["lr"] * q)


# ----------------------------------------------------------------------------------------------------------
# A small deterministic problem mixing channel-invariant, layer-invariant and ordinary parameters
# ----------------------------------------------------------------------------------------------------------

def make_params():
    gen = torch.Generator().manual_seed(0)
    shapes = {"vec": (7,), "mat": (5, 3), "conv": (4, 2, 3, 3), "plain": (6, 4), "frozen": (3, 3), "bias": (4,)}
    return {k: torch.randn(s, generator=gen, dtype=F64).requires_grad_() for k, s in shapes.items()}


def targets(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return {k: torch.randn(s, generator=gen, dtype=F64)
            for k, s in {"vec": (7,), "mat": (5, 3), "conv": (4, 18), "plain": (6, 4), "bias": (4,)}.items()}


def loss_fn(ps, step):
    t = targets(step)
    conv_dir = F.normalize(ps["conv"].reshape(4, -1), dim=1)   # invariant per output channel (like BN)
    mat_dir = ps["mat"] / ps["mat"].norm()                       # invariant for the whole tensor (like WN)
    return ((conv_dir * t["conv"]).sum() + (mat_dir * t["mat"]).sum()
            + ((ps["plain"] - t["plain"]) ** 2).sum() + ((ps["vec"] - t["vec"]) ** 2).sum()
            + (ps["bias"] * t["bias"]).sum() + 0.1 * (ps["bias"] ** 2).sum())


def param_groups(ps, algo):
    if algo == "adamp":
        h1 = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=False)
        h2 = dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3, delta=0.1, wd_ratio=0.5, nesterov=True)
    else:
        h1 = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, delta=0.1, wd_ratio=0.1, nesterov=True,
                  eps=1e-8)
        h2 = dict(lr=0.02, momentum=0.5, dampening=0.2, weight_decay=0.05, delta=0.1, wd_ratio=0.5, nesterov=False,
                  eps=1e-8)
    return [([ps["vec"], ps["mat"], ps["frozen"]], h1), ([ps["conv"], ps["plain"], ps["bias"]], h2)]


def build(cls, ps, algo, **kw):
    return cls([{"params": p, **h} for p, h in param_groups(ps, algo)], **kw)


def take_grads(ps, step):
    for p in ps.values():
        p.grad = None
    loss_fn({k: v for k, v in ps.items()}, step).backward()
    ps["frozen"].grad = None


PATHS = {"foreach": dict(foreach=True, compiled=False), "eager": dict(foreach=False, compiled=False),
         "compiled": dict(compiled=True), "group": dict(compiled="group")}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("algo", ["adamp", "sgdp"])
def test_matches_reference(algo, path):
    cls, ref_cls = (AdamP, RefAdamP) if algo == "adamp" else (SGDP, RefSGDP)
    ps, rs = make_params(), make_params()
    frozen0 = ps["frozen"].detach().clone()
    opt = build(cls, ps, algo, **PATHS[path])
    ref = ref_cls(param_groups(rs, algo))
    seen = {"channel": 0, "layer": 0}
    for step in range(25):
        take_grads(ps, step)
        take_grads(rs, step)
        # The problem is built so that both invariance tests fire: check it, so this test cannot pass vacuously.
        conv, mat = rs["conv"].detach(), rs["mat"].detach()
        _, conv_proj = ref_projection(conv, rs["conv"].grad, torch.ones_like(conv), 0.1, 1e-8)
        _, mat_proj = ref_projection(mat, rs["mat"].grad, torch.ones_like(mat), 0.1, 1e-8)
        seen["channel"] += conv_proj
        seen["layer"] += mat_proj
        opt.step()
        ref.step()
        for k in ps:
            torch.testing.assert_close(ps[k], rs[k], **TOL)
    assert seen == {"channel": 25, "layer": 25}
    assert torch.equal(ps["frozen"].detach(), frozen0)
    assert ps["frozen"] not in opt.state
    for k in ps:
        if k == "frozen":
            continue
        st, rst = opt.state[ps[k]], ref.state[rs[k]]
        if algo == "adamp":
            assert float(st["step"]) == rst["t"] == 25
            torch.testing.assert_close(st["exp_avg"], rst["m"], **TOL)
            torch.testing.assert_close(st["exp_avg_sq"], rst["v"], **TOL)
        else:
            torch.testing.assert_close(st["momentum_buffer"], rst["b"], **TOL)


# ----------------------------------------------------------------------------------------------------------
# The projection itself
# ----------------------------------------------------------------------------------------------------------

def _invariant_grad(w, per_channel):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(w.shape, generator=gen, dtype=F64)
    if per_channel:
        rows_w, rows_g = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
        w_hat = rows_w / rows_w.norm(dim=1, keepdim=True)
        return (rows_g - (rows_g * w_hat).sum(1, keepdim=True) * w_hat).reshape(w.shape)
    w_hat = w / w.norm()
    return g - (g * w_hat).sum() * w_hat


@pytest.mark.parametrize("batched", [False, True])
def test_projection_views(batched):
    # eps = 0 so that the projection is exact (w_hat = w / (||w|| + eps) leaves O(eps) of the radial part).
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 2, 3, dtype=F64, generator=gen)
    u = torch.randn(4, 2, 3, dtype=F64, generator=gen)
    cases = {"channel": _invariant_grad(w, True), "layer": _invariant_grad(w, False),
             "none": torch.randn(4, 2, 3, dtype=F64, generator=gen) + w}
    if batched:
        outs, flags = _project_many([w] * 3, list(cases.values()), [u] * 3, 0.1, 0.0)
        results = {k: (o, bool(f)) for k, o, f in zip(cases, outs, flags, strict=True)}
    else:
        results = {}
        for k, g in cases.items():
            q = u.clone()
            results[k] = (q, _project_one(w, g, q, 0.1, 0.0))
    rows_w = w.reshape(4, -1)
    q, flag = results["channel"]
    assert flag
    torch.testing.assert_close((q.reshape(4, -1) * rows_w).sum(1), torch.zeros(4, dtype=F64), atol=1e-12, rtol=0)
    q, flag = results["layer"]
    assert flag
    assert abs(float((q * w).sum())) < 1e-12
    assert (q.reshape(4, -1) * rows_w).sum(1).abs().max() > 1e-3  # projected as a whole, not per channel
    q, flag = results["none"]
    assert not flag and torch.equal(q, u)


def test_vectors_are_never_projected():
    w = torch.randn(5, dtype=F64)
    g = _invariant_grad(w.reshape(1, 5), False).reshape(5)
    u = torch.randn(5, dtype=F64)
    q = u.clone()
    assert not _project_one(w, g, q, 0.1, 1e-8) and torch.equal(q, u)


def test_scale_invariant_weight_norm_grows_less_than_adam():
    """The paper's point: on a scale-invariant weight, Adam inflates ||w||; AdamP keeps it (almost) fixed."""
    def run(cls):
        gen = torch.Generator().manual_seed(4)
        w = torch.randn(8, 6, dtype=F64, generator=gen).requires_grad_()
        target = F.normalize(torch.randn(8, 6, dtype=F64, generator=gen), dim=1)
        opt = cls([w], lr=0.05)
        for _ in range(100):
            opt.zero_grad()
            (-(F.normalize(w, dim=1) * target).sum()).backward()
            opt.step()
        cos = (F.normalize(w.detach(), dim=1) * target).sum(1)
        return w.detach().norm(dim=1), cos
    n0 = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(4)).norm(dim=1)
    norm_p, cos_p = run(AdamP)
    norm_a, _ = run(torch.optim.Adam)
    change_p, change_a = (norm_p / n0 - 1).abs(), (norm_a / n0 - 1).abs()
    assert cos_p.min() > 0.99
    assert change_p.max() < 0.1  # only the second-order growth of a tangential step is left
    assert change_a.mean() > 5 * change_p.mean()


# ----------------------------------------------------------------------------------------------------------
# pytorch_optimizer
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("algo", ["adamp", "sgdp"])
def test_matches_pytorch_optimizer(algo, foreach):
    po = pytest.importorskip("pytorch_optimizer")
    ps, qs = make_params(), make_params()
    groups = param_groups(ps, algo)
    if algo == "adamp":
        # pytorch_optimizer adds eps before the bias correction of v (see module docstring): equal at eps = 0.
        for _, h in groups:
            h["eps"] = 0.0
        ours = AdamP([{"params": p, **h} for p, h in groups], foreach=foreach)
        theirs = po.AdamP([{"params": q, **h} for (q, _), (_, h) in zip(param_groups(qs, algo), groups, strict=True)])
    else:
        ours = SGDP([{"params": p, **h} for p, h in groups], foreach=foreach)
        theirs = po.SGDP([{"params": q, **h} for (q, _), (_, h) in zip(param_groups(qs, algo), groups, strict=True)])
    for step in range(20):
        take_grads(ps, step)
        take_grads(qs, step)
        ours.step()
        theirs.step()
        for k in ps:
            torch.testing.assert_close(ps[k], qs[k], **TOL)


def test_pytorch_optimizer_adamp_eps_placement_differs():
    """Documented difference: pytorch_optimizer adds eps before the bias correction of v, we add it after."""
    po = pytest.importorskip("pytorch_optimizer")
    w0, g = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([1e-3, -2e-3], dtype=F64)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    a.grad, b.grad = g.clone(), g.clone()
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-3
    AdamP([a], lr=lr, betas=(b1, b2), eps=eps).step()
    po.AdamP([b], lr=lr, betas=(b1, b2), eps=eps).step()
    m, v = (1 - b1) * g, (1 - b2) * g * g
    ours = w0 - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    theirs = w0 - lr * (m / (1 - b1)) * math.sqrt(1 - b2) / (v.sqrt() + eps)
    torch.testing.assert_close(a.detach(), ours, **TOL)
    torch.testing.assert_close(b.detach(), theirs, **TOL)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_empty_and_scalar_params(cls, path):
    ps = [torch.zeros(0, 3, requires_grad=True), torch.tensor(2.0, requires_grad=True),
          torch.ones(3, 2, requires_grad=True)]
    for p in ps:
        p.grad = torch.ones_like(p)
    cls(ps, lr=0.1, weight_decay=0.1, **PATHS[path]).step()
    assert ps[0].shape == (0, 3) and float(ps[1].detach()) < 2.0 and float(ps[2].detach().sum()) < 6.0
