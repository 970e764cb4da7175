"""SWA (Izmailov et al., 2018): the average is torch.optim.swa_utils.AveragedModel's, bit for bit, over the same
trajectory; it is the arithmetic mean of the snapshots (float64); identical weights average to themselves; the
SWA learning rate; the evaluation swap with BatchNorm statistics recomputed by update_bn."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim import protocol

DT = torch.float64


def data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 4, generator=gen, dtype=DT), torch.randint(0, 3, (32,), generator=gen)


def net(bn=False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 6)] + ([torch.nn.BatchNorm1d(6)] if bn else []) + [torch.nn.Tanh(),
                                                                                   torch.nn.Linear(6, 3)]
    return torch.nn.Sequential(*layers).double()


def batches(x, y, k):
    return [(x[i::k], y[i::k]) for i in range(k)]


@pytest.mark.parametrize("start, freq", [(0, 1), (3, 2), (5, 4)])
def test_same_average_as_torch_averaged_model_bit_for_bit(start, freq):
    x, y = data()
    model, ref = net(), net()
    opt = optim.create("swa", model.parameters(), lr=0.1, momentum=0.9, swa_start=start, swa_freq=freq)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    avg = AveragedModel(ref)
    snapshots = []
    for t in range(1, 17):
        xb, yb = batches(x, y, 4)[t % 4]
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            o.step()
        if t > start and (t - start) % freq == 0:
            avg.update_parameters(ref)
            snapshots.append([p.detach().clone() for p in ref.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    mine = opt.averaged_parameters()
    assert int(opt.n_averaged) == int(avg.n_averaged) == len(snapshots)
    for p, q in zip(model.parameters(), avg.module.parameters(), strict=True):
        assert torch.equal(mine[p], q)
    for i, p in enumerate(model.parameters()):  # the arithmetic mean of the snapshots
        torch.testing.assert_close(mine[p], torch.stack([s[i] for s in snapshots]).mean(0), rtol=1e-12, atol=1e-14)


def test_nothing_is_averaged_before_the_start_and_identical_weights_average_to_themselves():
    model = net()
    opt = optim.create("swa", model.parameters(), lr=0.0, swa_start=2)
    x, y = data()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert opt.averaged_parameters() is None
    for _ in range(3):
        opt.step()
    avg = opt.averaged_parameters()
    assert all(torch.equal(avg[p], p) for p in model.parameters())


def test_swa_lr_anneals_from_the_scheduled_lr_and_leaves_the_schedule_alone():
    w = torch.zeros(1, dtype=DT, requires_grad=True)
    opt = optim.create("swa", [w], lr=1.0, swa_start=2, swa_lr=0.1, anneal_steps=4, anneal_strategy="linear")
    used = []
    for _ in range(8):
        w.grad = torch.ones(1, dtype=DT)
        before = w.detach().clone()
        opt.step()
        used.append(float(before - w.detach()))
        assert opt.param_groups[0]["lr"] == 1.0
    expected = [1.0, 1.0] + [a * 0.1 + (1 - a) * 1.0 for a in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]
    assert used == pytest.approx(expected, rel=1e-12)


def test_the_evaluation_swap_recomputes_batchnorm_statistics_and_restores_everything():
    x, y = data()
    model = net(bn=True)
    opt = optim.create("swa", model.parameters(), lr=0.1, swa_start=1)
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    stats = [b.detach().clone() for b in model.buffers()]
    target = copy.deepcopy(model)  # the strategy's evaluation copy
    loader = batches(x, y, 4)
    with protocol.averaged_weights(opt, model, target, lambda: iter(loader)) as swapped:
        assert swapped
        avg = opt.averaged_parameters()
        assert all(torch.equal(q, avg[p]) for p, q in zip(model.parameters(), target.parameters(), strict=True))
        bn = target[1]
        with torch.no_grad():  # update_bn: the mean over equal-size batches of the per-batch means
            h = [target[0](xb) for xb, _ in loader]
        torch.testing.assert_close(bn.running_mean, torch.stack([hb.mean(0) for hb in h]).mean(0), rtol=1e-12,
                                   atol=1e-14)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), stats, strict=True))
    for q, w in zip(target.parameters(), weights, strict=True):
        assert torch.equal(q, w)
    with protocol.averaged_weights(torch.optim.SGD(model.parameters(), lr=0.1), model) as swapped:
        assert not swapped


@pytest.mark.parametrize("kw, pattern", [({"swa_start": -1}, "swa_start=-1"), ({"swa_freq": 0}, "swa_freq=0"),
                                         ({"swa_lr": -0.1}, r"swa_lr=-0\.1"), ({"anneal_steps": -2}, "anneal_steps"),
                                         ({"anneal_strategy": "step"}, "anneal_strategy='step'"),
                                         ({"swa_freq": 1.5}, "swa_freq")])
def test_bad_hyperparameters_are_config_errors_naming_them(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create("swa", [torch.zeros(2, requires_grad=True)], **kw)


def test_the_runner_evaluates_the_average_and_reports_the_iterate_too(tmp_path, monkeypatch):
    """On a BatchNorm model: the records carry the average's metrics (BN statistics recomputed for it) and the
    iterate's val_loss, which is exactly plain SGD's (SWA leaves the trajectory alone)."""
    from sgdlab import Config, run
    from sgdlab.metrics import read_metrics
    from tests.bn_task import bn_task

    kw = dict(task="digits", lr=0.05, steps=6, batch_size=16, eval_every=3, device="cpu")
    calls = []
    update_bn = torch.optim.swa_utils.update_bn
    monkeypatch.setattr(torch.optim.swa_utils, "update_bn", lambda *a, **k: calls.append(1) or update_bn(*a, **k))
    run(Config(optimizer="swa", optimizer_args={"swa_start": 2, "momentum": 0.9}, out=str(tmp_path / "swa"), **kw),
        task=bn_task())
    run(Config(optimizer="sgd", optimizer_args={"momentum": 0.9}, out=str(tmp_path / "sgd"), **kw), task=bn_task())
    swa_recs = {r["step"]: r for r in read_metrics(tmp_path / "swa" / "metrics.jsonl") if "val_loss" in r}
    sgd_recs = {r["step"]: r for r in read_metrics(tmp_path / "sgd" / "metrics.jsonl") if "val_loss" in r}
    assert "iterate_val_loss" not in swa_recs[0]  # nothing averaged yet
    for step in (3, 6):
        assert swa_recs[step]["iterate_val_loss"] == sgd_recs[step]["val_loss"]
        assert swa_recs[step]["val_loss"] != sgd_recs[step]["val_loss"]
    assert len(calls) == 2  # BN statistics recomputed for the average at both evaluations
