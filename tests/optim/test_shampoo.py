"""Shampoo against a plain float64 transcription of Distributed Shampoo's rule, closed forms, Adam before the
start step, and pytorch_optimizer.Shampoo."""

import math

import pytest
import torch

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim.shampoo import Shampoo, block_shape, inverse_root

DT = torch.float64


def ref_shape(shape, max_dim, merge):
    if not merge:
        return tuple(shape) or (1,)
    dims = [d for d in shape if d != 1] or [1]
    out = []
    for d in reversed(dims):  # merge from the last dimension
        if out and out[0] * d <= max_dim:
            out[0] *= d
        else:
            out.insert(0, d)
    return tuple(out)


def ref_blocks(t, max_dim):
    """Index tuples of the blocks, row-major."""
    ranges = [[slice(s, min(s + max_dim, n)) for s in range(0, n, max_dim)] for n in t.shape]
    out = [()]
    for r in ranges:
        out = [o + (s,) for o in out for s in r]
    return out


def ref_root(a, exponent, eps):
    vals, vecs = torch.linalg.eigh(a + eps * torch.eye(a.shape[0], dtype=DT))
    if vals.min() < eps:
        vals = vals - vals.min() + eps
    return vecs @ torch.diag(vals ** -exponent) @ vecs.T


def mode_mul(x, mode, mat):
    return torch.tensordot(mat, x, dims=([1], [mode])).movedim(0, mode)


class Reference:
    """One parameter's Shampoo state and step, written out per block and per factor."""

    def __init__(self, p, hp):
        self.hp, self.t = hp, 0
        self.shape = ref_shape(p.shape, hp["max_preconditioner_dim"], hp["merge_dims"])
        view = torch.zeros(self.shape, dtype=DT)
        self.index = ref_blocks(view, hp["max_preconditioner_dim"])
        self.factors = [[torch.zeros(view[ix].shape[i], view[ix].shape[i], dtype=DT) for i in range(view.ndim)]
                        for ix in self.index]
        self.roots = [[None] * view.ndim for _ in self.index]
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)

    def step(self, p, g):
        hp = self.hp
        b1, b2 = hp["betas"]
        lr, wd = hp["lr"], hp["weight_decay"]
        freq = hp["precondition_frequency"]
        start = freq if hp["start_preconditioning_step"] == -1 else hp["start_preconditioning_step"]
        self.t += 1
        t = self.t
        if not hp["decoupled_weight_decay"]:
            g = g + wd * p
        gv = g.reshape(self.shape)
        for bi, ix in enumerate(self.index):
            blk = gv[ix]
            for i in range(blk.ndim):
                u = blk.movedim(i, 0).reshape(blk.shape[i], -1)
                self.factors[bi][i] = (self.factors[bi][i] + u @ u.T if b2 == 1
                                       else b2 * self.factors[bi][i] + (1 - b2) * u @ u.T)
        if b1 > 0:
            self.m = b1 * self.m + (1 - b1) * g
            mhat = self.m / (1 - b1 ** t)
        else:
            mhat = g
        gr = hp["grafting"]
        if gr == "adagrad":
            self.v = self.v + g * g
            graft = mhat / (self.v.sqrt() + hp["grafting_epsilon"])
        elif gr in ("rmsprop", "adam"):
            gb = hp["grafting_beta2"]
            self.v = gb * self.v + (1 - gb) * g * g
            bc = 1 - gb ** t if gr == "adam" else 1.0
            graft = mhat / ((self.v / bc).sqrt() + hp["grafting_epsilon"])
        else:
            graft = mhat
        if t < start:
            d = graft
        else:
            bc2 = 1 - b2 ** t if b2 < 1 else 1.0
            if (t % freq == 0 and t > start) or t == start:
                for bi in range(len(self.index)):
                    k = len(self.factors[bi])
                    self.roots[bi] = [ref_root(f / bc2, 1 / (2 * k), hp["epsilon"]) for f in self.factors[bi]]
            out = torch.zeros(self.shape, dtype=DT)
            mv, grv = mhat.reshape(self.shape), graft.reshape(self.shape)
            for bi, ix in enumerate(self.index):
                x = mv[ix]
                for i, r in enumerate(self.roots[bi]):
                    x = mode_mul(x, i, r)
                if gr != "none":
                    x = x * grv[ix].norm() / (x.norm() + 1e-16)
                out[ix] = x
            d = out.reshape(p.shape)
        if hp["decoupled_weight_decay"]:
            p = p * (1 - lr * wd)
        return p - lr * d


SHAPES = [(6, 5), (40, 30), (3, 1, 4), (2, 3, 4), (7,), ()]
# epsilons well above rounding: factors are rank-deficient for the first steps, where the eigenvalue shift
# (min < eps) amplifies rounding noise of the zero eigenvalues by eps^{-1/(2k)}
SETTINGS = [
    dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-6, weight_decay=0.01, decoupled_weight_decay=True,
         max_preconditioner_dim=16, precondition_frequency=2, start_preconditioning_step=4, grafting="adam",
         grafting_beta2=0.99, grafting_epsilon=1e-8, merge_dims=True),
    dict(lr=0.02, betas=(0.5, 1.0), epsilon=1e-6, weight_decay=0.1, decoupled_weight_decay=False,
         max_preconditioner_dim=5, precondition_frequency=1, start_preconditioning_step=-1, grafting="adagrad",
         grafting_beta2=0.999, grafting_epsilon=1e-10, merge_dims=True),
    dict(lr=0.1, betas=(0.0, 0.9), epsilon=1e-5, weight_decay=0.0, decoupled_weight_decay=True,
         max_preconditioner_dim=1024, precondition_frequency=3, start_preconditioning_step=3, grafting="rmsprop",
         grafting_beta2=0.9, grafting_epsilon=1e-8, merge_dims=False),
    dict(lr=0.1, betas=(0.9, 1.0), epsilon=1e-5, weight_decay=0.0, decoupled_weight_decay=True,
         max_preconditioner_dim=8, precondition_frequency=2, start_preconditioning_step=2, grafting="none",
         grafting_beta2=0.9, grafting_epsilon=1e-8, merge_dims=True),
    dict(lr=0.1, betas=(0.9, 1.0), epsilon=1e-5, weight_decay=0.0, decoupled_weight_decay=True,
         max_preconditioner_dim=8, precondition_frequency=1, start_preconditioning_step=2, grafting="sgd",
         grafting_beta2=0.9, grafting_epsilon=1e-8, merge_dims=True),
]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("hp", SETTINGS, ids=[f"{h['grafting']}-{h['betas']}" for h in SETTINGS])
def test_matches_reference(hp, foreach):
    params = _params()
    opt = Shampoo(params, foreach=foreach, **hp)
    refs = [Reference(p, {**hp, "lr": hp["lr"]}) for p in params]
    ref_p = [p.clone() for p in params]
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        grads = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref_p = [r.step(q, g) for r, q, g in zip(refs, ref_p, grads, strict=True)]
        for p, q in zip(params, ref_p, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_block_shapes_follow_distributed_shampoo():
    assert block_shape((6, 5), 1024) == (30,)
    assert block_shape((32, 3, 64, 64), 8192) == (96, 4096)
    assert block_shape((1, 2, 5, 1), 10) == (10,)
    assert block_shape((1, 2, 5, 1), 1) == (2, 5)
    assert block_shape((4096, 4096), 1024) == (4096, 4096)
    assert block_shape((), 1024) == (1,)
    assert block_shape((3, 1, 4), 1024, merge=False) == (3, 1, 4)


def test_inverse_fourth_root_of_a_diagonal():
    """diag(1, 16, 81)^{-1/4} = diag(1, 1/2, 1/3): the -1/4 root, not -1/2 (a known wrong-root bug)."""
    root = inverse_root(torch.diag(torch.tensor([1.0, 16.0, 81.0], dtype=DT)), 0.25, 1e-30)
    torch.testing.assert_close(root, torch.diag(torch.tensor([1.0, 0.5, 1 / 3], dtype=DT)), rtol=1e-12, atol=1e-14)


def test_a_scalar_parameter_is_adagrad():
    p = torch.tensor([0.7], dtype=DT)
    opt = Shampoo([p], lr=0.1, betas=(0.0, 1.0), epsilon=1e-6, grafting="none")
    acc, ref = 0.0, 0.7
    for g in (0.3, -1.2, 0.5, 2.0):
        acc += g * g
        ref -= 0.1 * g / math.sqrt(acc + 1e-6)
        p.grad = torch.tensor([g], dtype=DT)
        opt.step()
        assert abs(p.item() - ref) < 1e-12


def test_grafted_block_norms_equal_the_grafting_methods():
    p = torch.zeros(40, 30, dtype=DT)
    opt = Shampoo([p], lr=1.0, betas=(0.0, 1.0), max_preconditioner_dim=16, grafting="adagrad")
    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(0), dtype=DT)
    p.grad = g.clone()
    opt.step()
    adagrad = g / (g.abs() + 1e-10)
    for rows in (slice(0, 16), slice(16, 32), slice(32, 40)):
        for cols in (slice(0, 16), slice(16, 30)):
            torch.testing.assert_close((-p[rows, cols]).norm(), adagrad[rows, cols].norm(), rtol=1e-10, atol=0)


def test_before_the_start_step_adam_grafting_is_adam():
    a, b = _params(), _params()
    shampoo = Shampoo(a, lr=0.01, betas=(0.9, 0.999), grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
                      precondition_frequency=10, start_preconditioning_step=10)
    adam = torch.optim.Adam(b, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(2)
    for _ in range(9):
        grads = [torch.randn(p.shape, generator=gen, dtype=DT) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        shampoo.step()
        adam.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert not torch.equal(shampoo.state[a[0]]["factor_0_0"], torch.zeros(30, 30, dtype=DT))  # accumulating


def test_matches_pytorch_optimizer_shampoo():
    """Original Shampoo: AdaGrad-style sums started at eps I, roots every step, no grafting/merging/blocking."""
    from pytorch_optimizer import Shampoo as KShampoo

    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,), (6, 4)]
    a = [torch.randn(s, generator=gen, dtype=DT, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    x = torch.randn(8, 5, generator=gen, dtype=DT)
    ours = Shampoo(a, lr=0.05, betas=(0.0, 1.0), epsilon=1e-6, grafting="none", merge_dims=False)
    theirs = KShampoo(b, lr=0.05, momentum=0.0, matrix_eps=1e-6, preconditioning_compute_steps=1)

    def loss(ps):
        h = torch.tanh(x @ ps[0] + ps[1][:3])
        return (h @ ps[2][:3]).square().mean() + ps[1].square().sum()

    for _ in range(10):
        for opt, ps in ((ours, a), (theirs, b)):
            opt.zero_grad()
            loss(ps).backward()
            opt.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(lr=-1.0), r"lr=-1\.0"), (dict(betas=(1.0, 1.0)), r"betas\[0\]"), (dict(betas=(0.9, 0.0)), r"betas\[1\]"),
    (dict(betas=(0.9, 1.5)), r"betas\[1\]"), (dict(betas=0.9), r"betas"), (dict(epsilon=0.0), r"epsilon=0\.0"),
    (dict(weight_decay=-0.1), r"weight_decay"), (dict(max_preconditioner_dim=0), r"max_preconditioner_dim"),
    (dict(precondition_frequency=0), r"precondition_frequency=0"),
    (dict(precondition_frequency=2.5), r"precondition_frequency must be an integer"),
    (dict(start_preconditioning_step=-2), r"start_preconditioning_step=-2"),
    (dict(precondition_frequency=10, start_preconditioning_step=5), r"start_preconditioning_step=5.*>= "
                                                                    r"precondition_frequency=10"),
    (dict(grafting="lion"), r"grafting"), (dict(grafting_beta2=0.0), r"grafting_beta2"),
    (dict(grafting_epsilon=0.0), r"grafting_epsilon"), (dict(merge_dims="yes"), r"merge_dims"),
    (dict(eigh_dtype="half"), r"eigh_dtype"), (dict(decoupled_weight_decay=0), r"decoupled_weight_decay"),
    (dict(use_bias_correction=None), r"use_bias_correction"), (dict(foreach="yes"), r"foreach")])
def test_bad_hyperparameters_are_config_errors_naming_them(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Shampoo([torch.zeros(3, 2, requires_grad=True)], **kwargs)
    opt = Shampoo([torch.zeros(3, 2, requires_grad=True)])
    with pytest.raises(ConfigError, match=pattern):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **kwargs})
    assert len(opt.param_groups) == 1


def test_float32_eigh_in_float64():
    p = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    opt = optim.create("shampoo", [p], eigh_dtype="float64", max_preconditioner_dim=16)
    for _ in range(3):
        p.grad = torch.randn(20, 30)
        opt.step()
    assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert opt.state[p]["root_0_0"].dtype == torch.float32
