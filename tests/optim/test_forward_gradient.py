"""Forward gradients (Baydin et al., 2022): the forward-mode directional derivative against torch.func.jvp over
functional_call and against grad . v, unbiasedness and the (d + 2) second moment on a quadratic (Monte Carlo),
MeZO's estimate for the same direction, and the SGD step on g_hat against a float64 replay."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim import protocol
from sgdlab.optim.forward_gradient import ForwardGradient, directional_derivative

DT = torch.float64


def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)
    return model, x, y


def test_directional_derivative_equals_torch_func_jvp_and_grad_dot_v():
    model, x, y = mlp()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(2)
    vs = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()}
    before = {k: p.detach().clone() for k, p in params.items()}

    def f(ps):
        return F.cross_entropy(functional_call(model, ps, (x,)), y)
    value, d_func = jvp(f, ({k: p.detach() for k, p in params.items()},), (vs,))
    f0, d = directional_derivative(lambda: F.cross_entropy(model(x), y), list(params.values()), list(vs.values()))
    assert d == pytest.approx(float(d_func), rel=1e-12) and f0 == pytest.approx(float(value), rel=1e-14)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    assert d == pytest.approx(float(sum((g * v).sum() for g, v in zip(grads, vs.values(), strict=True))), rel=1e-12)
    assert all(torch.equal(params[k], before[k]) for k in params)  # values unchanged
    assert all(torch.autograd.forward_ad.unpack_dual(p).tangent is None for p in params.values())


def test_a_basis_tangent_gives_the_partial_derivative():
    model, x, y = mlp()
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    for i, j in [(0, 3), (1, 2), (3, 0)]:
        vs = [torch.zeros_like(p) for p in params]
        vs[i].view(-1)[j] = 1.0
        _, d = directional_derivative(lambda: F.cross_entropy(model(x), y), params, vs)
        assert d == pytest.approx(float(grads[i].view(-1)[j]), rel=1e-12, abs=1e-15)


def quadratic(d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(d, d, generator=gen, dtype=DT)
    a = q @ q.T / d + torch.eye(d, dtype=DT)
    b = torch.randn(d, generator=gen, dtype=DT)
    w = torch.randn(d, generator=gen, dtype=DT, requires_grad=True)
    return w, a, b, (lambda: 0.5 * w @ a @ w - b @ w)


def test_unbiased_with_second_moment_d_plus_2_on_a_quadratic():
    w, a, b, loss = quadratic()
    g = (a @ w - b).detach()
    n = 2000
    opt = ForwardGradient([w], lr=0.0, seed=5)
    est = []
    for _ in range(n):
        opt.before_backward(protocol.StepContext(loss=loss))
        est.append(w.grad.clone())
    est = torch.stack(est)
    mean, sd = est.mean(0), est.std(0) / math.sqrt(n)
    assert ((mean - g).abs() <= 4 * sd).all()
    second = est.square().sum(1)
    assert abs(second.mean() - (g.numel() + 2) * g.square().sum()) <= 4 * second.std() / math.sqrt(n)


def test_equals_mezos_central_difference_on_a_quadratic():
    w, a, b, loss = quadratic(seed=1)
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    _, d = directional_derivative(loss, [w], [v])
    eps = 1e-3
    with torch.no_grad():
        w0 = w.detach().clone()
        plus = 0.5 * (w0 + eps * v) @ a @ (w0 + eps * v) - b @ (w0 + eps * v)
        minus = 0.5 * (w0 - eps * v) @ a @ (w0 - eps * v) - b @ (w0 - eps * v)
    assert d == pytest.approx(float((plus - minus) / (2 * eps)), rel=1e-9)


def test_steps_are_sgd_with_momentum_on_the_forward_gradient():
    """A float64 replay: the same tangents (one generator seeded with ``seed``, drawn parameter by parameter
    across steps), d = grad f . v computed by autograd, heavy-ball SGD with coupled weight decay."""
    model, x, y = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = optim.create("forward-gradient", model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, seed=4)
    ctx = protocol.StepContext(loss=lambda: F.cross_entropy(model(x), y), model=model)
    for _ in range(6):
        opt.zero_grad()
        protocol.forward_backward(opt, ctx)
        protocol.step(opt, ctx)
    gen = torch.Generator().manual_seed(4)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        for q, s in zip(ref.parameters(), start, strict=True):
            q.copy_(s)
    bufs = [None] * len(start)
    for _ in range(6):
        qs = list(ref.parameters())
        vs = [torch.randn(q.shape, generator=gen, dtype=DT) for q in qs]
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), qs)
        dd = sum((g * v).sum() for g, v in zip(grads, vs, strict=True))
        with torch.no_grad():
            for i, (q, v) in enumerate(zip(qs, vs, strict=True)):
                step = dd * v + 0.01 * q
                bufs[i] = step.clone() if bufs[i] is None else 0.9 * bufs[i] + step
                q.sub_(0.05 * bufs[i])
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_converges_on_a_well_conditioned_quadratic():
    w, a, b, loss = quadratic(seed=2)
    opt = optim.create("forward-gradient", [w], lr=0.05)
    ctx = protocol.StepContext(loss=loss)
    for _ in range(1500):
        protocol.forward_backward(opt, ctx)
        protocol.step(opt, ctx)
        opt.zero_grad()
    assert (a @ w - b).norm() < 1e-3


def test_protocol_declares_a_hook_and_no_backward():
    need = protocol.needs(optim.create("forward-gradient", [torch.zeros(2, requires_grad=True)]))
    assert need.before_backward is not None and not need.backward and not need.closure


@pytest.mark.parametrize("kw, pattern", [({"momentum": 1.0}, r"momentum=1\.0"), ({"tangents": 0}, "tangents=0"),
                                         ({"seed": -1}, "seed=-1"), ({"weight_decay": -1.0}, "weight_decay"),
                                         ({"lr": -1.0}, "lr")])
def test_bad_hyperparameters_are_config_errors_naming_them(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create("forward-gradient", [torch.zeros(2, requires_grad=True)], **kw)
