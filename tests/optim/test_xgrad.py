"""XGrad against a plain float64 transcription of weight prediction around SGD-momentum, Adam and AdamW, its exact
equivalences (horizon 0 is the base; SGD with horizon = momentum is Sutskever's Nesterov), and the step protocol."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim import protocol
from sgdlab.optim.lookahead import Lookahead
from sgdlab.optim.xgrad import XGrad

DT = torch.float64


class Problem:
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.w = (0.5 * torch.randn(5, 3, generator=gen, dtype=DT)).requires_grad_()
        self.b = torch.zeros(3, dtype=DT, requires_grad=True)
        self.x = torch.randn(40, 5, generator=gen, dtype=DT)
        self.y = torch.randint(0, 3, (40,), generator=gen)

    @property
    def params(self):
        return [self.w, self.b]

    def loss_at(self, w, b):
        return F.cross_entropy(self.x @ w + b, self.y)

    def loss(self):
        return self.loss_at(self.w, self.b)

    def grads_at(self, ws):
        ws = [w.detach().clone().requires_grad_() for w in ws]
        self.loss_at(*ws).backward()
        return [w.grad for w in ws]


def reference(pb, base, steps, s, lr, **hp):
    """The paper's rule, written out: predict from the current state, gradient there, base step from w_t."""
    ws = [p.detach().clone() for p in pb.params]
    st = [dict(m=torch.zeros_like(w), v=torch.zeros_like(w), buf=None) for w in ws]
    for t in range(steps):
        pred = []
        for w, S in zip(ws, st, strict=True):
            if base == "sgd":
                pred.append(w if S["buf"] is None else w - s * lr * S["buf"])
            elif t == 0:
                pred.append(w)
            else:
                b1, b2 = hp["betas"]
                mhat, vhat = S["m"] / (1 - b1 ** t), S["v"] / (1 - b2 ** t)
                pred.append(w - s * lr * mhat / (vhat.sqrt() + hp["eps"]))
        gs = pb.grads_at(pred)
        new = []
        for w, g, S in zip(ws, gs, st, strict=True):
            if base == "sgd":
                mu = hp["momentum"]
                S["buf"] = g.clone() if S["buf"] is None else mu * S["buf"] + g
                new.append(w - lr * S["buf"])
            else:
                b1, b2 = hp["betas"]
                if base == "adamw":
                    w = w * (1 - lr * hp["weight_decay"])
                S["m"] = b1 * S["m"] + (1 - b1) * g
                S["v"] = b2 * S["v"] + (1 - b2) * g * g
                mhat, vhat = S["m"] / (1 - b1 ** (t + 1)), S["v"] / (1 - b2 ** (t + 1))
                new.append(w - lr * mhat / (vhat.sqrt() + hp["eps"]))
        ws = new
    return ws


def run(opt, pb, steps, how="protocol"):
    for _ in range(steps):
        if how == "protocol":  # the runner's way: before_forward, forward/backward, step
            ctx = protocol.StepContext(loss=pb.loss)
            opt.zero_grad()
            protocol.forward_backward(opt, ctx)
            protocol.step(opt, ctx)
        else:  # torch.optim's closure convention

            def closure():
                opt.zero_grad()
                loss = pb.loss()
                loss.backward()
                return loss

            opt.step(closure)


CASES = [("sgd", dict(lr=0.1, momentum=0.9)), ("adam", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8)),
         ("adamw", dict(lr=0.01, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.1))]


@pytest.mark.parametrize("how", ["protocol", "closure"])
@pytest.mark.parametrize("s", [1.0, 2.0])
@pytest.mark.parametrize("base, hp", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(base, hp, s, how):
    pb = Problem()
    opt = optim.create("xgrad", pb.params, base=base, horizon=s, **hp)
    expected = reference(Problem(), base, 8, s, **hp)
    run(opt, pb, 8, how)
    for p, q in zip(pb.params, expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base, hp", CASES, ids=[c[0] for c in CASES])
def test_horizon_zero_is_the_base_optimizer_exactly(base, hp):
    a, b = Problem(), Problem()
    opt = optim.create("xgrad", a.params, base=base, horizon=0, **hp)
    plain = optim.create(base, b.params, **hp)
    run(opt, a, 6)
    run(plain, b, 6)
    for p, q in zip(a.params, b.params, strict=True):
        assert torch.equal(p, q)


def test_sgd_with_horizon_momentum_is_sutskever_nesterov():
    pb = Problem()
    lr, mu = 0.1, 0.9
    opt = XGrad(torch.optim.SGD(pb.params, lr=lr, momentum=mu), horizon=mu)
    ws = [p.detach().clone() for p in pb.params]
    vs = [torch.zeros_like(w) for w in ws]
    for _ in range(8):  # v <- mu v + g(w - lr mu v); w <- w - lr v
        gs = pb.grads_at([w - lr * mu * v for w, v in zip(ws, vs, strict=True)])
        vs = [mu * v + g for v, g in zip(vs, gs, strict=True)]
        ws = [w - lr * v for w, v in zip(ws, vs, strict=True)]
    run(opt, pb, 8)
    for p, q in zip(pb.params, ws, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)


def test_the_model_holds_the_prediction_between_before_forward_and_step():
    pb = Problem()
    opt = optim.create("xgrad", pb.params, base="sgd", lr=0.1, momentum=0.9)
    run(opt, pb, 2)
    w_t = pb.w.detach().clone()
    buf = opt.base_optimizer.state[pb.w]["momentum_buffer"].clone()
    opt.zero_grad()
    opt.before_forward(None)
    opt.before_forward(None)  # idempotent
    torch.testing.assert_close(pb.w.detach(), w_t - 0.1 * buf, rtol=0, atol=1e-15)
    with pytest.raises(ConfigError, match="state_dict"):
        opt.state_dict()
    pb.loss().backward()
    opt.step()
    torch.testing.assert_close(pb.w.detach(), w_t - 0.1 * (0.9 * buf + pb.w.grad), rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_keeps_the_horizon():
    a, b = Problem(), Problem()
    opt = optim.create("xgrad", a.params, base="adam", horizon=3.0, lr=0.01)
    run(opt, a, 4)
    sd = opt.state_dict()
    assert sd["xgrad"]["horizon"] == 3.0
    for p, q in zip(a.params, b.params, strict=True):
        q.data.copy_(p.data)
    opt2 = optim.create("xgrad", b.params, base="adam", horizon=1.0, lr=0.01)
    opt2.load_state_dict(copy.deepcopy(sd))  # torch's state_dict holds the live state tensors
    assert opt2.horizon == 3.0
    run(opt, a, 4)
    run(opt2, b, 4)
    for p, q in zip(a.params, b.params, strict=True):
        assert torch.equal(p, q)


def test_protocol_needs_and_lookahead_forwarding():
    pb = Problem()
    opt = optim.create("xgrad", pb.params, base="sgd", lr=0.1, momentum=0.9)
    need = protocol.needs(opt)
    assert need.before_forward is not None and not need.plain and "other weights" in need.describe()
    assert protocol.needs(Lookahead(opt)).before_forward is not None
    assert protocol.needs(torch.optim.SGD(pb.params, lr=0.1)).plain


@pytest.mark.parametrize("call, pattern", [
    (lambda ps: optim.create("xgrad", ps, horizon=-1.0), r"horizon=-1\.0"),
    (lambda ps: optim.create("xgrad", ps, horizon="far"), r"horizon"),
    (lambda ps: optim.create("xgrad", ps, base="kron"), r"base='kron'.*'sgd', 'adam', 'adamw'"),
    (lambda ps: XGrad(optim.create("kron", ps)), r"SGD, Adam or AdamW.*Kron"),
    (lambda ps: XGrad(torch.optim.SGD(ps, lr=0.1), horizon=float("nan")), r"horizon"),
    (lambda ps: optim.create("xgrad", ps, base="sgd", momentum=-1.0), r"momentum"),
])
def test_bad_hyperparameters_are_config_errors_naming_them(call, pattern):
    with pytest.raises(ConfigError, match=pattern):
        call([torch.zeros(3, requires_grad=True)])
