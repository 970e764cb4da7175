"""Byzantine attacks (sgdlab.exchange.attack_*): hand-computed outputs, the Gaussian's statistics, ALIE's z
from (n, f), mimic's heuristic against a plain reference, label flipping in the runner, the NaN stop under
the mean, honest-only reported losses, and sim == torch for every attack (3 gloo processes, one launch)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from sgdlab import Config, exchange, run
from sgdlab.errors import ConfigError, DivergenceError
from sgdlab.exchange.attack_alie import z_max
from sgdlab.exchange.base import Slot
from sgdlab.metrics import read_metrics
from sgdlab.options import build_options

X = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]), torch.tensor([7.0, 8.0, 9.0])]
SLOT = Slot("grad", 1, 0, (), 4)  # 4 workers: the 3 honest ones of X and one attacker (rank 3)


def attack(name, **opts):
    cls = exchange.attacks.get(name)
    return cls(build_options(cls.Options, opts, f"attack {name!r} key"))


# ---- hand-computed outputs (issue 14, section 3) ----------------------------------------------------------
@pytest.mark.parametrize(("name", "opts", "want"), [
    ("signflip", {}, [-4.0, -5.0, -6.0]),                 # −(honest mean)
    ("signflip", {"of": "own"}, [-1.0, 0.0, 1.0]),        # −(own vector)
    ("ipm", {"eps": 2.0}, [-8.0, -10.0, -12.0]),
    ("ipm", {}, [-8.0, -10.0, -12.0]),                    # default eps = 2 (ByzFL's)
    ("alie", {"z": 1.5}, [8.5, 9.5, 10.5]),               # mean + 1.5 · sample std (3 in every coordinate)
    ("alie", {}, [4.0, 5.0, 6.0]),                        # n = 4, f = 1: s = 2, Φ⁻¹(1/2) = 0
    ("mimic", {}, [1.0, 2.0, 3.0]),
    ("mimic", {"worker": 2}, [7.0, 8.0, 9.0]),
    ("labelflip", {}, [1.0, 0.0, -1.0]),                  # a data attack sends its own vector unchanged
])
def test_hand_computed(name, opts, want):
    own = torch.tensor([1.0, 0.0, -1.0])
    a = attack(name, **opts)
    got = a(own, X if a.omniscient else None, SLOT, 3)
    assert got.dtype == torch.float32 and torch.equal(got, torch.tensor(want))
    assert torch.equal(own, torch.tensor([1.0, 0.0, -1.0])) and torch.equal(X[0], torch.tensor([1.0, 2.0, 3.0]))


def test_omniscience():
    # sgdlab's own attacks (other test files register toy ones in the same registry)
    ours = [n for n in exchange.attacks.names() if exchange.attacks.get(n).__module__.startswith("sgdlab.")]
    assert {n for n in ours if attack(n).omniscient} == {"signflip", "alie", "ipm", "mimic"}
    assert not attack("signflip", of="own").omniscient
    assert [n for n in ours if exchange.attacks.get(n).data_attack] == ["labelflip"]


@pytest.mark.parametrize(("value", "check"), [("nan", math.isnan), ("inf", lambda v: v == math.inf)])
def test_nan_worker(value, check):
    a = attack("nan", value=value, start=3)
    own = torch.ones(5)
    assert torch.equal(a(own, None, Slot("grad", 2, 0, (), 4), 3), own)  # honest before `start`
    assert all(check(v) for v in a(own, None, Slot("grad", 3, 0, (), 4), 3).tolist())
    # a spec's value=nan / value=inf is read as a float by TOML; it round-trips through the canonical spec
    spec = exchange.ExchangeSpec("fp32", "mean", f"count=1,attack=nan,value={value}").canonical()
    assert spec.byzantine == f"count=1,attack=nan,value={value},start=1"
    assert exchange.ExchangeSpec(byzantine=spec.byzantine).attack()[0].options.value == value


# ---- Gaussian ------------------------------------------------------------------------------------------------
def test_gaussian_statistics_and_seeding():
    n = 200_000
    a = attack("gaussian", sigma=3.0, mu=-2.0)
    x = a(torch.zeros(n), None, SLOT, 3).double()
    # mean: standard error 3/sqrt(n); variance: standard error sigma² sqrt(2/n)
    assert abs(x.mean().item() + 2.0) < 5 * 3.0 / math.sqrt(n)
    assert abs(x.var().item() - 9.0) < 5 * 9.0 * math.sqrt(2 / n)
    assert abs(((x + 2) / 3).pow(3).mean().item()) < 5 * math.sqrt(15 / n)  # symmetric
    again = a(torch.zeros(n), None, SLOT, 3)
    assert torch.equal(again.double(), x)  # seeded by (run seed, stream, step, rank): every backend draws alike
    for other in (Slot("grad", 2, 0, (), 4), Slot("delta", 1, 0, (), 4), Slot("grad", 1, 1, (), 4)):
        assert not torch.equal(a(torch.zeros(n), None, other, 3), again)
    assert not torch.equal(a(torch.zeros(n), None, SLOT, 2), again)
    assert torch.equal(attack("gaussian", sigma=0.0, mu=1.5)(torch.zeros(4), None, SLOT, 3), torch.full((4,), 1.5))


# ---- ALIE's z from n and f -----------------------------------------------------------------------------------
def _paper_z(n, f):
    """Baruch et al. 2019: s = floor(n/2 + 1) - f; z_max = max z with Φ(z) < (n - s)/n (bisection on erf)."""
    s = math.floor(n / 2 + 1) - f
    target = (n - s) / n
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target:
            lo = mid
        else:
            hi = mid
    return lo


@pytest.mark.parametrize(("n", "f"), [(16, 1), (16, 3), (16, 7), (3, 1), (10, 2), (50, 12), (51, 20), (100, 1)])
def test_alie_z_matches_the_paper(n, f):
    assert z_max(n, f) == pytest.approx(_paper_z(n, f), abs=1e-9)
    honest = [torch.randn(6, generator=torch.Generator().manual_seed(i)) for i in range(n - f)]
    got = attack("alie")(honest[0], honest, Slot("grad", 1, 0, (), n), n - 1)
    h = torch.stack(honest).double()
    want = h.mean(0) + z_max(n, f) * h.std(0, correction=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_alie_z_values():
    assert z_max(16, 1) == 0.0 and z_max(16, 3) == pytest.approx(0.318639, abs=1e-6)  # Φ⁻¹(10/16)
    with pytest.raises(ConfigError, match="z is undefined"):
        z_max(4, 3)


# ---- mimic's max-variance heuristic against a plain float64 reference ---------------------------------------
def _mimic_reference(rounds, learn, z0):
    """ByzFL's WorkerWithMaxVariance, written out: worker 0 while learning, then argmax |<x_i, z>|."""
    mu, z, picks = torch.zeros_like(z0), z0.clone(), []
    for t, x in enumerate(rounds, start=1):
        if t <= learn:
            mu = mu * ((t - 1) / t) + x.mean(0) / t
            dev = x - mu
            c = (dev * (dev @ z)[:, None]).sum(0)
            c = c / c.norm()
            z = z * ((t - 1) / t) + c / t
            z = z / z.norm()
            picks.append(0)
        else:
            picks.append(int((x @ z).abs().argmax()))
    return picks


def test_mimic_heuristic_matches_reference_and_finds_the_outlier():
    from sgdlab.exchange._quant import hashed_seed

    g = torch.Generator().manual_seed(1)
    d, h, learn = 8, 5, 6
    direction = torch.zeros(d)
    direction[3] = 1.0
    rounds = []
    for t in range(12):  # worker 2 swings along coordinate 3, the others are small noise
        x = 0.1 * torch.randn(h, d, generator=g)
        x[2] += (4.0 if t % 2 else -4.0) * direction
        rounds.append(x)
    z0 = torch.rand(d, generator=torch.Generator().manual_seed(hashed_seed("mimic/0/grad"))).double()
    want = _mimic_reference([r.double() for r in rounds], learn, z0)
    a = attack("mimic", learn=learn)
    got = []
    for step, x in enumerate(rounds, start=1):
        honest = list(x)
        for rank in (h, h + 1):  # two Byzantine workers share one attack object in the simulator
            out = a(honest[0], honest, Slot("grad", step, 0, (), h + 2), rank)
        got.append(next(i for i, v in enumerate(honest) if torch.equal(v, out)))
    assert got == want and got[learn:] == [2] * (len(rounds) - learn)
    state = a.state_dict()
    b = attack("mimic", learn=learn)
    b.load_state_dict(state)  # the checkpointed state picks the same worker
    assert torch.equal(b(X[0], list(rounds[-1]), Slot("grad", 99, 0, (), h + 2), h), rounds[-1][2])


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("byzantine", "workers", "match"), [
    ("count=3,attack=alie", 4, "z is undefined"),
    ("count=2,attack=alie,z=1", 3, "at least 2 honest workers"),
    ("count=1,attack=alie,z=big", 4, "alie z='big'; allowed: a number, or auto"),
    ("count=1,attack=mimic,worker=3", 4, "mimic worker=3 is out of range; allowed: 0 <= worker < 3"),
    ("count=1,attack=nan,value=zero", 4, "value='zero'; allowed: nan, inf"),
    ("count=1,attack=nan,value=-inf", 4, "value='-inf'; allowed: nan, inf"),
    ("count=1,attack=gaussian,sigma=-1", 4, "gaussian sigma=-1.0 is out of range"),
    ("count=1,attack=ipm,eps=0", 4, "ipm eps=0.0 is out of range"),
    ("count=1,attack=signflip,of=all", 4, "signflip of='all'; allowed: mean"),
    ("count=1,attack=bogus", 4, "bogus"),
])
def test_bad_attack_config(byzantine, workers, match):
    with pytest.raises(ConfigError, match=match):
        Config(task="digits", strategy="ddp", workers=workers, byzantine=byzantine).spec()


def test_labelflip_needs_a_classification_task(tmp_path):
    cfg = Config(task="quadratic", strategy="ddp", workers=3, steps=2, byzantine="count=1,attack=labelflip",
                 out=str(tmp_path / "q"), device="cpu")
    with pytest.raises(ConfigError, match="labelflip flips class labels; task 'quadratic' has none"):
        run(cfg)


def test_distributed_refuses_a_data_attack():
    from sgdlab.distributed import Distributed

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="labelflip changes the Byzantine workers' training data"):
        Distributed(model, torch.optim.SGD(model.parameters(), lr=0.1), "ddp", byzantine="count=0,attack=labelflip")


# ---- the runner: label flipping, honest-only losses, the NaN stop --------------------------------------------
BASE = dict(task="digits", optimizer="sgd", lr=0.05, steps=4, batch_size=16, eval_every=4, log_every=1,
            device="cpu", step_time=0.01, strategy="ddp", workers=3)


def test_labelflip_poisons_only_the_byzantine_workers_batches():
    from sgdlab.distributed import SimGroup
    from sgdlab.runner.build import build_parts

    spec = Config(**{**BASE, "workers": 4}, byzantine="count=2,attack=labelflip").spec()
    parts = build_parts(spec, SimGroup(4, spec.network))
    assert [r.poison is not None for r in parts.replicas] == [False, False, True, True]
    idx = torch.arange(40)
    x, y = parts.task.get_batch(idx)
    x2, y2 = parts.replicas[3].poison((x, y))
    assert torch.equal(x2, x) and torch.equal(y2, 9 - y) and not torch.equal(y2, y)
    assert torch.equal(parts.task.get_batch(idx)[1], y)  # the task's data itself is untouched


def test_reported_train_loss_is_the_honest_workers(tmp_path):
    from sgdlab.distributed import SimGroup
    from sgdlab.runner.build import build_parts

    cfg = Config(**{**BASE, "workers": 4, "steps": 1}, byzantine="count=2,attack=labelflip", out=str(tmp_path / "r"))
    res = run(cfg)
    reported = [r["train_loss"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "train_loss" in r][0]
    spec = cfg.spec()
    parts = build_parts(spec, SimGroup(4, spec.network))  # the same initial models and first batches
    losses = []
    for r in parts.replicas:
        batch = parts.task.get_batch(r.sampler.next())
        if r.poison is not None:
            batch = r.poison(batch)
        losses.append(parts.task.loss(r.worker.model, batch).item())
    assert reported == pytest.approx(sum(losses[:2]) / 2, rel=1e-6)
    assert reported != pytest.approx(sum(losses) / 4, rel=1e-3)  # the flipped workers' losses are left out
    assert res.summary["final_train_loss"] == pytest.approx(reported)


def test_nan_under_the_mean_stops_naming_worker_and_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "nan"
    cfg = Config(**{**BASE, "steps": 8, "checkpoint_every": 2, "eval_every": 2},
                 byzantine="count=1,attack=nan,start=5", out=str(out))
    with pytest.raises(DivergenceError) as err:
        run(cfg)
    msg = str(err.value)
    assert "mean of the workers' vectors (worker 2 (Byzantine) sent NaN/Inf values) is nan at step 5" in msg
    assert f"last good checkpoint is kept at {out / 'checkpoint.pt'}" in msg and "--aggregate" in msg
    assert err.value.step == 5
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4
    assert all(torch.isfinite(t).all() for w in ck["workers"] for t in w["model"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"


@pytest.mark.parametrize("compress", ["int8", "int4", "qsgd", "terngrad", "topk", "scaled_sign"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_worker_is_seen_through_lossy_compressors(compress, value):
    """Integer codes cannot carry NaN: the compressors keep a non-finite scale for the block or tensor, so the
    decoded vector is not finite and the mean stops, naming the worker."""
    from sgdlab.distributed import NetworkModel, SimGroup

    ex = exchange.ExchangeSpec(compress, "mean", f"count=1,attack=nan,value={value}").build(SimGroup(3, NetworkModel()))
    g = torch.Generator().manual_seed(0)
    tensors = [[torch.randn(300, generator=g), torch.randn(7, generator=g)] for _ in range(3)]
    with pytest.raises(exchange.pipeline.NonFiniteError, match=r"worker 2 \(Byzantine\) sent NaN/Inf values"):
        ex.mean_(tensors, key="grad", step=1)


def test_an_overflowing_mean_names_no_worker():
    from sgdlab.distributed import NetworkModel, SimGroup

    ex = exchange.ExchangeSpec().build(SimGroup(2, NetworkModel()))
    tensors = [[torch.full((3,), 3e38)], [torch.full((3,), 3e38)]]
    with pytest.raises(exchange.pipeline.NonFiniteError, match="every worker's vector is finite, but they overflow"):
        ex.mean_(tensors, key="grad", step=7)
    assert torch.equal(tensors[0][0], torch.full((3,), 3e38))  # nothing was written


# ---- sim == torch for every attack, 3 processes, one torchrun launch ------------------------------------------
def _cases():
    cases = {
        "signflip": dict(byzantine="count=1,attack=signflip"),
        "gaussian": dict(byzantine="count=1,attack=gaussian,sigma=0.1"),
        "alie": dict(byzantine="count=1,attack=alie"),
        "ipm-localsgd": dict(byzantine="count=1,attack=ipm,eps=2", strategy="localsgd",
                             strategy_args={"sync_every": 2}),
        "mimic": dict(byzantine="count=1,attack=mimic,learn=2"),
        "labelflip": dict(byzantine="count=1,attack=labelflip"),
        "nan-mean": dict(byzantine="count=1,attack=nan,start=3", checkpoint_every=2),
    }
    if "median" in exchange.aggregators:  # a robust rule discards the NaN worker (the aggregators' own tests)
        cases["nan-median"] = dict(byzantine="count=1,attack=nan", aggregate="median")
    return {name: {**BASE, "steps": 3, "eval_every": 3, **kw} for name, kw in cases.items()}


@pytest.mark.slow
def test_torch_backend_matches_simulator_for_every_attack(tmp_path):
    from .test_torch_backend import assert_matches_sim, torchrun

    cases = _cases()
    ours = {n for n in exchange.attacks.names() if exchange.attacks.get(n).__module__.startswith("sgdlab.")}
    assert {c["byzantine"].split("attack=")[1].split(",")[0] for c in cases.values()} == ours
    res = torchrun(3, str(Path(__file__).parent / "attacks_script.py"), str(tmp_path / "torch"), json.dumps(cases))
    assert res.returncode == 0, res.stderr[-3000:]
    for name, kw in cases.items():
        if name == "nan-mean":
            stop = "worker 2 (Byzantine) sent NaN/Inf values) is nan at step 3"
            with pytest.raises(DivergenceError, match=re.escape(stop)):
                run(Config(**{**kw, "out": str(tmp_path / "sim" / name)}))
            for rank in range(3):  # every rank stopped with the same message, and none hung
                msg = (tmp_path / "torch" / name / f"error.rank{rank}.txt").read_text()
                assert stop in msg, (rank, msg)
            ck = torch.load(tmp_path / "torch" / name / "checkpoint.pt", weights_only=True)
            assert ck["step"] == 2
            continue
        _, _, losses = assert_matches_sim(tmp_path, name, kw)
        assert all(math.isfinite(v) for v in losses), name


def test_mimic_state_is_checkpointed_and_resumes_exactly(tmp_path):
    kw = {**BASE, "workers": 4, "steps": 6, "data_split": "dirichlet:0.5", "byzantine": "count=1,attack=mimic,learn=2"}
    whole = run(Config(**kw, out=str(tmp_path / "whole")))
    run(Config(**kw, out=str(tmp_path / "parts")), stop_at=3)
    ck = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert ck["strategy"]["exchange"]["attack"]["grad"]["t"] == 3
    parts = run(Config(**kw, out=str(tmp_path / "parts")), resume=True)
    assert parts.summary["final_train_loss"] == whole.summary["final_train_loss"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["workers"][0]["model"]
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["workers"][0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("name", exchange.aggregators.names())
def test_a_nan_worker_never_reaches_the_model(name, value):
    import dataclasses

    from sgdlab.distributed import NetworkModel, SimGroup

    cls = exchange.aggregators.get(name)
    if getattr(cls, "per_rank", False) or name.startswith("toy-"):
        pytest.skip("a decentralised or test-only rule")
    agg = f"{name},f=1" if "f" in {fl.name for fl in dataclasses.fields(cls.Options)} else name
    ex = exchange.ExchangeSpec("fp32", agg, f"count=1,attack=nan,value={value}").build(SimGroup(5, NetworkModel()))
    g = torch.Generator().manual_seed(0)
    tensors = [[torch.randn(6, generator=g)] for _ in range(5)]
    before = [t[0].clone() for t in tensors]
    if cls.linear:  # the mean stops, naming the worker, and leaves every tensor as it was
        with pytest.raises(exchange.pipeline.NonFiniteError, match=r"worker 4 \(Byzantine\) sent NaN/Inf"):
            ex.mean_(tensors, key="grad", step=1)
        assert all(torch.equal(t[0], b) for t, b in zip(tensors, before, strict=True))
    else:
        ex.mean_(tensors, key="grad", step=1)
        assert all(torch.isfinite(t[0]).all() for t in tensors)
