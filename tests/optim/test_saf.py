"""SAF and MESA (Du et al., 2022): the trajectory loss's gradient against its closed form, lam = 0 as the base,
float64 reference loops of the authors' training steps (an EMA teacher; a per-example logit bank written at
visit e and read at e - E~), and the errors for what the loop must provide."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim import protocol
from sgdlab.optim.saf import trajectory_kl

DT = torch.float64


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(8, 4, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)
    return model, x, y


def batch_ids(t):
    """Two batches of four per epoch, the order alternating (every example once per epoch)."""
    return torch.tensor([0, 1, 2, 3] if t % 4 in (0, 3) else [4, 5, 6, 7]) if t % 2 == 0 else \
        torch.tensor([4, 5, 6, 7] if t % 4 == 1 else [0, 1, 2, 3])


def run(opt, model, x, y, steps):
    for t in range(steps):
        ids = batch_ids(t)
        ctx = protocol.StepContext(loss=lambda ids=ids: F.cross_entropy(model(x[ids]), y[ids]), model=model,
                                   example_ids=ids)
        opt.zero_grad()
        protocol.forward_backward(opt, ctx)
        protocol.step(opt, ctx)


def test_trajectory_loss_gradient_is_tau_over_rows_times_the_softmax_difference():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 2, 4, generator=gen, dtype=DT, requires_grad=True)
    past, tau = torch.randn(5, 2, 4, generator=gen, dtype=DT), 3.0
    (g,) = torch.autograd.grad(trajectory_kl(z, past, tau), z)
    expected = tau / 10 * (torch.softmax(z / tau, -1) - torch.softmax(past / tau, -1))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)
    same = trajectory_kl(z, z.detach(), tau)
    (g0,) = torch.autograd.grad(same, z)
    assert abs(same.item()) < 1e-15 and g0.abs().max() < 1e-15
    ref = tau ** 2 * F.kl_div(F.log_softmax(z.reshape(10, 4) / tau, -1), F.softmax(past.reshape(10, 4) / tau, -1),
                              reduction="batchmean")
    torch.testing.assert_close(trajectory_kl(z, past, tau), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name, hp", [("mesa", {"lam": 0.0}), ("saf", {"lam": 0.0, "start_epoch": 0})])
def test_lam_zero_is_the_base_optimizer_exactly(name, hp):
    a, x, y = setup()
    b = copy.deepcopy(a)
    run(optim.create(name, a.parameters(), lr=0.1, momentum=0.9, **hp), a, x, y, 8)
    base = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for t in range(8):
        ids = batch_ids(t)
        base.zero_grad()
        F.cross_entropy(b(x[ids]), y[ids]).backward()
        base.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_mesa_matches_the_reference_training_step():
    """MESA_train.py: teacher = the EMA model in eval mode on the same batch, CE + lam * tau^2 * KL (batchmean),
    backward, SGD step, then ema <- decay * ema + (1 - decay) * w; the KL from step start_step + 1 on."""
    model, x, y = setup()
    ref = copy.deepcopy(model)
    lam, tau, decay, start = 0.8, 2.0, 0.9, 2
    opt = optim.create("mesa", model.parameters(), lr=0.2, momentum=0.5, lam=lam, tau=tau, decay=decay,
                       start_step=start)
    run(opt, model, x, y, 10)
    ema = copy.deepcopy(ref).eval()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.5)
    for t in range(10):
        ids = batch_ids(t)
        with torch.no_grad():
            teacher = ema(x[ids])
        out = ref(x[ids])
        loss = F.cross_entropy(out, y[ids])
        if t + 1 > start:
            loss = loss + lam * tau ** 2 * F.kl_div(F.log_softmax(out / tau, -1), F.softmax(teacher / tau, -1),
                                                    reduction="batchmean")
        sgd.zero_grad()
        loss.backward()
        sgd.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), ref.parameters(), strict=True):
                e.copy_(decay * e + (1 - decay) * p)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for p, e in zip(model.parameters(), ema.parameters(), strict=True):
        torch.testing.assert_close(opt.state[p]["ema"], e, rtol=1e-10, atol=1e-12)


def test_saf_matches_the_reference_training_step_with_its_logit_bank():
    """SAF_train.py with epochs: store logits[idx, e % (E~+1)], then if start < e add the KL to
    logits[idx, (e - E~) % (E~+1)]; here every example is visited once per epoch of two steps."""
    model, x, y = setup(3)
    ref = copy.deepcopy(model)
    lam, tau, minus, start = 0.5, 2.0, 2, 2
    opt = optim.create("saf", model.parameters(), lr=0.2, lam=lam, tau=tau, minus_epochs=minus, start_epoch=start)
    run(opt, model, x, y, 14)
    bank = torch.zeros(8, minus + 1, 3, dtype=DT)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.2)
    used = 0
    for t in range(14):
        ids, epoch = batch_ids(t), t // 2
        out = ref(x[ids])
        bank[ids, epoch % (minus + 1)] = out.detach()
        loss = F.cross_entropy(out, y[ids])
        if epoch > start:
            past = bank[ids, (epoch - minus) % (minus + 1)]
            loss = loss + lam * tau ** 2 * F.kl_div(F.log_softmax(out / tau, -1), F.softmax(past / tau, -1),
                                                    reduction="batchmean")
            used += 1
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    assert used == 8
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)  # the bank is float32, as on the host there
    assert opt.visits[:8].tolist() == [7] * 8


def test_what_the_loop_must_provide_is_a_config_error():
    model, x, y = setup()
    opt = optim.create("mesa", model.parameters())
    with pytest.raises(ConfigError, match="needs the model"):
        protocol.forward_backward(opt, protocol.StepContext(loss=lambda: F.cross_entropy(model(x), y)))
    saf = optim.create("saf", model.parameters())
    with pytest.raises(ConfigError, match="example_ids"):
        protocol.forward_backward(saf, protocol.StepContext(loss=lambda: F.cross_entropy(model(x), y), model=model))
    reg = torch.nn.Linear(4, 1).double()
    opt = optim.create("mesa", reg.parameters())
    with pytest.raises(ConfigError, match="class logits"):
        protocol.forward_backward(opt, protocol.StepContext(loss=lambda: reg(x).squeeze(1).square().mean(),
                                                            model=reg))
    opt = optim.create("mesa", model.parameters())
    with pytest.raises(ConfigError, match="once"):
        protocol.forward_backward(opt, protocol.StepContext(loss=lambda: F.cross_entropy(model(x) + model(x), y),
                                                            model=model))
    with pytest.raises(ConfigError, match="plain backward"):
        optim.create("mesa", model.parameters(), base="sam")


@pytest.mark.parametrize("name, kw, pattern", [
    ("mesa", {"lam": -1.0}, r"lam=-1\.0"), ("mesa", {"tau": 0.0}, r"tau=0\.0"), ("mesa", {"decay": 1.0}, "decay"),
    ("mesa", {"start_step": -1}, "start_step"), ("mesa", {"end_step": 1.5}, "end_step"),
    ("saf", {"minus_epochs": 0}, "minus_epochs=0"), ("saf", {"start_epoch": -1}, "start_epoch"),
    ("saf", {"end_epoch": -2}, "end_epoch"), ("saf", {"lam": "x"}, "lam")])
def test_bad_hyperparameters_are_config_errors_naming_them(name, kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create(name, [torch.zeros(2, requires_grad=True)], **kw)
