"""PSGD Kron against a plain float64 transcription of the rule (injected random vectors), closed forms, its
statistical fixed point, invariants, and pytorch_optimizer.Kron."""

import math

import pytest
import torch

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim.kron import Kron, norm_lower_bound, update_probability

DT = torch.float64
TINY = torch.finfo(torch.bfloat16).tiny


def lower_bound(s):
    """The reference code's spectral-norm lower bound, both sides, for one matrix."""
    m = s.abs().max()
    a = s / m if m > 0 else s
    aa = a * a
    v0, i = aa.sum(0).max(0)
    v1, j = aa.sum(1).max(0)
    x0 = a[:, i] @ a
    b0 = ((x0 / x0.norm()) @ a.T).norm()
    x1 = a @ a[j, :]
    b1 = (a.T @ (x1 / x1.norm())).norm()
    return m * (b0 if v0 > v1 else b1)


def unfold(x, i):
    return x.movedim(i, 0).reshape(x.shape[i], -1)


def fold(u, i, shape):
    moved = [shape[i]] + [n for k, n in enumerate(shape) if k != i]
    return u.reshape(moved).movedim(0, i)


class Reference:
    """One parameter's Kron state, each factor a plain matrix (or vector) and every product a mode product."""

    def __init__(self, p, hp):
        self.hp, self.t = hp, 0
        self.shape = tuple(p.shape) or (1,)
        k = len(self.shape)
        self.diag = []
        for n in self.shape:
            self.diag.append(n == 1 or n > hp["max_size_triangular"] or k < hp["min_ndim_triangular"]
                             or hp["memory_save_mode"] == "all_diag")
        s = hp["precond_init_scale"] ** (1 / k)
        self.q = [s * torch.ones(n, dtype=DT) if d else s * torch.eye(n, dtype=DT)
                  for n, d in zip(self.shape, self.diag, strict=True)]
        self.m = torch.zeros(self.shape, dtype=DT)

    def apply(self, x, i, mat, transpose=False, solve=False):
        if self.diag[i]:
            shape = [1] * len(self.shape)
            shape[i] = self.shape[i]
            return x / mat.reshape(shape) if solve else x * mat.reshape(shape)
        u = unfold(x, i)
        if solve:  # Q^{-T} u
            u = torch.linalg.solve(mat.T, u)
        else:
            u = (mat.T if transpose else mat) @ u
        return fold(u, i, list(x.shape))

    def step(self, p, g, v, update, balance):
        hp, beta = self.hp, self.hp["momentum"]
        self.t += 1
        g = g.reshape(self.shape)
        self.m = beta * self.m + (1 - beta) * g
        h = self.m / (1 - beta ** self.t) if beta > 0 else g
        if balance and p.ndim > 1:
            norms = [q.abs().max() for q in self.q]
            gm = math.prod(norms) ** (1 / len(norms))
            self.q = [q * gm / n for q, n in zip(self.q, norms, strict=True)]
        if update:
            a, b = h, v.reshape(self.shape)
            for i, q in enumerate(self.q):
                a = self.apply(a, i, q)
                b = self.apply(b, i, q, solve=True)
            new = []
            for i, q in enumerate(self.q):
                ua, ub = unfold(a, i), unfold(b, i)
                if self.diag[i]:
                    t1, t2 = (ua * ua).sum(1), (ub * ub).sum(1)
                    new.append(q - hp["precond_lr"] * (t1 - t2) * q / ((t1 + t2).abs().max() + TINY))
                else:
                    t1, t2 = ua @ ua.T, ub @ ub.T
                    new.append(q - hp["precond_lr"] * torch.triu(t1 - t2) / (lower_bound(t1 + t2) + TINY) @ q)
            self.q = new
        d = h
        for i, q in enumerate(self.q):
            d = self.apply(self.apply(d, i, q), i, q, transpose=True)
        d = d * min(1.0, 1.1 / (d.square().mean().sqrt().item() + 1e-6))
        d = d.reshape(p.shape)
        if p.ndim >= 2:
            p = p * (1 - hp["lr"] * hp["weight_decay"])
        return p - hp["lr"] * d


SHAPES = [(4, 3), (5,), (2, 3, 2), (), (1, 4)]
HP = dict(lr=0.05, momentum=0.9, weight_decay=0.1, precond_lr=0.3, precond_init_scale=2.0, max_size_triangular=8192,
          min_ndim_triangular=2, memory_save_mode=None)


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]


class Injected(Kron):
    """Kron whose random vectors come from a list (the test's), and whose decisions are given."""

    def __init__(self, *args, noises, **kwargs):
        super().__init__(*args, **kwargs)
        self.noises = noises

    def _noise(self, p, dtype):
        return self.noises.pop(0).to(dtype).reshape(p.shape)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("variant", [{}, {"momentum": 0.0, "max_size_triangular": 3},
                                     {"memory_save_mode": "all_diag", "weight_decay": 0.0}])
def test_matches_reference(foreach, variant):
    hp = {**HP, **variant}
    params = _params()
    gen = torch.Generator().manual_seed(5)
    schedule = [(True, False), (True, True), (False, False), (True, False), (False, True), (True, True)] * 2
    noises = [torch.randn(p.shape, generator=gen, dtype=DT) for _ in schedule for p in params]
    opt = Injected(params, noises=list(noises), update_probability=1.0, balance_prob=0.0, foreach=foreach, **hp)
    refs = [Reference(p, hp) for p in params]
    ref_p = [p.clone() for p in params]
    k = 0
    for update, balance in schedule:
        grads = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt._prepare = lambda groups, u=update, b=balance: (setattr(opt, "_update", u), setattr(opt, "_balance", b))
        opt.step()
        vs = noises[k:k + len(params)] if update else [None] * len(params)
        k += len(params) if update else 0
        ref_p = [r.step(q, g, v, update, balance) for r, q, g, v in zip(refs, ref_p, grads, vs, strict=True)]
        for p, q in zip(params, ref_p, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    for p, r in zip(params, refs, strict=True):  # the factors too; dense ones stay upper triangular
        for i, q in enumerate(r.q):
            got = opt.state[p][f"Q{i}"]
            torch.testing.assert_close(got, q, rtol=1e-9, atol=1e-11)
            if got.ndim == 2:
                assert torch.equal(got, torch.triu(got))


def test_one_diagonal_update_from_the_identity_has_a_closed_form():
    p = torch.zeros(6, dtype=DT)
    h = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3, 1.5], dtype=DT)
    v = torch.tensor([1.0, 0.2, -0.7, 1.3, 0.0, -2.0], dtype=DT)
    opt = Injected([p], noises=[v], lr=0.0, momentum=0.0, precond_lr=0.1, update_probability=1.0)
    p.grad = h.clone()
    opt.step()
    expected = 1 - 0.1 * (h ** 2 - v ** 2) / (h ** 2 + v ** 2).abs().max()
    torch.testing.assert_close(opt.state[p]["Q0"], expected, rtol=1e-14, atol=0)


def test_fixed_point_whitens_a_constant_gradient():
    """1-D, constant g, fresh v: q^4 g^2 -> E[v^2] = 1, so |P g| -> 1 (sign descent), statistically."""
    p = torch.zeros(64, dtype=DT)
    g = torch.logspace(-0.5, 0.5, 64, dtype=DT)  # the step is normalised by the largest entry: keep them alike
    opt = Kron([p], lr=0.0, momentum=0.0, precond_lr=0.05, update_probability=1.0, seed=3)
    for _ in range(1500):
        p.grad = g.clone()
        opt.step()
    pg = opt.state[p]["Q0"] ** 2 * g
    assert abs(pg.mean().item() - 1) < 0.05 and (pg - 1).abs().max().item() < 0.3


def test_balancing_keeps_the_preconditioner():
    qs = [torch.triu(torch.rand(1, 3, 3, dtype=DT)) + torch.eye(3, dtype=DT), 7 * torch.eye(2, dtype=DT)[None]]
    kron = torch.kron(qs[0][0], qs[1][0])
    out = Kron._balanced(qs)
    torch.testing.assert_close(torch.kron(out[0][0], out[1][0]), kron, rtol=1e-12, atol=1e-12)
    assert torch.isclose(out[0].abs().max(), out[1].abs().max())


def test_applied_direction_rms_is_at_most_1_1():
    p = torch.zeros(8, 8, dtype=DT)
    opt = Kron([p], lr=1.0, momentum=0.0, precond_init_scale=100.0)
    p.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    opt.step()
    assert p.square().mean().sqrt().item() <= 1.1 + 1e-12


def test_norm_lower_bound_is_a_lower_bound_and_tight_on_rank_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 6, generator=gen, dtype=DT)
    s = x @ x.mT
    lb = norm_lower_bound(s)
    top = torch.linalg.matrix_norm(s, ord=2)
    assert (lb <= top * (1 + 1e-12)).all() and (lb >= top / 6 ** 0.5).all()
    for b in range(5):
        torch.testing.assert_close(lb[b], lower_bound(s[b]), rtol=1e-12, atol=0)
    u = torch.randn(6, generator=gen, dtype=DT)
    torch.testing.assert_close(norm_lower_bound(torch.outer(u, u)[None])[0], u @ u, rtol=1e-12, atol=0)


def test_update_probability_schedule():
    assert update_probability(0) == 1.0 and update_probability(500) == 1.0
    assert update_probability(1000) == pytest.approx(math.exp(-0.5))
    assert update_probability(10 ** 6) == 0.03


def test_random_updates_follow_the_probability_and_the_seed():
    def run(seed):
        p = torch.zeros(4, 4, dtype=DT)
        opt = Kron([p], update_probability=0.3, seed=seed)
        changed = []
        for _ in range(200):
            before = opt.state[p]["Q0"].clone() if opt.state else None
            p.grad = torch.ones(4, 4, dtype=DT)
            opt.step()
            changed.append(before is None or not torch.equal(before, opt.state[p]["Q0"]))
        return changed

    a = run(1)
    assert a == run(1) and a != run(2)
    assert 0.2 < sum(a) / len(a) < 0.4


def test_matches_pytorch_optimizer_kron():
    """Update probability 1, no balancing, the same v (from the global generator, in parameter order)."""
    from pytorch_optimizer import Kron as KKron

    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (3,), (3, 4)]
    a = [torch.randn(s, generator=gen, dtype=DT, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    x = torch.randn(16, 5, generator=gen, dtype=DT)
    ours = Kron(a, lr=0.01, momentum=0.9, weight_decay=0.1, update_probability=1.0, balance_prob=0.0, foreach=False)
    ours._noise = lambda p, dtype: torch.randn(p.shape, dtype=dtype)
    theirs = KKron(b, lr=0.01, momentum=0.9, weight_decay=0.1, pre_conditioner_update_probability=1.0,
                   balance_prob=0.0, precondition_dtype=DT)

    def loss(ps):
        return (torch.tanh(x @ ps[0] + ps[1]) @ ps[2]).square().mean()

    for step in range(12):
        for opt, ps in ((ours, a), (theirs, b)):
            torch.manual_seed(100 + step)
            opt.zero_grad()
            loss(ps).backward()
            opt.step()
    for p, q in zip(a, b, strict=True):  # its triangular solves run in float32
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(lr=-1.0), r"lr=-1\.0"), (dict(momentum=1.0), r"momentum=1\.0"), (dict(weight_decay=-1.0), r"weight_decay"),
    (dict(precond_lr=0.0), r"precond_lr=0\.0"), (dict(precond_lr=2.0), r"precond_lr"),
    (dict(precond_init_scale=0.0), r"precond_init_scale"), (dict(update_probability=0.0), r"update_probability"),
    (dict(update_probability=1.5), r"update_probability"), (dict(max_size_triangular=0), r"max_size_triangular"),
    (dict(min_ndim_triangular=1.5), r"min_ndim_triangular"), (dict(memory_save_mode="some"), r"memory_save_mode"),
    (dict(momentum_into_precond_update=1), r"momentum_into_precond_update"), (dict(balance_prob=1.5), r"balance_prob"),
    (dict(seed=-1), r"seed"), (dict(foreach="yes"), r"foreach")])
def test_bad_hyperparameters_are_config_errors_naming_them(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Kron([torch.zeros(3, 2, requires_grad=True)], **kwargs)
    with pytest.raises(ConfigError, match=pattern):
        optim.create("kron", [torch.zeros(3, 2, requires_grad=True)], **kwargs)
