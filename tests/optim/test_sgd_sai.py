import math

import pytest
import torch

from sgdlab.optim.sgd_sai import SGDSaI

SHAPES = [(7,), (5, 3), (4, 2, 3, 3)]
STEPS = 25


def make_params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    frozen = torch.randn(6, generator=gen, dtype=dtype)  # grad stays None
    return ps, frozen


def grads_for(step, shapes, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen, dtype=dtype) * (1.0 + i) for i, s in enumerate(shapes)]


class ReferenceSGDSaI:
    """Algorithm 1 of Xu et al. (2024), written out per block with no cleverness."""

    def __init__(self, blocks, hps, maximize=False):
        self.blocks = blocks  # list of (tensor, hyperparameter dict)
        self.maximize = maximize
        self.t = 0
        self.m = {}
        self.gsnr = {}

    def step(self, grads):
        self.t += 1
        if self.t == 1:
            raw = {}
            for i, (_, hp) in enumerate(self.blocks):
                g = grads[i]
                n = g.numel()
                mean = sum(g.flatten().tolist()) / n
                var = sum((x - mean) ** 2 for x in g.flatten().tolist()) / (n - 1) if n > 1 else 0.0
                norm = math.sqrt(sum(x * x for x in g.flatten().tolist()))
                raw[i] = norm / (math.sqrt(var) + hp["eps"])  # line 12
            top = max(raw.values())
            self.gsnr = {i: raw[i] / top for i in raw}  # line 14
        for i, (theta, hp) in enumerate(self.blocks):
            g = -grads[i] if self.maximize else grads[i]
            if self.t > 1:
                self.m[i] = hp["momentum"] * self.m[i] + (1 - hp["momentum"]) * g  # line 8
            else:
                self.m[i] = g.clone()  # line 10
            new = theta - hp["weight_decay"] * hp["lr"] * theta  # line 17
            new = new - hp["lr"] * self.gsnr[i] * self.m[i]  # line 19
            theta.copy_(new)


@pytest.mark.parametrize("path", ["foreach", "eager", "compiled", "group"])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(path, maximize):
    foreach, compiled = {"foreach": (True, False), "eager": (False, False), "compiled": (None, True),
                         "group": (None, "group")}[path]
    ps, frozen = make_params()
    frozen0 = frozen.clone()
    ref_ps = [p.clone() for p in ps]
    hp1 = dict(lr=0.05, momentum=0.9, weight_decay=0.01, eps=1e-8)
    hp2 = dict(lr=0.02, momentum=0.5, weight_decay=0.1, eps=1e-3)
    opt = SGDSaI([{"params": [ps[0], frozen], **hp1}, {"params": ps[1:], **hp2}], foreach=foreach,
                 compiled=compiled, maximize=maximize)
    ref = ReferenceSGDSaI([(ref_ps[0], hp1), (ref_ps[1], hp2), (ref_ps[2], hp2)], None, maximize=maximize)
    for t in range(STEPS):
        gs = grads_for(t, SHAPES)
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(gs)
        for i, (p, r) in enumerate(zip(ps, ref_ps, strict=True)):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.m[i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["gsnr"].item(), ref.gsnr[i], rtol=1e-12, atol=1e-12)
        assert torch.equal(frozen, frozen0)
        assert frozen not in opt.state
    # the largest g-SNR block gets scale exactly 1
    assert max(opt.state[p]["gsnr"].item() for p in ps) == 1.0


def test_scale_fixed_after_first_step_and_single_entry_block():
    big = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
    scalar = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SGDSaI([big, scalar], lr=0.1, eps=1e-8)
    big.grad = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    scalar.grad = torch.tensor([1e-9], dtype=torch.float64)
    opt.step()
    # one entry: variance taken as 0, so g-SNR = |g| / eps = 0.1 (authors' code); the 4x4 block's is larger
    raw_big = big.grad.norm() / (big.grad.std() + 1e-8)
    assert opt.state[big]["gsnr"].item() == 1.0
    torch.testing.assert_close(opt.state[scalar]["gsnr"].item(), (1e-9 / 1e-8) / raw_big.item(), rtol=1e-12, atol=0)
    before = opt.state[big]["gsnr"].clone()
    big.grad = torch.ones(4, 4, dtype=torch.float64)  # std 0 now: must not matter any more
    opt.step()
    assert torch.equal(opt.state[big]["gsnr"], before)


def test_zero_first_gradients_give_zero_scale_not_nan():
    p = torch.ones(3, 3, requires_grad=True)
    opt = SGDSaI([p], lr=0.1)
    p.grad = torch.zeros(3, 3)
    opt.step()
    assert opt.state[p]["gsnr"].item() == 0.0
    assert torch.isfinite(p).all()


def test_matches_pytorch_optimizer_where_they_coincide():
    """pytorch_optimizer's SGDSaI omits the max-normalisation (line 14) and starts the momentum buffer at
    zero (line 10); with momentum=0, >=2-D blocks and lr/weight_decay rescaled by the max g-SNR the two
    follow the same trajectory."""
    po = pytest.importorskip("pytorch_optimizer")
    shapes = [(5, 3), (4, 2, 3, 3), (3, 6)]
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    qs = [p.clone() for p in ps]
    g0 = grads_for(0, shapes)
    top = max((g.norm() / (g.std() + 1e-8)).item() for g in g0)
    lr, wd = 0.05, 0.02
    ours = SGDSaI(ps, lr=lr, momentum=0.0, weight_decay=wd, eps=1e-8)
    theirs = po.SGDSaI(qs, lr=lr / top, momentum=0.0, weight_decay=wd * top, eps=1e-8)
    for t in range(20):
        gs = grads_for(t, shapes)
        for p, q, g in zip(ps, qs, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(ps, qs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_documented_difference_from_pytorch_optimizer():
    """With momentum > 0 the first-step buffer differs: ours m_1 = g_1 (Alg. 1 line 10), theirs (1-mu) g_1."""
    po = pytest.importorskip("pytorch_optimizer")
    p = torch.randn(4, 4, dtype=torch.float64)
    q = p.clone()
    g = torch.randn(4, 4, dtype=torch.float64)
    ours = SGDSaI([p], lr=0.1, momentum=0.9, weight_decay=0.0)
    theirs = po.SGDSaI([q], lr=0.1, momentum=0.9, weight_decay=0.0)
    p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()
    torch.testing.assert_close(theirs.state[q]["momentum_buffer"], 0.1 * ours.state[p]["momentum_buffer"])
