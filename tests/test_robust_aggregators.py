"""Byzantine-robust aggregators and pre-aggregation rules against hand-computed values and plain float64
references written here; non-finite inputs; the bounds on f as one-line ConfigErrors; a property test of the
median's breakdown; cclip's state through the exchange and its checkpoint; ddp with a robust rule trains;
sim == torch for every rule (one torchrun launch of 3 gloo processes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgdlab import Config, exchange, run
from sgdlab.distributed import NetworkModel, SimGroup
from sgdlab.errors import ConfigError
from sgdlab.exchange.base import Chained, Slot, build_stage
from sgdlab.exchange.bucketing import permutation

X = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]), torch.tensor([7.0, 8.0, 9.0])]
AGGREGATORS = {"median": {}, "trimmed-mean": {"f": 2}, "krum": {"f": 2}, "multi-krum": {"f": 2, "m": 3},
               "geomed": {}, "cclip": {"tau": 0.5, "iters": 3}, "mda": {"f": 2}}
PRE = {"nnm": {"f": 2}, "bucketing": {"s": 2}, "arc": {"f": 2}}


def agg(name, **kw):
    return build_stage(exchange.aggregators, "krum" if name == "multi-krum" else name, kw, "aggregator")


def pre(name, **kw):
    return build_stage(exchange.pre_aggregators, name, kw, "pre-aggregator")


def rows(g, n=7, d=5, scale=1.0):
    return [torch.randn(d, generator=g) * scale for _ in range(n)]


# ---- plain float64 references of the papers' rules ------------------------------------------------------
def d64(vs):
    return [v.double().tolist() for v in vs]


def dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def mean_of(vs):
    return [sum(c) / len(vs) for c in zip(*vs, strict=True)]


def ref_median(vs):
    out = []
    for c in zip(*d64(vs), strict=True):
        s, n = sorted(c), len(c)
        out.append(s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)
    return out


def ref_trimmed(vs, f):
    return [sum(sorted(c)[f:len(c) - f]) / (len(c) - 2 * f) for c in zip(*d64(vs), strict=True)]


def ref_krum(vs, f, m):
    x = d64(vs)
    n = len(x)
    score = [sum(sorted(dist(x[i], x[j]) ** 2 for j in range(n) if j != i)[:n - f - 2]) for i in range(n)]
    best = sorted(range(n), key=lambda i: (score[i], i))[:m]
    return mean_of([x[i] for i in best])


def ref_geomed_objective(vs, z):
    return sum(dist(v, z) for v in d64(vs))


def ref_geomed(vs, iters=20000):
    """Plain Weiszfeld in float64 from the mean, many iterations (no smoothing needed off the data)."""
    x = d64(vs)
    z = mean_of(x)
    for _ in range(iters):
        w = [1 / max(dist(v, z), 1e-15) for v in x]
        z = [sum(wi * v[k] for wi, v in zip(w, x, strict=True)) / sum(w) for k in range(len(z))]
    return z


def ref_cclip(vs, centre, tau, iters):
    x, v = d64(vs), list(centre)
    for _ in range(iters):
        step = [0.0] * len(v)
        for xi in x:
            diff = [a - b for a, b in zip(xi, v, strict=True)]
            s = min(1.0, tau / dist(xi, v)) if dist(xi, v) > 0 else 1.0
            step = [a + s * b for a, b in zip(step, diff, strict=True)]
        v = [a + b / len(x) for a, b in zip(v, step, strict=True)]
    return v


def ref_mda(vs, f):
    x = d64(vs)
    n = len(x)
    best = min(itertools.combinations(range(n), n - f),
               key=lambda s: max((dist(x[i], x[j]) for i in s for j in s), default=0.0))
    return mean_of([x[i] for i in best])


def ref_nnm(vs, f):
    x = d64(vs)
    n = len(x)
    return [mean_of([x[j] for j in sorted(range(n), key=lambda j: (dist(x[i], x[j]), j))[:n - f]])
            for i in range(n)]


def ref_arc(vs, f):
    x = d64(vs)
    n = len(x)
    k = math.floor(2 * f * (n - f) / n)
    norms = [dist(v, [0.0] * len(v)) for v in x]
    if k == 0:
        return x
    thr = sorted(norms)[n - k - 1]
    return [[c * min(1.0, thr / nv) for c in v] for v, nv in zip(x, norms, strict=True)]


def close(got, want, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               atol=tol, rtol=tol)


# ---- hand-computed values -------------------------------------------------------------------------------
def test_hand_computed_values_of_the_issue():
    want = torch.tensor([4.0, 5.0, 6.0])
    assert torch.equal(agg("median")(X), want)
    assert torch.equal(agg("trimmed-mean", f=1)(X), want)
    assert torch.equal(exchange.aggregators.get("mean")()(X), want)
    nnm = pre("nnm", f=1)(X)
    assert torch.equal(torch.stack(nnm), torch.tensor([[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]]))
    # ARC f=1, n=3: k = floor(2·1·2/3) = 1, the largest clipped to ‖(4,5,6)‖ = √77 (ByzFL's doc value)
    arc = torch.stack(pre("arc", f=1)(X))
    close(arc, [[1, 2, 3], [4, 5, 6], [7 * math.sqrt(77 / 194), 8 * math.sqrt(77 / 194), 9 * math.sqrt(77 / 194)]])
    close(arc[2], [4.41004009, 5.04004582, 5.67005155], tol=1e-6)
    # MDA f=1: {x1,x2} and {x2,x3} both have diameter √27; the first subset wins
    assert torch.equal(agg("mda", f=1)(X), torch.tensor([2.5, 3.5, 4.5]))
    # Krum f=0, n=3: one neighbour each; every score is 27 and the tie goes to the lower rank
    assert torch.equal(agg("krum", f=0)(X), X[0])
    assert torch.equal(agg("krum", f=0, m=3)(X), want)
    close(agg("cclip", tau=float("inf"))(X), [4, 5, 6])
    close(agg("geomed")(X), [4, 5, 6])  # collinear, symmetric about x2


def test_krum_and_multikrum_pick_the_constructed_vectors():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    honest = [torch.zeros(3), 0.1 * e1, -0.1 * e1, 0.1 * e2, -0.12 * e2]
    attackers = [torch.full((3,), 5.0), torch.full((3,), 5.1)]
    vs = honest + attackers                      # n = 7, f = 2: scores over n - f - 2 = 3 neighbours
    assert torch.equal(agg("krum", f=2)(vs), honest[0])   # the centre: 0.01 + 0.01 + 0.01
    # scores by hand: h0 0.03, h3 0.01+0.02+0.02 = 0.05, h1 = h2 = 0.01+0.02+0.0244 = 0.0544, h4 0.0632
    close(agg("krum", f=2, m=3)(vs), torch.stack([honest[0], honest[3], honest[1]]).mean(0))
    close(agg("krum", f=2, m=5)(vs), torch.stack(honest).mean(0))
    close(agg("krum", f=2, m=3)(vs), ref_krum(vs, 2, 3))


def test_mda_on_a_constructed_set():
    vs = [torch.tensor([v, 0.0]) for v in (0.0, 1.0, 2.0, 10.0, 2.5)]
    close(agg("mda", f=1)(vs), [1.375, 0.0])   # {0, 1, 2, 2.5}: diameter 2.5
    close(agg("mda", f=2)(vs), [5.5 / 3, 0.0])  # {1, 2, 2.5}: diameter 1.5 (< {0, 1, 2}'s 2)


def test_geometric_median_of_a_symmetric_set_is_its_centre():
    g = torch.Generator().manual_seed(1)
    centre = torch.randn(6, generator=g)
    offsets = [torch.randn(6, generator=g) * s for s in (1.0, 3.0, 0.2, 7.0)]
    vs = [centre + o for o in offsets] + [centre - o for o in offsets]
    close(agg("geomed")(vs), centre, tol=1e-5)


def test_geometric_median_minimises_the_sum_of_distances():
    g = torch.Generator().manual_seed(2)
    vs = rows(g, n=6, d=4) + [torch.full((4,), 30.0)]  # one far point
    want = ref_geomed(vs)
    got = agg("geomed")(vs)  # float32, default tolerance: the objective is within 1e-5 of the optimum
    assert ref_geomed_objective(vs, got.double().tolist()) <= ref_geomed_objective(vs, want) * (1 + 1e-5)
    got = agg("geomed", tol=1e-14, max_iter=5000)([v.double() for v in vs])  # the rule keeps the dtype
    assert got.dtype == torch.float64
    close(got, want, tol=1e-6)


def test_cclip_with_infinite_tau_is_the_mean_and_keeps_its_centre_per_stream():
    g = torch.Generator().manual_seed(3)
    vs = rows(g)
    close(agg("cclip", tau=float("inf"), iters=2)(vs), mean_of(d64(vs)))
    # 1-D by hand: x = (0, 0, 10), tau = 1: round 1 from 0: v = 1/3; round 2 from 1/3: 1/3 + (1/3)/3 = 4/9
    rule, state = agg("cclip", tau=1.0), {}
    one = [torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([10.0])]
    close(rule.aggregate(one, None, state), [1 / 3])
    close(rule.aggregate(one, None, state), [4 / 9])


def test_every_rule_matches_its_float64_reference():
    g = torch.Generator().manual_seed(4)
    for trial in range(3):
        vs = rows(g, n=7 + trial, d=5, scale=1 + trial)
        close(agg("median")(vs), ref_median(vs))
        close(agg("trimmed-mean", f=2)(vs), ref_trimmed(vs, 2))
        close(agg("krum", f=2)(vs), ref_krum(vs, 2, 1))
        close(agg("krum", f=2, m=4)(vs), ref_krum(vs, 2, 4))
        close(agg("mda", f=2)(vs), ref_mda(vs, 2))
        state, centre = {}, [0.0] * 5
        for _ in range(3):  # three rounds: each starts at the previous aggregate
            got = agg("cclip", tau=0.7, iters=2).aggregate(vs, None, state)
            centre = ref_cclip(vs, centre, 0.7, 2)
            close(got, centre)
        close(torch.stack(pre("nnm", f=2)(vs)), ref_nnm(vs, 2))
        close(torch.stack(pre("arc", f=2)(vs)), ref_arc(vs, 2))
        slot = Slot("grad", 5 + trial, seed=9)
        perm = permutation(len(vs), slot).tolist()
        want = [mean_of([d64(vs)[i] for i in perm[b:b + 3]]) for b in range(0, len(vs), 3)]
        close(torch.stack(pre("bucketing", s=3)(vs, slot)), want)
        close(agg("geomed", tol=1e-14, max_iter=5000)([v.double() for v in vs]), ref_geomed(vs), tol=1e-6)


def test_bucketing_draws_alike_per_round_and_differently_across_rounds():
    a, b = permutation(16, Slot("grad", 3, seed=1)), permutation(16, Slot("grad", 3, seed=1))
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(16))
    assert not torch.equal(a, permutation(16, Slot("grad", 4, seed=1)))
    assert len(pre("bucketing", s=3)(rows(torch.Generator(), n=7))) == 3  # ceil(7/3) buckets
    assert pre("bucketing", s=3).count(7) == 3


# ---- non-finite inputs ----------------------------------------------------------------------------------
BAD = [lambda v: torch.full_like(v, float("nan")), lambda v: torch.full_like(v, float("inf")),
       lambda v: torch.full_like(v, -float("inf")),
       lambda v: torch.where(torch.arange(v.numel()) % 2 == 0, torch.full_like(v, float("nan")), v),
       lambda v: torch.full_like(v, 3e38)]


@pytest.mark.parametrize("name", list(AGGREGATORS))
@pytest.mark.parametrize("bad", range(len(BAD)))
def test_f_non_finite_vectors_never_make_a_robust_rule_non_finite(name, bad):
    g = torch.Generator().manual_seed(5)
    vs = rows(g, n=7, d=6)
    for r in (1, 5):  # f = 2 bad vectors, not the last ones only
        vs[r] = BAD[bad](vs[r])
    rule = agg(name, **AGGREGATORS[name])
    out = rule.aggregate(vs, Slot("grad", 1), {})
    assert torch.isfinite(out).all(), (name, out)
    honest = torch.stack([v for i, v in enumerate(vs) if i not in (1, 5)])
    if name in ("median", "trimmed-mean", "krum", "multi-krum", "mda", "geomed"):
        assert (out <= honest.amax(0) + 1e-6).all() and (out >= honest.amin(0) - 1e-6).all(), (name, out)


@pytest.mark.parametrize("name", list(PRE))
@pytest.mark.parametrize("bad", range(len(BAD)))
def test_pre_aggregation_then_a_robust_rule_stays_finite(name, bad):
    g = torch.Generator().manual_seed(6)
    vs = rows(g, n=9, d=4)
    vs[3] = BAD[bad](vs[3])
    rule = Chained(pre(name, **({"f": 1} if name != "bucketing" else {"s": 2})), agg("median"))
    out = rule.aggregate(vs, Slot("grad", 2), {})
    assert torch.isfinite(out).all(), (name, out)


def test_nnm_never_mixes_a_non_finite_vector_into_a_finite_ones_row():
    g = torch.Generator().manual_seed(7)
    vs = rows(g, n=5, d=3)
    vs[4] = torch.full((3,), float("nan"))
    out = torch.stack(pre("nnm", f=1)(vs))
    assert torch.isfinite(out).all()
    close(out[:4], [mean_of(d64(vs[:4]))] * 4)  # the four finite ones: each row is their mean


# ---- the breakdown property of the median ---------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 9), d=st.integers(1, 4), seed=st.integers(0, 2**16),
       big=st.floats(1.0, 1e30), sign=st.sampled_from([-1.0, 1.0]))
def test_attackers_move_the_median_by_a_bounded_amount(n, d, seed, big, sign):
    g = torch.Generator().manual_seed(seed)
    f = (n - 1) // 2
    honest = [torch.rand(d, generator=g) * 2 - 1 for _ in range(n - f)]  # in [-1, 1]^d
    attack = [sign * big * (torch.rand(d, generator=g) + 0.5) for _ in range(f)]
    for rule in (agg("median"), agg("trimmed-mean", f=f)):
        out = rule(honest + attack)
        assert (out.abs() <= 1.0).all(), out  # inside the honest box however large the attack


# ---- bounds and bad input: one line each ----------------------------------------------------------------
@pytest.mark.parametrize("spec, workers, match", [
    (dict(aggregate="trimmed-mean,f=2"), 4, r"aggregator trimmed-mean: f=2 with n=4 vectors breaks its bound n > 2f"),
    (dict(aggregate="krum,f=1"), 4, r"aggregator krum: f=1 with n=4 vectors breaks its bound n > 2f \+ 2"),
    (dict(aggregate="krum,f=1,m=5"), 5, r"aggregator krum m=5: f=1 with n=5 vectors breaks its bound m <= n - f"),
    (dict(aggregate="mda,f=3"), 6, r"aggregator mda: f=3 with n=6 .* n > 2f"),
    (dict(aggregate="mean", pre_aggregate="nnm,f=2"), 4, r"pre-aggregator nnm: f=2 with n=4 .* n > 2f"),
    (dict(aggregate="median", pre_aggregate="arc,f=3"), 5, r"pre-aggregator arc: f=3 with n=5"),
    # 8 workers in buckets of 2: krum sees 4 vectors
    (dict(aggregate="krum,f=1", pre_aggregate="bucketing,s=2"), 8, r"aggregator krum: f=1 with n=4 vectors"),
    (dict(aggregate="cclip,tau=-1"), 4, r"cclip tau=-1.0 is out of range; allowed: 0 < cclip tau"),
    (dict(aggregate="krun,f=1"), 4, r"unknown aggregator 'krun'. Did you mean 'krum'\?"),
    (dict(aggregate="median", pre_aggregate="nmm,f=1"), 4, r"unknown pre-aggregator 'nmm'. Did you mean 'nnm'\?"),
    (dict(aggregate="trimmed-mean,f=-1"), 4, r"trimmed-mean f=-1 is out of range"),
    (dict(aggregate="geomed,max_iter=0"), 4, r"geomed max_iter=0 is out of range"),
    (dict(aggregate="median", pre_aggregate="bucketing,s=0"), 4, r"bucketing s=0 is out of range"),
])
def test_bad_robust_specs_fail_in_one_line(spec, workers, match):
    cfg = Config(task="digits", strategy="ddp", workers=workers, steps=1, device="cpu", **spec)
    with pytest.raises(ConfigError, match=match) as err:
        cfg.spec()
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=match):  # the exchange built over a group checks the same
        exchange.ExchangeSpec(**spec).build(SimGroup(workers, NetworkModel()))


def test_canonical_spec_and_config_json_carry_the_pre_aggregation():
    spec = exchange.ExchangeSpec(aggregate="krum", pre_aggregate="nnm").canonical()
    assert (spec.aggregate, spec.pre_aggregate) == ("krum,f=1,m=1", "nnm,f=1")
    cfg = Config(task="digits", strategy="ddp", workers=5, steps=1, aggregate="krum", pre_aggregate="nnm,f=1")
    d = cfg.spec().to_dict()
    assert (d["aggregate"], d["pre_aggregate"]) == ("krum,f=1,m=1", "nnm,f=1")
    assert Config.from_dict(d).spec().exchange == cfg.spec().exchange


def test_pre_aggregate_in_a_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('strategy = "ddp"\nworkers = 7\naggregate = "krum,f=2"\npre_aggregate = "bucketing,s=1"\n')
    ex = Config.from_toml(path).spec().exchange
    assert (ex.aggregate, ex.pre_aggregate) == ("krum,f=2,m=1", "bucketing,s=1")
    path.write_text('strategy = "ddp"\nworkers = 7\naggregate = "krum,f=2"\npre_aggregate = "bucketing,s=2"\n')
    with pytest.raises(ConfigError, match="aggregator krum: f=2 with n=4 vectors"):  # ceil(7/2) buckets
        Config.from_toml(path).spec()


def test_list_aggregators_shows_the_pre_aggregators(capsys):
    from sgdlab.cli import main

    assert main(["list", "aggregators", "-v"]) == 0
    out = capsys.readouterr().out
    for name in ("median", "trimmed-mean", "krum", "geomed", "cclip", "mda", "pre-aggregators", "nnm",
                 "bucketing", "arc", "options: f=1, m=1", "options: tau=100.0, iters=1"):
        assert name in out, name


# ---- through the exchange and the runner ----------------------------------------------------------------
def test_cclip_centre_is_kept_per_stream_and_checkpointed():
    g = torch.Generator().manual_seed(8)
    spec = exchange.ExchangeSpec(aggregate="cclip,tau=0.3,iters=1")
    inputs = {(key, step): [torch.randn(4, generator=g) for _ in range(3)] for key in ("grad", "other")
              for step in (1, 2)}

    def rnd(ex, key, step):
        ts = [[v.clone()] for v in inputs[key, step]]
        ex.mean_(ts, key=key, step=step)
        return ts[0][0]

    a = spec.build(SimGroup(3, NetworkModel()))
    first = rnd(a, "grad", 1)
    rnd(a, "other", 1)
    close(first, ref_cclip(inputs["grad", 1], [0.0] * 4, 0.3, 1))
    state = a.state_dict()
    assert set(state["aggregator"]) == {"grad", "other"}
    b = spec.build(SimGroup(3, NetworkModel()))
    b.load_state_dict(state)
    want = rnd(a, "grad", 2)
    assert torch.equal(rnd(b, "grad", 2), want)   # the restored centre continues the run exactly
    close(want, ref_cclip(inputs["grad", 2], first.double().tolist(), 0.3, 1))


def test_ddp_with_a_robust_aggregator_trains(tmp_path):
    from sgdlab.metrics import read_metrics

    run(Config(task="digits", strategy="ddp", workers=3, optimizer="sgd", lr=0.5, steps=20, batch_size=16,
               eval_every=20, log_every=5, device="cpu", out=str(tmp_path), aggregate="median",
               pre_aggregate="nnm,f=1"))
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train_loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_run_with_cclip_resumes_bit_identically(tmp_path):
    base = Config(task="digits", strategy="ddp", workers=3, optimizer="sgd", lr=0.3, steps=8, batch_size=16,
                  eval_every=4, log_every=2, device="cpu", aggregate="cclip,tau=0.05,iters=2")
    run(base.replace(out=str(tmp_path / "full")))
    part = base.replace(out=str(tmp_path / "part"))
    assert run(part, stop_at=4).summary["status"] == "stopped"
    run(part, resume=True)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("full", "part"))
    assert "grad" in a["strategy"]["exchange"]["aggregator"]  # the centre is in the checkpoint
    ma, mb = a["workers"][0]["model"], b["workers"][0]["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


# ---- sim == torch: every rule in one torchrun launch ----------------------------------------------------
D_IN, D_OUT, STEPS, LR, WORLD = 6, 2, 4, 0.1, 3
TORCH_CASES = {  # name: (strategy, options, aggregate, pre_aggregate)
    "median": ("ddp", {}, "median", None),
    "trimmed-mean": ("ddp", {}, "trimmed-mean,f=1", None),
    "krum": ("ddp", {}, "krum,f=0", None),
    "multi-krum": ("ddp", {}, "krum,f=0,m=2", None),
    "geomed": ("ddp", {}, "geomed", None),
    "cclip": ("ddp", {}, "cclip,tau=0.05,iters=2", None),
    "mda": ("ddp", {}, "mda,f=1", None),
    "nnm-median": ("ddp", {}, "median", "nnm,f=1"),
    "bucketing-mean": ("ddp", {}, "mean", "bucketing,s=2"),
    "arc-trimmed": ("localsgd", {"sync_every": 2}, "trimmed-mean,f=1", "arc,f=1"),
    "monna": ("monna", {"f": 1}, "mean", None),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D_OUT)


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(8, D_IN, generator=g) for _ in range(STEPS)]
    return [(x, x[:, :D_OUT] * (1 + rank) - x[:, D_OUT:2 * D_OUT]) for x in xs]


def _step_loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _params(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _train_sim(name, opts, aggregate, pre_aggregate):
    from sgdlab import strategies
    from sgdlab.strategies import Worker

    group = SimGroup(WORLD, NetworkModel())
    spec = exchange.ExchangeSpec(aggregate=aggregate, pre_aggregate=pre_aggregate)
    strategy = strategies.create(name, group, dict(opts), exchange=spec, seed=3)
    workers = [Worker(r, m, torch.optim.SGD(m.parameters(), lr=LR, momentum=0.5))
               for r, m in ((r, _model()) for r in range(WORLD))]
    strategy.setup(workers)
    data = [_batches(r) for r in range(WORLD)]
    for step in range(1, STEPS + 1):
        for w in workers:
            _step_loss(w.model, data[w.rank][step - 1]).backward()
        strategy.after_backward(workers, step)
        for w in workers:
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
        strategy.after_step(workers, step)
    return workers, group


def _train_torch(name, opts, aggregate, pre_aggregate):
    import os

    from sgdlab.distributed import Distributed

    rank = int(os.environ["RANK"])
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    dd = Distributed(model, opt, name, aggregate=aggregate, pre_aggregate=pre_aggregate, seed=3, **opts)
    for batch in _batches(rank):
        _step_loss(model, batch).backward()
        dd.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": _params(model), "bytes": dd.bytes_sent}
    dd.close()
    return out


@pytest.mark.slow
def test_sim_equals_torch_backend_for_every_robust_rule(tmp_path):
    from .test_torch_backend import torchrun

    res = torchrun(WORLD, __file__, str(tmp_path / "out.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for case, spec in TORCH_CASES.items():
        workers, group = _train_sim(*spec)
        ref = _params(workers[0].model)
        assert torch.isfinite(ref).all()
        torch.testing.assert_close(got[case]["params"], ref, atol=1e-6, rtol=0, msg=case)
        assert got[case]["bytes"] == group.bytes_sent, case
    # the rules differ: not all the same model
    assert not torch.equal(got["median"]["params"], got["krum"]["params"])


if __name__ == "__main__":  # run by test_sim_equals_torch_backend_for_every_robust_rule under torchrun
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {case: _train_torch(*spec) for case, spec in TORCH_CASES.items()}
    if int(os.environ["RANK"]) == 0:
        torch.save(results, sys.argv[1])
    dist.destroy_process_group()
    os._exit(0)
