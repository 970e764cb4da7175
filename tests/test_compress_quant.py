"""The quantising and sign compressors (issue 13): qsgd, terngrad, signsgd, scaled_sign, onebit.

Oracles: a plain per-element implementation of each paper's rule (written here, drawing the same
uniforms), unbiasedness within 5σ of the estimator over many draws, QSGD's variance bound
(Alistarh et al. Lemma 3.1), exact majority votes, payload sizes computed by hand, and the simulator
against 2 gloo processes under torchrun.
"""

import math

import pytest
import torch

from sgdlab import exchange
from sgdlab.distributed import NetworkModel, SimGroup
from sgdlab.errors import ConfigError
from sgdlab.exchange import Exchange, Slot, _quant

try:
    from .test_exchange import _batches, _loss, _model, _step_all
except ImportError:  # run as a script under torchrun
    from test_exchange import _batches, _loss, _model, _step_all

NAMES = ("qsgd", "terngrad", "signsgd", "scaled_sign", "onebit")


def make(spec):
    compressor, _, _ = exchange.ExchangeSpec(spec).stages()
    return compressor


def shapes_slot(sizes, step=1, key="grad"):
    return Slot(key, step, 0, tuple(torch.Size([s]) for s in sizes))


# ---- bit packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 3, 7, 9, 1001):
        codes = torch.randint(0, 2 ** bits, (n,), generator=g)
        packed = _quant.pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(_quant.unpack(packed, bits, n), codes)
        # the torch-only path (CUDA tensors take it) writes and reads the same bytes
        assert torch.equal(_quant.pack(codes, bits, numpy=False), packed)
        assert torch.equal(_quant.unpack(packed, bits, n, numpy=False), codes)


# ---- QSGD ------------------------------------------------------------------------------------------
def qsgd_reference(x, s, d, u):
    """Alistarh et al.'s Q_s per bucket of d elements, element by element (float64), with uniforms u."""
    out = []
    for start in range(0, len(x), d):
        v = [float(t) for t in x[start:start + d]]
        norm = math.sqrt(sum(t * t for t in v))
        for i, t in enumerate(v):
            if norm == 0:
                out.append(0.0)
                continue
            r = abs(t) / norm * s
            level = math.floor(r) + (1 if float(u[start + i]) < r - math.floor(r) else 0)
            out.append(norm * math.copysign(1.0, t) * level / s)
    return torch.tensor(out, dtype=torch.float64)


def qsgd_variance(x, s, d):
    """The exact E‖Q_s(x) − x‖² = Σ_buckets Σ_i (‖v‖/s)² p_i(1 − p_i), p_i = frac(s|v_i|/‖v‖)."""
    total = 0.0
    for start in range(0, len(x), d):
        v = x[start:start + d].double()
        norm = v.norm()
        r = v.abs() / norm * s
        p = r - r.floor()
        total += float(((norm / s) ** 2 * p * (1 - p)).sum())
    return total


@pytest.mark.parametrize(("levels", "bucket"), [(1, 0), (3, 16), (7, 512), (16, 5)])
def test_qsgd_matches_the_paper_rule(levels, bucket):
    g = torch.Generator().manual_seed(levels)
    x = torch.randn(101, generator=g)
    x[7] = 0.0
    c = make(f"qsgd,levels={levels},bucket={bucket}")
    slot = Slot("grad", 5, 3)
    y = c.decode(c.encode(x, slot, rank=2), x.numel(), slot, rank=2)
    u = _quant.uniform(x.numel(), "qsgd", slot, 2, x.device)
    want = qsgd_reference(x, levels, bucket or x.numel(), u)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    assert y[7] == 0
    # each value is a multiple of its bucket's norm / s, and at most the norm
    d = bucket or x.numel()
    norms = torch.nn.functional.pad(x, (0, (-x.numel()) % d)).view(-1, d).norm(dim=1).repeat_interleave(d)[:101]
    k = y / norms * levels
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert (k.abs().round() <= levels).all()


def test_qsgd_is_unbiased_and_within_the_variance_bound():
    s, d, n, draws = 2, 16, 50, 2000
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, n)
    c = make(f"qsgd,levels={s},bucket={d}")
    ys = torch.stack([c.decode(c.encode(x, Slot("grad", t), 0), n, Slot("grad", t), 0) for t in range(draws)])
    ys = ys.double()
    # per element: Var = (‖v‖/s)² p(1−p); the mean of `draws` draws is within 5σ of x
    norms = torch.nn.functional.pad(x.double(), (0, (-n) % d)).view(-1, d).norm(dim=1).repeat_interleave(d)[:n]
    r = x.double().abs() / norms * s
    p = r - r.floor()
    sigma = (norms / s * (p * (1 - p)).sqrt()) / math.sqrt(draws)
    assert ((ys.mean(0) - x.double()).abs() <= 5 * sigma + 1e-6).all()
    # the variance: exact value ≤ the paper's bound per bucket; the empirical one matches the exact one
    exact = qsgd_variance(x, s, d)
    bound = sum(min(len(b) / s ** 2, math.sqrt(len(b)) / s) * float(b.double().norm() ** 2) for b in x.split(d))
    assert exact <= bound
    mse = ((ys - x.double()) ** 2).sum(1)
    assert abs(float(mse.mean()) - exact) <= 5 * float(mse.std()) / math.sqrt(draws)
    assert float(mse.mean()) <= bound


@pytest.mark.parametrize(("s", "d"), [(1, 64), (16, 64)])  # √d/s is the smaller term, then d/s²
def test_qsgd_variance_bound_on_one_bucket(s, d):
    x = torch.randn(d, generator=torch.Generator().manual_seed(s))
    c = make(f"qsgd,levels={s},bucket=0")
    mse = torch.stack([((c.decode(c.encode(x, Slot("g", t)), d, Slot("g", t)) - x) ** 2).sum()
                       for t in range(400)]).double()
    bound = min(d / s ** 2, math.sqrt(d) / s) * float(x.double().norm() ** 2)
    assert qsgd_variance(x, s, d) <= bound
    assert float(mse.mean()) <= bound


@pytest.mark.parametrize(("levels", "bucket", "n", "want"), [
    (1, 512, 1001, math.ceil(1001 * 2 / 8) + 4 * 2),     # 3 values → 2 bits; 2 buckets (512 + 489)
    (2, 512, 1001, math.ceil(1001 * 3 / 8) + 4 * 2),     # 5 values → 3 bits: 376 bytes (3003 bits, padded)
    (7, 512, 1001, math.ceil(1001 * 4 / 8) + 4 * 2),     # 15 values → 4 bits: 501 bytes
    (7, 0, 1001, 501 + 4),                               # one bucket: one norm
    (8, 100, 7, math.ceil(7 * 5 / 8) + 4),               # 17 values → 5 bits: 35 bits → 5 bytes
    (127, 10, 13, 13 + 4 * 2),                           # 255 values → 8 bits
    (128, 10, 13, math.ceil(13 * 9 / 8) + 4 * 2),        # 257 values → 9 bits: 117 bits → 15 bytes
])
def test_qsgd_bytes_by_hand(levels, bucket, n, want):
    c = make(f"qsgd,levels={levels},bucket={bucket}")
    payload = c.encode(torch.randn(n))
    assert c.payload_bytes(payload) == want == c.nbytes(n)
    assert [t.dtype for t in payload] == [torch.uint8, torch.float32]


# ---- TernGrad --------------------------------------------------------------------------------------
def terngrad_reference(x, sizes, clip, u):
    """Wen et al.: per tensor, clip at clip·σ, s = max|g|, g̃ = s·sign(g)·Bernoulli(|g|/s) (float64)."""
    out, scales, start = [], [], 0
    for size in sizes:
        g = [float(t) for t in x[start:start + size]]
        mean = sum(g) / size
        sigma = math.sqrt(sum((t - mean) ** 2 for t in g) / size)
        if clip and sigma > 0:
            g = [max(-clip * sigma, min(clip * sigma, t)) for t in g]
        s = max(abs(t) for t in g)
        scales.append(s)
        for i, t in enumerate(g):
            keep = s > 0 and float(u[start + i]) < abs(t) / s
            out.append(s * math.copysign(1.0, t) if keep else 0.0)
        start += size
    return torch.tensor(out, dtype=torch.float64), scales


def test_terngrad_matches_the_paper_rule():
    g = torch.Generator().manual_seed(0)
    sizes = [40, 1, 23]
    x = torch.randn(sum(sizes), generator=g)
    x[3] = 9.0  # an outlier the 2.5σ clip cuts
    slot = shapes_slot(sizes, step=4)
    c = make("terngrad,share=false")
    payload = c.encode(x, slot, rank=1)
    y = c.decode(payload, x.numel(), slot, rank=1)
    want, scales = terngrad_reference(x, sizes, 2.5, _quant.uniform(x.numel(), "terngrad", slot, 1, x.device))
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(payload[1].double(), torch.tensor(scales, dtype=torch.float64), rtol=1e-6, atol=0)
    assert scales[0] < 9.0 and scales[1] == abs(float(x[40]))  # clipped; a 1-element tensor (σ = 0) is not


@pytest.mark.parametrize("clip", [0.0, 2.5])
def test_terngrad_is_unbiased_for_the_clipped_vector_with_scalar_sharing(clip):
    n_workers, sizes, draws = 3, [20, 9], 600
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(sum(sizes), generator=g) * (1 + r) for r in range(n_workers)]
    xs[0][0] = 12.0
    c = make(f"terngrad,clip={clip}")
    clipped = [c.clipped(x, sizes).double() for x in xs]
    if clip == 0:
        assert all(torch.equal(a, x.double()) for a, x in zip(clipped, xs, strict=True))
    else:
        assert clipped[0][0] < 12.0
    group = SimGroup(n_workers, NetworkModel())
    ex = Exchange(group, c)
    total = torch.zeros(sum(sizes), dtype=torch.float64)
    shared = torch.stack([torch.stack([a.abs().max() for a in cl.split(sizes)]) for cl in clipped]).amax(0)
    for t in range(draws):
        per_worker = [[x[:20].clone().view(4, 5), x[20:].clone()] for x in xs]
        ex.mean_(per_worker, key="grad", step=t)
        got = torch.cat([per_worker[0][0].reshape(-1), per_worker[0][1]]).double()
        if t == 0:  # every worker's values are in {−S, 0, S} with S the max of the workers' scales
            decoded = [torch.cat([per_worker[r][0].reshape(-1), per_worker[r][1]]) for r in range(n_workers)]
            assert all(torch.equal(d, decoded[0]) for d in decoded)
            levels = got * n_workers / shared.repeat_interleave(torch.tensor(sizes))
            torch.testing.assert_close(levels, levels.round(), atol=1e-5, rtol=0)
        total += got
    S = shared.repeat_interleave(torch.tensor(sizes))
    target = torch.stack(clipped).mean(0)
    var = sum((S ** 2) * (a.abs() / S) * (1 - a.abs() / S) for a in clipped) / n_workers ** 2
    assert ((total / draws - target).abs() <= 5 * (var / draws).sqrt() + 1e-6).all()
    # bytes: the scales (4 per tensor) all-gathered, then the 2-bit codes all-gathered
    assert group.bytes_sent == draws * (n_workers - 1) * (4 * len(sizes) + math.ceil(sum(sizes) / 4))


def test_terngrad_bytes_by_hand():
    c = make("terngrad,share=false")
    for sizes in ([1001], [1000, 1], [3, 4, 6]):
        n = sum(sizes)
        payload = c.encode(torch.randn(n), shapes_slot(sizes))
        assert c.payload_bytes(payload) == math.ceil(n / 4) + 4 * len(sizes) == c.nbytes(n, len(sizes))


# ---- signSGD, scaled sign, 1-bit -------------------------------------------------------------------
def sign1(x):
    """One bit per element: +1 for x >= 0, −1 below."""
    return torch.where(x >= 0, 1.0, -1.0)


@pytest.mark.parametrize("n_workers", [2, 3, 4, 5])
@pytest.mark.parametrize("vote", ["majority", "mean"])
def test_signsgd_vote_is_the_sign_of_the_sum_of_signs(n_workers, vote):
    g = torch.Generator().manual_seed(n_workers)
    n = 37
    xs = [torch.randn(n, generator=g) for _ in range(n_workers)]
    xs[0][:3] = 0.0  # a zero is sent as +1
    group = SimGroup(n_workers, NetworkModel())
    ex = Exchange(group, make(f"signsgd,vote={vote}"))
    per_worker = [[x.clone()] for x in xs]
    ex.mean_(per_worker, key="grad", step=1)
    votes = torch.stack([sign1(x) for x in xs]).sum(0)
    want = torch.sign(votes) if vote == "majority" else votes / n_workers
    assert all(torch.equal(p[0], want) for p in per_worker)
    if n_workers % 2 == 0 and vote == "majority":
        assert (votes == 0).any() and (want == 0).sum() == (votes == 0).sum()  # ties → 0
    assert group.bytes_sent == (n_workers - 1) * math.ceil(n / 8)


def test_scaled_sign_is_l1_over_d_times_sign_per_tensor():
    sizes = [7, 1, 12]
    x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(3))
    x[2] = 0.0
    for layerwise, segs in ((True, sizes), (False, [sum(sizes)])):
        c = make(f"scaled_sign,layerwise={'true' if layerwise else 'false'}")
        slot = shapes_slot(sizes)
        payload = c.encode(x, slot)
        y = c.decode(payload, x.numel(), slot)
        want = torch.cat([a.abs().sum() / a.numel() * sign1(a) for a in x.split(segs)])
        torch.testing.assert_close(y, want, rtol=1e-6, atol=0)
        assert c.payload_bytes(payload) == math.ceil(20 / 8) + 4 * len(segs) == c.nbytes(20, len(segs))


def test_onebit_decodes_to_the_per_sign_means():
    sizes = [9, 1, 5, 4]
    x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(4))
    x[10:15] = x[10:15].abs()  # a tensor with no negative entry
    x[0] = 0.0
    c = make("onebit")
    slot = shapes_slot(sizes)
    payload = c.encode(x, slot)
    y = c.decode(payload, x.numel(), slot)
    want = []
    for a in x.split(sizes):
        pos = [float(t) for t in a if t >= 0]
        neg = [float(t) for t in a if t < 0]
        mp, mn = (sum(pos) / len(pos) if pos else 0.0), (sum(neg) / len(neg) if neg else 0.0)
        want += [mp if t >= 0 else mn for t in a]
    torch.testing.assert_close(y.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert c.payload_bytes(payload) == math.ceil(19 / 8) + 8 * len(sizes) == c.nbytes(19, len(sizes))
    # the per-sign means preserve each tensor's sum
    torch.testing.assert_close(y.sum(), x.sum(), rtol=1e-5, atol=1e-5)


# ---- option checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "match"), [
    ("qsgd,levels=0", r"^levels=0: qsgd's levels must be an integer in 1\.\.32767$"),
    ("qsgd,levels=-3", r"^levels=-3: qsgd's levels must be an integer in 1\.\.32767$"),
    ("qsgd,levels=40000", r"^levels=40000: qsgd's levels must be an integer in 1\.\.32767$"),
    ("qsgd,levels=1.5", r"levels must be int, got 1\.5"),
    ("qsgd,bucket=-1", r"^bucket=-1: qsgd's bucket must be an integer >= 1"),
    ("signsgd,vote=unanimous", r"^vote='unanimous': signsgd's vote must be one of: majority, mean$"),
    ("terngrad,clip=-1", r"^clip=-1\.0: terngrad's clip must be a finite number >= 0"),
    ("terngrad,clip=nan", r"^clip=nan: terngrad's clip must be a finite number >= 0"),
    ("onebit,levels=2", r"unknown compressor 'onebit' key 'levels'"),
])
def test_bad_options_end_in_one_line(spec, match):
    with pytest.raises(ConfigError, match=match) as err:
        exchange.ExchangeSpec(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_canonical_form_parses_to_itself(name):
    spec = exchange.ExchangeSpec(name).canonical()
    assert spec.canonical() == spec and not spec.lossless


# ---- through the strategies: loss goes down; sim == torch ------------------------------------------
W, STEPS, LR = 2, 4, 0.1
CASES = {  # name: (strategy, options, compress, lr)
    "ddp-qsgd": ("ddp", {}, "qsgd,levels=4,bucket=4", LR),
    "ddp-terngrad": ("ddp", {}, "terngrad", LR),
    "ddp-terngrad-noshare": ("ddp", {}, "terngrad,share=false,clip=0", LR),
    "ddp-signsgd": ("ddp", {}, "signsgd", 0.1),
    "ddp-signsgd-mean": ("ddp", {}, "signsgd,vote=mean", 0.1),
    "ddp-scaled_sign": ("ddp", {}, "scaled_sign", LR),
    "ddp-onebit": ("ddp", {}, "onebit", LR),
    "diloco-qsgd": ("diloco", {"sync_every": 2, "outer_lr": 0.5, "outer_args": {}}, "qsgd,levels=2", LR),
    "localsgd-terngrad": ("localsgd", {"sync_every": 2}, "terngrad", LR),
}
if "ef" in exchange.feedback:  # the residual memory (another file of issue 13): the sign methods' usual partner
    CASES.update({"ddp-scaled_sign-ef": ("ddp", {}, "scaled_sign,feedback=ef", LR),
                  "ddp-onebit-ef": ("ddp", {}, "onebit,feedback=ef", LR)})
# bytes per worker over the 4 steps of _batches, by hand: Linear(5, 1) = a (1, 5) weight and a bias, 6 values
BYTES = {  # per round × rounds; W − 1 = 1 peer in every all-gather
    "ddp-qsgd": (3 + 4 * 2) * 4,            # 9 values → 4 bits × 6 = 3 bytes; buckets of 4 → 2 norms
    "ddp-terngrad": (4 * 2 + 2) * 4,        # 2 scales gathered, then ⌈6/4⌉ = 2 bytes of 2-bit codes
    "ddp-terngrad-noshare": (2 + 4 * 2) * 4,
    "ddp-signsgd": 1 * 4, "ddp-signsgd-mean": 1 * 4,
    "ddp-scaled_sign": (1 + 4 * 2) * 4, "ddp-scaled_sign-ef": (1 + 4 * 2) * 4,
    "ddp-onebit": (1 + 8 * 2) * 4, "ddp-onebit-ef": (1 + 8 * 2) * 4,
    "diloco-qsgd": (3 + 4) * 2,             # 5 values → 3 bits × 6 = 18 bits → 3 bytes; one norm; 2 rounds
    "localsgd-terngrad": (4 * 2 + 2) * 2,
}


def _train_sim(case, steps=STEPS, toy=False):
    from sgdlab import strategies
    from sgdlab.strategies import Worker

    name, opts, compress, lr = CASES[case]
    group = SimGroup(W, NetworkModel())
    strategy = strategies.create(name, group, opts, exchange=exchange.ExchangeSpec(compress))
    workers = []
    for r in range(W):
        m = _model()
        workers.append(Worker(r, m, torch.optim.SGD(m.parameters(), lr=lr)))
    strategy.setup(workers)
    for step in range(1, steps + 1):
        (_step_toy if toy else _step_all)(strategy, workers, step)
    return workers, group


def _toy_batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 5, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 0.5


def _step_toy(strategy, workers, step):
    for w in workers:
        _loss(w.model, _toy_batch(w.rank, step)).backward()
    strategy.after_backward(workers, step)
    for w in workers:
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
    strategy.after_step(workers, step)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("ddp")])
def test_short_ddp_run_reduces_the_loss(case):
    test = _toy_batch(99, 0)
    before = float(_loss(_model(), test).detach())
    workers, _ = _train_sim(case, steps=60, toy=True)
    after = float(_loss(workers[0].model, test).detach())
    assert after < 0.2 * before, (before, after)


def test_torch_backend_matches_the_simulator(tmp_path):
    from .test_torch_backend import torchrun

    res = torchrun(W, __file__, str(tmp_path / "out.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for case in CASES:
        workers, group = _train_sim(case)
        sim = torch.nn.utils.parameters_to_vector(workers[0].model.parameters()).detach()
        torch.testing.assert_close(got[case]["params"], sim, atol=1e-6, rtol=0, msg=case)
        assert got[case]["bytes"] == group.bytes_sent == BYTES[case], case


def _train_torch(case):
    import os

    from sgdlab.distributed import Distributed

    name, opts, compress, lr = CASES[case]
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dd = Distributed(model, opt, name, compress=compress, **opts)
    for batch in _batches(int(os.environ["RANK"])):
        _loss(model, batch).backward()
        dd.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(), "bytes": dd.bytes_sent}
    dd.close()
    return out


if __name__ == "__main__":  # run by test_torch_backend_matches_the_simulator under torchrun
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {case: _train_torch(case) for case in CASES}
    if int(os.environ["RANK"]) == 0:
        torch.save(results, sys.argv[1])
    dist.destroy_process_group()
    os._exit(0)
