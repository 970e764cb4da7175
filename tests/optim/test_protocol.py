"""The step protocol (sgdlab.optim.protocol) as the optimizers declare it: Sophia-G's ``before_backward``,
Sophia-H's ``step_closure``, and Lookahead forwarding whatever its inner optimizer declares."""

import pytest
import torch
import torch.nn.functional as F

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim import protocol
from sgdlab.optim.lookahead import Lookahead
from sgdlab.optim.sophia import SophiaG, SophiaH, gnb_loss
from sgdlab.optim.swa import SWA
from sgdlab.optim.swad import SWAD

DT = torch.float64


class Softmax:
    """Softmax regression on fixed data, with a sampled-label loss for Sophia-G (fresh labels per step)."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 5, generator=gen, dtype=DT)
        self.y = torch.randint(0, 3, (32,), generator=gen)
        self.w = torch.zeros(5, 3, dtype=DT, requires_grad=True)
        self.b = torch.zeros(3, dtype=DT, requires_grad=True)

    def logits(self):
        return self.x @ self.w + self.b

    def loss(self):
        return F.cross_entropy(self.logits(), self.y)

    def ctx(self, step):
        def sampled():
            return gnb_loss(self.logits(), generator=torch.Generator().manual_seed(step)), self.x.shape[0]

        return protocol.StepContext(loss=self.loss, sampled_loss=sampled)


def _protocol_run(make, steps=12):
    pb = Softmax()
    opt = make([pb.w, pb.b])
    for t in range(steps):
        ctx = pb.ctx(t)
        opt.zero_grad(set_to_none=True)
        protocol.forward_backward(opt, ctx)
        protocol.step(opt, ctx)
    return pb, opt


def _manual_run(make, steps=12):
    """What sgdlab's runner did before the protocol (its ``hessian_hook``), written out."""
    pb = Softmax()
    opt = make([pb.w, pb.b])
    sophia = getattr(opt, "base_optimizer", opt)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        if sophia.hessian_due:
            loss, n = pb.ctx(t).sampled_loss()
            loss.backward()
            sophia.update_hessian(batch_size=n)
            sophia.zero_grad(set_to_none=True)
        pb.loss().backward()
        opt.step()
    return pb, opt


@pytest.mark.parametrize("make", [lambda ps: SophiaG(ps, lr=0.05, k=3),
                                  lambda ps: Lookahead(SophiaG(ps, lr=0.05, k=3), k=4)],
                         ids=["sophia-g", "lookahead(sophia-g)"])
def test_sophia_g_through_the_protocol_equals_the_manual_loop(make):
    (a, opt_a), (b, opt_b) = _protocol_run(make), _manual_run(make)
    assert torch.equal(a.w, b.w) and torch.equal(a.b, b.b)
    sophia = getattr(opt_a, "base_optimizer", opt_a)
    assert (sophia.state[a.w]["hessian"] > 0).any()  # the estimates arrived (through Lookahead too)
    assert torch.equal(sophia.state[a.w]["hessian"], getattr(opt_b, "base_optimizer", opt_b).state[b.w]["hessian"])


@pytest.mark.parametrize("wrap", [False, True])
def test_sophia_h_through_the_protocol_equals_step_with_closure(wrap):
    def make(ps):
        opt = SophiaH(ps, lr=0.05, k=3, seed=4)
        return Lookahead(opt, k=4) if wrap else opt

    a, _ = _protocol_run(make)
    b = Softmax()
    opt = make([b.w, b.b])
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        b.loss().backward()
        opt.step(b.loss)
    assert torch.equal(a.w, b.w) and torch.equal(a.b, b.b)


def test_what_each_optimizer_declares():
    ps = [torch.zeros(3, 2, requires_grad=True)]
    g, h = SophiaG(ps), SophiaH(ps)
    assert protocol.needs(g).before_backward is not None and not protocol.needs(g).closure
    assert protocol.needs(h).closure and protocol.needs(h).before_backward is None
    for opt in (g, h):
        assert not hasattr(opt, "needs_closure") and not hasattr(opt, "needs_sampled_loss")  # the old names
    assert protocol.needs(Lookahead(g)).before_backward is not None
    assert protocol.needs(Lookahead(h)).closure
    assert protocol.needs(Lookahead(torch.optim.SGD(ps, lr=0.1))).plain
    special = {"sophia-g", "sophia-h", "sam", "saf", "mesa", "zo-sgd", "forward-gradient", "xgrad", "psps"}
    for name in optim.registry.names():
        if name not in special:
            assert protocol.needs(optim.create(name, [torch.zeros(3, 2, requires_grad=True)])).plain, name
    need = {n: protocol.needs(optim.create(n, [torch.zeros(3, 2, requires_grad=True)])) for n in special}
    assert need["sam"].closure and need["sam"].backward  # the loop's backward gives g, the closure g'
    assert need["saf"].training_loss is not None and need["mesa"].training_loss is not None
    assert need["zo-sgd"].closure and not need["zo-sgd"].backward
    assert need["psps"].closure and need["psps"].backward  # the loss value for the Polyak step
    assert need["xgrad"].before_forward is not None and need["xgrad"].backward  # weight prediction
    fg = need["forward-gradient"]
    assert fg.before_backward is not None and not fg.backward and not fg.closure


def test_sophia_g_hook_leaves_no_gradient_and_needs_a_sampled_loss():
    pb = Softmax()
    opt = SophiaG([pb.w, pb.b], k=2)
    protocol.needs(opt).before_backward(pb.ctx(0))  # a Hessian step: estimate, then grads cleared
    assert pb.w.grad is None and (opt.state[pb.w]["hessian"] > 0).any()
    protocol.step(opt, pb.ctx(0))  # (no gradient: nothing moves, the schedule advances)
    before = opt.state[pb.w]["hessian"].clone()
    opt.before_backward(pb.ctx(1))  # not a Hessian step: nothing happens
    assert torch.equal(opt.state[pb.w]["hessian"], before) and pb.w.grad is None
    opt.step()
    with pytest.raises(ConfigError, match="sampled"):
        opt.before_backward(protocol.StepContext(loss=pb.loss))


@pytest.mark.parametrize("wrap", [Lookahead, SWA, SWAD], ids=["lookahead", "swa", "swad"])
def test_wrappers_forward_every_need_of_their_base(wrap):
    """Lookahead, SWA and SWAD (ForwardingWrapper) ask the loop for exactly what their base asks for."""
    for name in ("sgd", "sophia-g", "sophia-h", "sam", "saf", "zo-sgd", "forward-gradient", "xgrad", "psps"):
        base = optim.create(name, [torch.zeros(3, 2, requires_grad=True)])
        assert protocol.needs(wrap(base)) == protocol.needs(base), name
