import copy

import pytest
import torch

from sgdlab.optim import state_bytes
from sgdlab.optim.lookahead import Lookahead, lookahead

SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]


def make_params(shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def grads_for(step, shapes=SHAPES):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def reference_run(params, hps, grads_seq, k, alpha):
    """Algorithm 1 of Zhang et al. (2019) with heavy-ball SGD (torch.optim.SGD's rule) as the inner
    optimizer A, one tensor at a time."""
    theta = [p.clone() for p in params]
    phi = [p.clone() for p in params]  # phi_0 = theta_0
    buf = [None] * len(params)
    for t, grads in enumerate(grads_seq, start=1):
        for i, g in enumerate(grads):  # inner step theta <- theta + A(...)
            lr, mu = hps[i]["lr"], hps[i]["momentum"]
            buf[i] = g.clone() if buf[i] is None else mu * buf[i] + g
            theta[i] = theta[i] - lr * buf[i]
        if t % k == 0:  # outer update, then fast weights restart from slow ones
            for i in range(len(params)):
                phi[i] = phi[i] + alpha * (theta[i] - phi[i])
                theta[i] = phi[i].clone()
    return theta, phi, buf


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference_sgd(foreach):
    ps = make_params()
    frozen = torch.randn(6, dtype=torch.float64)
    frozen0 = frozen.clone()
    start = [p.clone() for p in ps]
    hp1, hp2 = dict(lr=0.05, momentum=0.9), dict(lr=0.02, momentum=0.5)
    inner = torch.optim.SGD([{"params": [ps[0], frozen], **hp1}, {"params": ps[1:], **hp2}], foreach=foreach)
    opt = Lookahead(inner, k=4, alpha=0.6, foreach=foreach)
    seq = [grads_for(t) for t in range(23)]
    for t, gs in enumerate(seq, start=1):
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        theta, phi, buf = reference_run(start, [hp1, hp2, hp2], seq[:t], k=4, alpha=0.6)
        for i, p in enumerate(ps):
            torch.testing.assert_close(p, theta[i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["slow_param"], phi[i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf[i], rtol=1e-12, atol=1e-12)
        assert torch.equal(frozen, frozen0)
        assert torch.equal(opt.state[frozen]["slow_param"], frozen0)
    assert opt.fast_steps == 23


@pytest.mark.parametrize("make_inner", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
])
def test_k1_alpha1_is_the_base_optimizer_exactly(make_inner):
    ps = make_params()
    qs = [p.clone() for p in ps]
    opt = Lookahead(make_inner(ps), k=1, alpha=1.0)
    base = make_inner(qs)
    for t in range(15):
        for p, q, g in zip(ps, qs, grads_for(t), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        base.step()
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_matches_pytorch_optimizer(pullback):
    po = pytest.importorskip("pytorch_optimizer")
    ps = make_params()
    qs = [p.clone() for p in ps]
    ours = Lookahead(torch.optim.SGD(ps, lr=0.05, momentum=0.9), k=3, alpha=0.5, pullback=pullback)
    theirs = po.Lookahead(torch.optim.SGD(qs, lr=0.05, momentum=0.9), k=3, alpha=0.5, pullback_momentum=pullback)
    for t in range(20):
        for p, q, g in zip(ps, qs, grads_for(t), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(ps, qs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_pullback_modes_act_on_momentum():
    p = torch.zeros(3, dtype=torch.float64)
    opt = Lookahead(torch.optim.SGD([p], lr=0.1, momentum=0.9), k=2, alpha=0.5, pullback="reset")
    for _ in range(2):
        p.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
    assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], torch.zeros(3, dtype=torch.float64))
    q = torch.zeros(3, dtype=torch.float64)
    opt = Lookahead(torch.optim.SGD([q], lr=0.1, momentum=0.9), k=2, alpha=0.5, pullback="pullback")
    for _ in range(2):
        q.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
    # buffer after two steps is 1.9; pulled back half-way from the slow momentum 0
    torch.testing.assert_close(opt.base_optimizer.state[q]["momentum_buffer"], torch.full((3,), 0.95, dtype=q.dtype))


def test_behaves_as_torch_optimizer():
    model = torch.nn.Linear(3, 2)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda o, a, kw: calls.append(1))
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and calls == [1]
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra]})
    assert torch.equal(opt.state[extra]["slow_param"], torch.ones(2))
    # memory accounting sees the inner state and the slow weights
    inner_bytes = state_bytes(opt.base_optimizer)
    slow_bytes = sum(p.numel() * p.element_size() for p in [*model.parameters(), extra])
    assert state_bytes(opt) == inner_bytes + slow_bytes
    assert "Lookahead(k=2" in repr(opt)
    copy.deepcopy(opt).step(None)


def test_factory_builds_registered_base():
    model = torch.nn.Linear(3, 2)
    opt = lookahead(model.parameters(), base="sgd", k=3, alpha=0.8, lr=0.2, momentum=0.5)
    assert isinstance(opt.base_optimizer, torch.optim.SGD) and (opt.k, opt.alpha) == (3, 0.8)
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["momentum"] == 0.5
    assert isinstance(lookahead(model.parameters()).base_optimizer, torch.optim.AdamW)
    with pytest.raises(TypeError, match="no hyperparameter"):
        lookahead(model.parameters(), base="sgd", betas=(0.9, 0.9))
