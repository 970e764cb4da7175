"""EDiT / A-EDiT (Cheng et al., 2025, arXiv:2412.07210): the reductions (every penalty off = localsgd and
diloco bit for bit), a float64 reference of one sync of the whole penalty pipeline, the parts one by one
(uniform weights, an outlier's weight, clipping, the detector's warm-up), A-EDiT's time-based rounds (equal
speeds = EDiT, a 2× slower worker takes half the steps, min_steps, step weights), resume, bad options."""

import math
from pathlib import Path

import pytest
import torch

from sgdlab import Config, run, strategies
from sgdlab.distributed.group import SimGroup
from sgdlab.distributed.network import NetworkModel
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics
from sgdlab.strategies import Worker
from sgdlab.strategies.edit import EWMADetector, clip_factor, softmax_weights

DT = torch.float64
# the exchange sends fp32, so float64 models agree with the float64 reference to float32 rounding
TOL = dict(rtol=1e-6, atol=1e-9)
FREE = NetworkModel(bandwidth=1e30, latency=0.0)  # communication takes no simulated time
OFF = {"anomaly": False, "weighting": False, "clip": math.inf}


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 1).to(DT)


def _workers(world):
    out = []
    for r in range(world):
        m = _model()
        out.append(Worker(r, m, torch.optim.SGD(m.parameters(), lr=0.05)))
    return out


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 5, generator=g, dtype=DT) + rank
    return x, x.sum(1, keepdim=True) + 0.5 * rank


def _deltas(world, big=None):
    """Hand-made pseudo-gradients (weight, bias) per worker; worker ``big``'s are 100× larger."""
    g = torch.Generator().manual_seed(7)
    out = []
    for r in range(world):
        d = [0.05 * torch.randn(1, 5, generator=g, dtype=DT), 0.01 * torch.randn(1, generator=g, dtype=DT)]
        out.append([100 * t for t in d] if r == big else d)
    return out


def _sync_once(opts, deltas, detectors=None, name="edit"):
    """One sync (sync_every 1) of ``name`` on workers at θ0 − Δ_i; returns θ0, the workers' Δ_i = θ0 − θ_i as
    the strategy sees them, the new θ and the strategy."""
    world = len(deltas)
    group = SimGroup(world, NetworkModel())
    strategy = strategies.create(name, group, {"sync_every": 1, **opts})
    workers = _workers(world)
    strategy.setup(workers)
    theta0 = [g.clone() for g in strategy.global_params]
    with torch.no_grad():
        for w, d in zip(workers, deltas, strict=True):
            for p, t0, x in zip(w.params, theta0, d, strict=True):
                p.copy_(t0 - x)
    seen = [[t0 - p.detach() for t0, p in zip(theta0, w.params, strict=True)] for w in workers]
    for (rank, unit), state in (detectors or {}).items():
        strategy.detectors[rank][unit].load_state_dict(state)
    strategy.after_step(workers, 1)
    return theta0, seen, [g.clone() for g in strategy.global_params], strategy


def _reference(theta0, deltas, *, flagged=(), temperature=1.0, phi=math.inf, norm_scope="tensor",
               clip_scope="tensor", lr=0.7, momentum=0.8, weighting=True):
    """The penalty pipeline of one sync in plain float64, then the first step of Nesterov SGD."""
    world, n = len(deltas), len(theta0)
    units = [[j] for j in range(n)] if norm_scope == "tensor" else [list(range(n))]
    agg = [torch.zeros_like(t) for t in theta0]
    for u, idx in enumerate(units):
        g = torch.tensor([math.sqrt(sum(float(deltas[r][j].norm()) ** 2 for j in idx)) for r in range(world)],
                         dtype=DT)
        bad = torch.tensor([(r, u) in flagged for r in range(world)])
        w = torch.softmax(-(g + 1e6 * bad) / temperature, 0) if weighting else torch.full((world,), 1 / world, dtype=DT)
        for j in idx:
            agg[j] = sum(w[r] * (0 * deltas[r][j] if bad[r] else deltas[r][j]) for r in range(world))
    cunits = [[j] for j in range(n)] if clip_scope == "tensor" else [list(range(n))]
    for idx in cunits:
        norm = math.sqrt(sum(float(agg[j].norm()) ** 2 for j in idx))
        if norm > phi:
            for j in idx:
                agg[j] = agg[j] * (phi / norm)
    # torch.optim.SGD's first step: buf = g; Nesterov: θ ← θ − lr (g + μ buf)
    return [t - lr * (1 + momentum) * a for t, a in zip(theta0, agg, strict=True)], agg


def _warm(mean, std, count=120):
    """A detector state past its warm-up with the given EWMA mean and std (recorded z-scores all 0)."""
    return {"mean": mean, "m2": std * std, "count": count, "window": [0.0] * min(count, 120)}


# ---- the pipeline of one sync against the reference ---------------------------------------------------
@pytest.mark.parametrize("norm_scope, clip_scope", [("tensor", "tensor"), ("tensor", "model"), ("model", "tensor"),
                                                    ("model", "model")])
def test_one_sync_matches_float64_reference(norm_scope, clip_scope):
    deltas = _deltas(4, big=3)
    # worker 3's detector has seen norms about 0.1 (std 0.01) on every unit: its 100x update is an outlier
    detectors = {(3, u): _warm(0.1, 0.01) for u in range(2 if norm_scope == "tensor" else 1)}
    opts = {"norm_scope": norm_scope, "clip_scope": clip_scope, "temperature": 0.05, "clip": 0.06}
    theta0, seen, got, strategy = _sync_once(opts, deltas, detectors)
    flagged = {(3, u) for u in range(len(detectors))}
    want, agg = _reference(theta0, seen, flagged=flagged, temperature=0.05, phi=0.06, norm_scope=norm_scope,
                           clip_scope=clip_scope)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    if clip_scope == "tensor":  # the weight's average is clipped, the bias's is not
        _, raw = _reference(theta0, seen, flagged=flagged, temperature=0.05, norm_scope=norm_scope)
        assert float(raw[0].norm()) > 0.06 > float(raw[1].norm())
        assert float(agg[0].norm()) == pytest.approx(0.06, rel=1e-12)
    assert strategy.outliers == len(flagged)
    assert strategy.detectors[3][0].count == 120 and strategy.detectors[0][0].count == 1  # outliers not recorded
    assert strategy.metrics() == {"syncs": 1, "outliers": len(flagged)}


def test_outlier_weight_is_below_1e_100_and_its_update_is_dropped():
    w = softmax_weights([0.10, 0.12, 0.09, 0.5 + 1e6], 1.0)
    assert w[3] < 1e-100 and sum(w) == pytest.approx(1.0, abs=1e-15)
    deltas = _deltas(3, big=2)
    detectors = {(2, 0): _warm(0.1, 0.01), (2, 1): _warm(0.1, 0.01)}
    theta0, seen, got, _ = _sync_once({"clip": math.inf}, deltas, detectors)
    # what the others alone give: the softmax over workers 0 and 1
    want, _ = _reference(theta0, [seen[0], seen[1]])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_every_worker_an_outlier_freezes_that_tensor():
    deltas = _deltas(2)
    detectors = {(r, 0): _warm(1e-4, 1e-6) for r in range(2)}  # the weight's norms are far above 1e-4 + 3e-6
    theta0, seen, got, strategy = _sync_once({"clip": math.inf}, deltas, detectors)
    assert torch.equal(got[0], theta0[0])  # no gradient: the outer step leaves it (and its momentum) alone
    assert strategy.outer.state.get(strategy.global_params[0], {}) == {}
    want, _ = _reference(theta0, seen)
    torch.testing.assert_close(got[1], want[1], **TOL)


def test_equal_norms_give_the_uniform_mean_as_diloco():
    assert softmax_weights([0.7] * 3, 1.0) == [1 / 3] * 3
    v, b = torch.tensor([[0.3, -0.1, 0.2, 0.05, 0.4]], dtype=DT), torch.tensor([0.02], dtype=DT)
    deltas = [[torch.roll(v, r, 1), b * (-1) ** r] for r in range(3)]  # different directions, equal norms
    outer = {"outer_args": {"momentum": 0.8, "nesterov": True}}
    _, seen, got, _ = _sync_once({"anomaly": False, "clip": math.inf, **outer}, deltas)
    _, _, want, _ = _sync_once(outer, deltas, name="diloco")
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-15)
    norms = [[float(t.norm()) for t in d] for d in seen]
    assert all(math.isclose(n[0], norms[0][0], rel_tol=1e-12) for n in norms)


def test_clipping_is_a_no_op_below_phi_and_scales_to_phi_above():
    assert clip_factor(0.5, 1.0) == 1.0 and clip_factor(1.0, 1.0) == 1.0 and clip_factor(4.0, 1.0) == 0.25
    sgd = {**OFF, "outer_lr": 1.0, "outer_args": {"momentum": 0.0}}
    deltas = _deltas(3)
    theta0, seen, free, _ = _sync_once(sgd, deltas)
    mean = [(theta0[j] - free[j]) for j in range(2)]  # θ − θ_new: the plain mean
    big = max(float(m.norm()) for m in mean)
    _, _, same, _ = _sync_once({**sgd, "clip": big * 1.01}, deltas)
    assert all(torch.equal(a, c) for a, c in zip(same, free, strict=True))
    for scope in ("tensor", "model"):
        phi = 0.5 * min(float(m.norm()) for m in mean)
        _, _, clipped, _ = _sync_once({**sgd, "clip": phi, "clip_scope": scope}, deltas)
        got = [theta0[j] - clipped[j] for j in range(2)]
        if scope == "tensor":
            for g, m in zip(got, mean, strict=True):
                assert float(g.norm()) == pytest.approx(phi, rel=1e-9)
                torch.testing.assert_close(g, m * (phi / float(m.norm())), rtol=1e-9, atol=1e-15)
        else:
            total = math.sqrt(sum(float(m.norm()) ** 2 for m in mean))
            assert math.sqrt(sum(float(g.norm()) ** 2 for g in got)) == pytest.approx(phi, rel=1e-9)
            for g, m in zip(got, mean, strict=True):
                torch.testing.assert_close(g, m * (phi / total), rtol=1e-9, atol=1e-15)


# ---- the detector ------------------------------------------------------------------------------------
def test_detector_never_flags_during_warmup_and_flags_a_spike_after():
    d = EWMADetector(alpha=0.02, warmup=5, threshold=3.0)
    for v in (1.0, 1e9, 1e-9, 5.0):
        assert not d.is_outlier(1e12)
        d.update(v)
    assert not d.is_outlier(1e12)
    d.update(1.0)  # the 5th update: warm-up over
    assert d.count == 5 and d.is_outlier(1e12) and not d.is_outlier(d.mean)


def test_detector_ewma_hand_computed():
    # the authors' update, from mean 0 and M2 0: m += α(x − m); M2 = (1 − α)(M2 + α (x − m_old)(x − m_new))
    d = EWMADetector(alpha=0.5, warmup=2, threshold=3.0)
    d.update(1.0)
    assert (d.mean, d.m2, d.window) == (0.5, 0.125, [0.0])
    d.update(1.0)
    assert (d.mean, d.m2) == (0.75, 0.09375)
    assert d.window == [0.0, pytest.approx(0.25 / math.sqrt(0.09375))]  # past warm-up: z recorded
    # z of 2.0: (2 − 0.75)/0.30619 = 4.08; factor max(1, std of the window [0, 0.816]) = 1 -> outlier
    assert d.is_outlier(2.0) and not d.is_outlier(1.6)


# ---- through the runner ------------------------------------------------------------------------------
BASE = dict(task="digits", optimizer="adamw", lr=3e-3, batch_size=16, workers=2, device="cpu", step_time=0.01,
            log_every=1, eval_every=5, steps=10)


def _final(out, drop=()):
    ck = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    recs = read_metrics(Path(out) / "metrics.jsonl")
    return ck["workers"][0]["model"], [{k: v for k, v in r.items() if k not in ("wall_time_s", *drop)} for r in recs]


def _run(tmp_path, name, **kw):
    cfg = Config(**{**BASE, **kw, "out": str(tmp_path / name)})
    run(cfg)
    return cfg.out


def _same_models(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_penalties_off_with_outer_sgd_lr1_is_localsgd_bit_for_bit(tmp_path):
    a = _run(tmp_path, "a", strategy="localsgd", strategy_args={"sync_every": 3})
    b = _run(tmp_path, "b", strategy="edit", strategy_args={"sync_every": 3, **OFF, "outer_lr": 1.0,
                                                            "outer_args": {"momentum": 0.0}})
    (ma, ra), (mb, rb) = _final(a), _final(b, drop=("syncs", "edit"))
    assert _same_models(ma, mb) and ra == rb  # bytes included: no extra traffic without the penalties


def test_uniform_weights_are_diloco_bit_for_bit(tmp_path):
    # T huge: every weight is exactly 1/2; the weighted exchange is DiLoCo's, plus the all-gather of the norms
    outer = {"outer_args": {"momentum": 0.9, "nesterov": True}}
    a = _run(tmp_path, "a", strategy="diloco", strategy_args={"sync_every": 3, **outer})
    b = _run(tmp_path, "b", strategy="edit", strategy_args={"sync_every": 3, "anomaly": False, "clip": math.inf,
                                                            "temperature": 1e300, **outer})
    (ma, ra), (mb, rb) = _final(a), _final(b, drop=("syncs", "edit"))
    assert _same_models(ma, mb)
    assert [r.get("train_loss") for r in ra] == [r.get("train_loss") for r in rb]
    tensors = len(ma)
    per_sync = 8 * (2 * tensors + 1)  # (N − 1) × 8 bytes × (U norms + U flags + 1 step count), N = 2
    assert rb[-1]["bytes_sent"] - ra[-1]["bytes_sent"] == pytest.approx(3 * per_sync, rel=1e-12)


@pytest.mark.filterwarnings("ignore:strategy 'edit'")  # the runner checks sync_every, unused under sync_time
def test_a_edit_with_equal_speeds_and_sync_time_h_steps_is_edit(tmp_path):
    opts = {"ewma_warmup": 1, "ewma_threshold": 0.5, "clip": 0.5, "temperature": 0.1}  # every part acts
    net = "bandwidth=1e30,latency=0"
    a = _run(tmp_path, "a", strategy="edit", network=net, strategy_args={"sync_every": 4, **opts}, steps=12)
    b = _run(tmp_path, "b", strategy="edit", network=net, strategy_args={"sync_time": 0.04, **opts}, steps=12)
    (ma, ra), (mb, rb) = _final(a, drop=("sim_time_s", "edit")), _final(b, drop=("sim_time_s", "skipped_syncs", "edit"))
    assert _same_models(ma, mb) and ra == rb
    assert ra[-1]["syncs"] == 3 and ra[-1]["outliers"] > 0


def _timed_loop(opts, seconds, steps, network=FREE):
    """The runner's event loop for a timed strategy: the steps each worker took in each completed round."""
    world = len(seconds)
    group = SimGroup(world, network)
    strategy = strategies.create("edit", group, opts)
    strategy.plan(steps, 0, seconds)
    workers = _workers(world)
    strategy.setup(workers)
    rounds, counts = [], [0] * world
    for step in range(1, steps + 1):
        active = strategy.computing(step)
        for i in active:
            w = workers[i]
            x, y = _batch(i, counts[i])
            (w.model(x) - y).square().mean().backward()
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
            group.advance(i, seconds[i])
            counts[i] += 1
        before = strategy.syncs
        strategy.after_step(workers, step)
        if strategy.syncs > before:
            rounds.append(counts)
            counts = [0] * world
    return rounds, strategy, group


def test_a_edit_a_2x_slower_worker_takes_half_the_steps():
    rounds, strategy, group = _timed_loop({"sync_time": 0.1}, [0.01, 0.02], 30)
    assert rounds == [[10, 5]] * 3
    assert group.clocks == [pytest.approx(0.3)] * 2
    # with the default network a sync takes time, and the next round starts late: still about 2:1
    rounds, _, _ = _timed_loop({"sync_time": 0.1}, [0.01, 0.02], 30, NetworkModel())
    assert rounds[0] == [10, 5] and all(f >= 2 * s and f >= 9 for f, s in rounds)


def test_a_edit_slowdowns_never_cross_a_deadline():
    opts = {"sync_time": 0.05, "slow_prob": 0.3, "slow_factor": 2.5}
    rounds, strategy, _ = _timed_loop(opts, [0.01, 0.013, 0.02], 40)
    assert len(rounds) == 8 and all(0 < n <= 5 for r in rounds for n in r)
    assert any(r[0] < 5 for r in rounds)  # some straggling steps cost the fast worker a step


def test_a_edit_min_steps_skips_a_sync():
    # 2 workers at 0.01 s: 4 steps per 0.02 s slot; min_steps 6 skips every other slot
    rounds, strategy, _ = _timed_loop({"sync_time": 0.02, "min_steps": 6}, [0.01, 0.01], 12)
    assert rounds == [[4, 4]] * 3 and strategy.skipped == 3
    assert strategy.metrics()["skipped_syncs"] == 3


def test_a_edit_step_weights():
    opts = {"sync_time": 0.1, "step_weight": True, "weighting": False, "anomaly": False}
    _, strategy, _ = _timed_loop(opts, [0.01, 0.02], 1)  # units: the weight and the bias
    norms, flags = [[1.0, 0.1], [2.0, 0.3]], [[False, False], [False, False]]
    fast, slow = 2 * (0.25 + 0.5 * 10 / 15), 2 * (0.25 + 0.5 * 5 / 15)  # N · ((1 − r)/N + r s_i/Σs)
    assert strategy._scales(norms, flags, [10.0, 5.0]) == [[pytest.approx(fast)] * 2, [pytest.approx(slow)] * 2]
    strategy.options.weighting = True  # mixed with the softmax of −G/T
    scales = strategy._scales(norms, flags, [10.0, 5.0])
    for u in range(2):
        w = softmax_weights([norms[0][u], norms[1][u]], 1.0)
        assert scales[0][u] == pytest.approx(2 * (0.5 * w[0] + 0.5 * 10 / 15), rel=1e-12)
        assert scales[0][u] + scales[1][u] == pytest.approx(2.0, rel=1e-12)


@pytest.mark.filterwarnings("ignore:strategy 'edit'")
@pytest.mark.parametrize("kw", [
    {"strategy_args": {"sync_every": 3, "ewma_warmup": 1, "clip": 0.5}},
    {"strategy_args": {"sync_time": 0.03, "slow_prob": 0.3, "slow_factor": 2.0, "min_steps": 4, "step_weight": True,
                       "ewma_warmup": 1}, "worker_speeds": [1.0, 1.5]},
])
def test_runner_resume_is_bit_identical(tmp_path, kw):
    cfg = dict(**{**BASE, "steps": 20}, strategy="edit", **kw)
    whole, part = Config(**cfg, out=str(tmp_path / "w")), Config(**cfg, out=str(tmp_path / "p"))
    run(whole)
    run(part, stop_at=7)  # mid-round (and, timed, with a sync skipped before it)
    run(part, resume=True)
    (ma, ra), (mb, rb) = _final(whole.out), _final(part.out)
    assert _same_models(ma, mb) and ra == rb
    assert ra[-1]["syncs"] >= 3 and ra[-1]["outliers"] > 0
    if "sync_time" in kw["strategy_args"]:
        assert ra[-1]["skipped_syncs"] > 0 and ra[-1]["samples"] < 20 * 2 * 16  # idle and slowed steps


# ---- bad options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, msg", [
    ({"clip": -1.0}, r"clip=-1.0 is out of range; allowed: 0 < clip"),
    ({"clip": 0}, r"clip=0.0 is out of range"),
    ({"temperature": 0}, r"temperature=0.0 is out of range; allowed: 0 < temperature"),
    ({"temperature": -2.0}, r"temperature=-2.0 is out of range"),
    ({"temperature": math.inf}, r"temperature=inf; allowed: a finite number > 0"),
    ({"norm_scope": "layer"}, r"norm_scope"),
    ({"ewma_alpha": 0}, r"ewma_alpha=0.0 is out of range"),
    ({"ewma_warmup": 0}, r"ewma_warmup=0 is out of range"),
    ({"sync_time": 0}, r"sync_time=0.0 is out of range"),
    ({"sync_time": math.inf}, r"sync_time=inf"),
    ({"sync_time": 1.0, "sync_rule": "qsr,alpha=0.1"}, r"sync_rule='qsr,alpha=0.1' does too"),
    ({"step_weight": True}, r"step_weight applies to A-EDiT's time-based syncs; set sync_time=SECONDS too"),
    ({"min_steps": 10}, r"min_steps applies to A-EDiT"),
    ({"sync_time": 1.0, "step_weight_ratio": 1.5}, r"step_weight_ratio=1.5 is out of range"),
    ({"sync_time": 1.0, "slow_factor": 0.5}, r"slow_factor=0.5 is out of range"),
    ({"outer_args": {"betas": [0.9, 0.9]}}, r"optimizer 'sgd' has no hyperparameter 'betas'"),
])
def test_bad_options_are_one_config_error(args, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(task="digits", strategy="edit", workers=2, strategy_args=args).validate()


@pytest.mark.filterwarnings("ignore:strategy 'edit'")
def test_sync_time_without_step_time_is_a_config_error(tmp_path):
    cfg = Config(**{**BASE, "step_time": None}, strategy="edit", strategy_args={"sync_time": 0.1},
                 out=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="needs a fixed step time: pass --step-time"):
        run(cfg)


def test_client_dp_is_refused():
    with pytest.raises(ConfigError, match="not 'edit'"):
        Config(task="digits", strategy="edit", workers=2, dp="noise=1,clip=1,unit=client").validate()
