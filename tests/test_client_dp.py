"""Client-level DP for Local SGD and DiLoCo (DP-FedAvg), against a plain implementation of the round."""

import json
import math

import pytest
import torch
from torch import nn

from sgdlab import Config, run, strategies
from sgdlab.distributed.group import SimGroup
from sgdlab.distributed.network import NetworkModel
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics
from sgdlab.privacy import ClientDP, DPOptions, accounting
from sgdlab.strategies import Worker


def _cdp(**kw):
    base = dict(noise_multiplier=0.7, clip=0.5, participation=0.6, num_clients=5, sync_every=3, seed=11)
    return ClientDP(**{**base, **kw})


def _updates(n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 3)]
    return [[scale * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(n)]


def _reference_round(cdp, updates, r):
    """DP-FedAvg's aggregate written out: (Σ_{i∈S} Δ_i·min(1, C/‖Δ_i‖) + σC·ξ) / (pN)."""
    mask = cdp.participants(r)
    total = [torch.zeros_like(t) for t in updates[0]]
    for i, u in enumerate(updates):
        if not mask[i]:
            continue
        norm = math.sqrt(sum(float((t * t).sum()) for t in u))
        f = min(1.0, cdp.clip / norm)
        total = [a + f * t for a, t in zip(total, u, strict=True)]
    xi = cdp.noise(r, total)
    pn = cdp.participation * cdp.num_clients
    return [(a + cdp.noise_multiplier * cdp.clip * z) / pn for a, z in zip(total, xi, strict=True)]


@pytest.mark.parametrize("r", [1, 2, 7])
def test_aggregate_matches_the_reference_round(r):
    cdp = _cdp()
    ups = _updates(5, seed=r)
    expected = _reference_round(cdp, [[t.clone() for t in u] for u in ups], r)
    got = cdp.aggregate(SimGroup(5, NetworkModel()), ups, r)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # the exchange itself is fp32


def test_participation_is_poisson_with_rate_p_and_shared_by_ranks():
    cdp = _cdp(participation=0.3, num_clients=10)
    masks = torch.stack([cdp.participants(r) for r in range(1, 2001)]).double()
    assert masks.mean().item() == pytest.approx(0.3, abs=3 * math.sqrt(0.3 * 0.7 / 20000))
    # independent across workers: the number of participants has the binomial variance N p (1 - p)
    assert masks.sum(1).var().item() == pytest.approx(10 * 0.3 * 0.7, rel=0.15)
    assert torch.equal(cdp.participants(5), _cdp(participation=0.3, num_clients=10).participants(5))
    assert not torch.equal(cdp.participants(5), _cdp(participation=0.3, num_clients=10, seed=12).participants(5))
    assert _cdp(participation=1.0).participants(3).all()


def test_non_participants_do_not_influence_the_round():
    cdp = _cdp(participation=0.5, num_clients=6)
    r = next(r for r in range(1, 100) if 0 < int(cdp.participants(r).sum()) < 6)
    out = cdp.participants(r).logical_not().nonzero().flatten()[0].item()
    ups = _updates(6, seed=3)
    changed = [[t.clone() for t in u] for u in ups]
    changed[out] = [1e6 * torch.ones_like(t) for t in changed[out]]
    a = cdp.aggregate(SimGroup(6, NetworkModel()), ups, r)
    b = cdp.aggregate(SimGroup(6, NetworkModel()), changed, r)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_one_worker_moves_the_sum_by_at_most_clip():
    cdp = _cdp(noise_multiplier=0.0, clip=0.25, participation=1.0, num_clients=4)
    ups = _updates(4, seed=5)
    huge = [[t.clone() for t in u] for u in ups]
    huge[2] = [1e3 * t for t in huge[2]]
    a = cdp.aggregate(SimGroup(4, NetworkModel()), [[t.clone() for t in u] for u in ups], 1)
    b = cdp.aggregate(SimGroup(4, NetworkModel()), huge, 1)
    diff = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True)))
    assert diff * cdp.participation * cdp.num_clients <= 2 * 0.25 + 1e-6
    small = _updates(4, seed=6, scale=1e-3)  # norms far below C: averaged untouched
    got = cdp.aggregate(SimGroup(4, NetworkModel()), [[t.clone() for t in u] for u in small], 1)
    for k, t in enumerate(got):
        torch.testing.assert_close(t, sum(u[k] for u in small) / 4, atol=1e-9, rtol=1e-5)


def test_noise_has_standard_deviation_sigma_c_over_pn():
    cdp = _cdp(noise_multiplier=1.3, clip=2.0, participation=0.5, num_clients=8)
    zeros = [[torch.zeros(200_000)] for _ in range(8)]
    out = cdp.aggregate(SimGroup(8, NetworkModel()), zeros, 4)[0]
    assert out.mean().item() == pytest.approx(0.0, abs=0.01)
    assert out.std().item() == pytest.approx(1.3 * 2.0 / 4, rel=0.01)


def _workers(n, seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    out = []
    for rank in range(n):
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
        m.load_state_dict(base.state_dict())
        out.append(Worker(rank, m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)))
    return out


def _train(strategy, workers, steps):
    strategy.setup(workers)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        for w in workers:
            x = torch.randn(8, 5, generator=g) + w.rank
            w.model(x).pow(2).mean().backward()
        strategy.after_backward(workers, step)
        for w in workers:
            w.optimizer.step()
            w.optimizer.zero_grad()
        strategy.after_step(workers, step)
    return [g.clone() for g in strategy.global_params]


@pytest.mark.parametrize(("name", "args"), [("localsgd", {"sync_every": 3}),
                                            ("diloco", {"sync_every": 3, "outer_lr": 0.7})])
def test_no_noise_no_clipping_full_participation_is_the_plain_strategy(name, args):
    plain = _train(strategies.create(name, SimGroup(3, NetworkModel()), args), _workers(3), 12)
    s = strategies.create(name, SimGroup(3, NetworkModel()), args)
    s.enable_client_dp(ClientDP(noise_multiplier=0.0, clip=math.inf, participation=1.0, num_clients=3,
                                sync_every=3, seed=0))
    private = _train(s, _workers(3), 12)
    for a, b in zip(plain, private, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_localsgd_round_is_the_reference_update():
    s = strategies.create("localsgd", SimGroup(4, NetworkModel()), {"sync_every": 2})
    cdp = _cdp(num_clients=4, sync_every=2, participation=0.5, clip=0.05)
    s.enable_client_dp(cdp)
    workers = _workers(4)
    s.setup(workers)
    start = [g.clone() for g in s.global_params]
    for _ in (1, 2):
        for w in workers:
            w.model(torch.full((3, 5), 1.0 + w.rank)).sum().backward()
            w.optimizer.step()
            w.optimizer.zero_grad()
    ups = [[(g - p.detach()).double() for g, p in zip(start, w.params, strict=True)] for w in workers]
    delta = _reference_round(cdp, ups, 1)
    s.after_step(workers, 2)
    for g0, d, g in zip(start, delta, s.global_params, strict=True):
        torch.testing.assert_close(g, (g0.double() - d).float(), atol=1e-6, rtol=0)
    for w in workers:  # everyone restarts from the new global parameters
        for p, g in zip(w.params, s.global_params, strict=True):
            assert torch.equal(p.data, g)


# ---- options and configs ----------------------------------------------------------------------------

def test_client_options_parse_and_are_canonical():
    o = DPOptions.parse("noise=1,clip=0.1,unit=client,participation=0.25")
    assert (o.unit, o.participation, o.noise) == ("client", 0.25, 1.0)
    cfg = Config(task="digits", strategy="localsgd", workers=4, steps=50, device="cpu",
                 dp="noise=1,clip=0.1,unit=client").resolve()
    assert cfg.dp == "noise=1.0,clip=0.1,delta=1e-05,accountant=rdp,unit=client,participation=1.0"


@pytest.mark.parametrize(("kw", "match"), [
    (dict(dp="noise=1,clip=1,participation=0.5"), "participation applies to unit=client"),
    (dict(dp="noise=1,clip=1,unit=client,clipping=per_layer"), "clipping applies to unit=example"),
    (dict(dp="noise=1,clip=1,unit=client,participation=0"), "dp participation"),
    (dict(dp="noise=1,clip=1,unit=client,participation=1.5"), "dp participation"),
    (dict(dp="noise=1,clip=1,unit=worker"), "unknown dp unit 'worker'"),
    (dict(dp="noise=1,clip=1,unit=client", strategy="ddp"), "localsgd and diloco, not 'ddp'"),
    (dict(dp="noise=1,clip=1,unit=client", strategy="streaming-diloco"), "not 'streaming-diloco'"),
    (dict(dp="noise=1,clip=1,unit=client", strategy="single", workers=1), "not 'single'"),
    (dict(dp="noise=1,clip=1,unit=client", strategy_args={"precision": "int8"}), "needs precision=fp32"),
    (dict(dp="noise=1,clip=1,unit=client", steps=10, strategy_args={"sync_every": 20}), "no round ends"),
])
def test_bad_client_dp_settings_are_refused(kw, match):
    base = dict(task="digits", strategy="localsgd", workers=4, steps=100)
    with pytest.raises(ConfigError, match=match):
        Config(**{**base, **kw}).validate()


# ---- runs -------------------------------------------------------------------------------------------

def _cfg(tmp_path, name, **kw):
    base = dict(task="digits", strategy="diloco", workers=4, optimizer="adamw", lr=1e-3, steps=12, batch_size=16,
                eval_every=4, log_every=2, device="cpu", task_args={"hidden": 16},
                strategy_args={"sync_every": 2}, dp="noise=0.8,clip=0.05,unit=client,participation=0.5",
                out=str(tmp_path / name))
    return Config(**{**base, **kw})


def test_run_logs_epsilon_over_rounds_and_resumes_bit_identically(tmp_path):
    full = run(_cfg(tmp_path, "full"))
    s = full.summary
    assert s["dp_unit"] == "client" and s["dp_rounds"] == 6 and s["sample_rate"] == 0.5
    assert s["epsilon"] == pytest.approx(accounting.epsilon(0.8, 0.5, 6, 1e-5))
    evals = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "epsilon" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12] and evals[0]["epsilon"] == 0
    assert evals[1]["epsilon"] == pytest.approx(accounting.epsilon(0.8, 0.5, 2, 1e-5))
    cfg = _cfg(tmp_path, "stopped")
    run(cfg, stop_at=5)  # mid-round
    resumed = run(cfg, resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    for u, v in zip(a["strategy"]["global_params"], b["strategy"]["global_params"], strict=True):
        assert torch.equal(u, v)
    assert resumed.summary["final_val_loss"] == full.summary["final_val_loss"]


def test_noise_changes_the_run_and_target_epsilon_is_met(tmp_path):
    noisy = run(_cfg(tmp_path, "noisy", strategy="localsgd", optimizer="sgd", lr=0.1))
    quiet = run(_cfg(tmp_path, "quiet", strategy="localsgd", optimizer="sgd", lr=0.1,
                     dp="noise=1e-6,clip=100,unit=client"))
    plain = run(_cfg(tmp_path, "plain", strategy="localsgd", optimizer="sgd", lr=0.1, dp=None))
    assert quiet.summary["final_val_loss"] == pytest.approx(plain.summary["final_val_loss"], abs=1e-4)
    assert abs(noisy.summary["final_val_loss"] - plain.summary["final_val_loss"]) > 1e-3
    target = run(_cfg(tmp_path, "target", dp="target_epsilon=5,clip=0.05,delta=1e-5,unit=client,participation=0.5"))
    assert 4.9 < target.summary["epsilon"] <= 5.0
    cfg = json.loads((tmp_path / "target" / "config.json").read_text())
    assert "unit=client" in cfg["dp"]
