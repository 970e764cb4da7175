"""Sparsifiers (``topk``, ``randk``, ``dgc``) against plain references of their rules: the kept set, the
payload bytes by hand, unbiasedness of random-k, DGC's Algorithm (momentum correction + masking + clipping
+ warm-up), ratio 1 = uncompressed, option errors, sim == torch (2 and 3 gloo processes), exact resume."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch

from sgdlab import exchange
from sgdlab.errors import ConfigError
from sgdlab.exchange.base import Slot

D_IN, D_OUT, STEPS, LR, H, WORLD = 12, 3, 6, 0.1, 2, 2   # model: weight 36 + bias 3 = 39 entries
SHAPES = (torch.Size([D_OUT, D_IN]), torch.Size([D_OUT]))
NP = D_IN * D_OUT + D_OUT


class _ToyEF(exchange.Feedback):
    """EF written here (e ← x + e − decoded), to give top-k a per-worker state to checkpoint."""

    name = "sparse-toy-ef"

    def message(self, x, memory):
        return x + memory["e"] if "e" in memory else x

    def sent(self, message, decoded, memory):
        memory["e"] = message - decoded


if _ToyEF.name not in exchange.feedback:
    exchange.feedback.register(_ToyEF.name, _ToyEF, _ToyEF.__doc__)


# ---- plain references ---------------------------------------------------------------------------------
def ref_k(ratio, n):
    return math.ceil(Fraction(str(ratio)) * n)


def ref_top(values, k):
    """The k indices of largest |value|, ties to the lower index: a plain sort."""
    return sorted(sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))[:k])


def ref_bytes(n, k):
    return 4 * k + min(4 * k, math.ceil(n / 8))


def test_topk_keeps_exactly_the_k_largest_magnitudes_ties_to_the_lower_index():
    c = exchange.compressors.get("topk")
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(n, generator=g) for n in (1, 7, 33, 100, 257)]
    vectors += [torch.randint(-3, 4, (200,), generator=g).float(),      # many ties
                torch.ones(50), torch.zeros(9), torch.tensor([2.0, -2.0, 1.0, -2.0, 2.0])]
    for x in vectors:
        for ratio in (0.001, 0.07, 0.1, 0.5, 0.9, 1.0):
            comp = c(c.Options(ratio=ratio))
            k = ref_k(ratio, x.numel())
            payload = comp.encode(x)
            y = comp.decode(payload, x.numel())
            keep = ref_top(x.tolist(), k)
            want = torch.zeros_like(x)
            want[keep] = x[keep]
            assert torch.equal(y, want), (x.numel(), ratio)
            assert payload[0].numel() == k and torch.equal(payload[0], x[keep])
            assert comp.payload_bytes(payload) == ref_bytes(x.numel(), k) == comp.nbytes(x.numel())
    # the tie example by hand: k=3 of [2, -2, 1, -2, 2] keeps indices 0, 1, 3
    comp = c(c.Options(ratio=0.6))
    assert torch.equal(comp.decode(comp.encode(vectors[-1]), 5), torch.tensor([2.0, -2.0, 0, -2.0, 0]))


def test_sampled_threshold_selects_the_same_set_as_the_exact_top_k():
    from sgdlab.exchange.topk import _exact_top, top_indices

    n = 300_000  # above the size where a strided sample gives a candidate threshold
    g = torch.Generator().manual_seed(2)
    stride = n // (1 << 16)
    spikes = torch.zeros(n)
    spikes[1::stride] = 1.0  # every large value between the sampled positions: the sample misses them all
    sampled = torch.zeros(n)
    sampled[::stride] = torch.rand(sampled[::stride].numel(), generator=g) + 1  # too few candidates: fallback
    for a in (torch.randn(n, generator=g).abs(), torch.randint(0, 5, (n,), generator=g).float(), spikes, sampled,
              torch.rand(n, generator=g) * torch.logspace(-6, 0, n)):
        for k in (1, 37, 3000, n // 9):
            got = top_indices(a, k)
            assert torch.equal(got, _exact_top(a, k))
            assert got.numel() == k and (a[got].min() >= a[torch.ones(n, dtype=torch.bool).index_fill_(
                0, got, False)].max())


def test_nan_magnitudes_still_give_k_entries():
    from sgdlab.exchange.topk import top_indices

    for n in (10, 300_000):
        a = torch.arange(n, dtype=torch.float32)
        a[3] = float("nan")
        got = top_indices(a, 4)
        assert got.numel() == 4   # the same payload shape on every worker, whatever the NaNs


def test_k_is_ceil_of_the_decimal_ratio():
    from sgdlab.exchange.topk import num_kept

    assert 0.07 * 100 > 7  # the float product would give k = 8
    assert [num_kept(r, n) for r, n in [(0.07, 100), (0.001, 1), (0.001, 1001), (1.0, 5), (0.5, 3), (0.3, 10)]] \
        == [7, 1, 2, 5, 2, 3]


@pytest.mark.parametrize(("n", "ratio", "k", "bitmap"), [
    (320, 0.028125, 9, False),   # indices 36 < bitmap 40
    (320, 0.03125, 10, False),   # 40 == 40: indices on a tie
    (320, 0.034375, 11, True),   # bitmap 40 < indices 44
    (321, 0.0342, 11, True),     # bitmap ceil(321/8) = 41 < 44
    (10, 1.0, 10, True),         # ratio 1: a 2-byte bitmap
    (1, 0.5, 1, True),           # one entry: a 1-byte bitmap < one 4-byte index
    (64, 0.03, 2, False),        # indices 8 == bitmap 8
])
def test_payload_bytes_by_hand_on_both_sides_of_the_index_bitmap_crossover(n, ratio, k, bitmap):
    topk = exchange.compressors.get("topk")
    comp = topk(topk.Options(ratio=ratio))
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + k))
    values, where = comp.encode(x)
    assert values.dtype == torch.float32 and values.numel() == k == ref_k(ratio, n)
    if bitmap:
        assert where.dtype == torch.uint8 and where.numel() == (n + 7) // 8
    else:
        assert where.dtype == torch.int32 and where.numel() == k
    want = 4 * k + ((n + 7) // 8 if bitmap else 4 * k)
    assert comp.payload_bytes([values, where]) == want
    keep = ref_top(x.tolist(), k)
    assert torch.equal(comp.decode([values, where], n)[keep], x[keep])


@pytest.mark.parametrize("ratio", [0.25, 0.5])  # k <= n/4: distinct draws from a stream; else a permutation
def test_randk_is_unbiased_within_five_sigma_and_every_worker_draws_the_same_indices(ratio):
    n, draws = 40, 3000
    k = ref_k(ratio, n)
    randk = exchange.compressors.get("randk")
    c = randk(randk.Options(ratio=ratio))
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)) + 0.5
    total, chosen = torch.zeros(n, dtype=torch.float64), torch.zeros(n)
    for step in range(draws):
        slot = Slot("grad", step, seed=7)
        p0, p1 = c.encode(x, slot, 0), c.encode(2 * x, slot, 1)
        assert p0[0].numel() == k and c.payload_bytes(p0) == 4 * k
        y0, y1 = c.decode(p0, n, slot, 0), c.decode(p1, n, slot, 1)
        assert torch.equal(y0 != 0, y1 != 0)                       # the same support on every worker
        assert torch.equal(c.decode([p0[0] + p1[0]], n, slot, -1), y0 + y1)   # payloads add up
        total += y0.double()
        chosen += (y0 != 0).float()
    # E[C(x)] = x; Var C(x)_i = (n/k − 1) x_i²: the mean of `draws` draws is within 5 σ/√draws
    sigma = x.double().abs() * math.sqrt((n / k - 1) / draws)
    assert ((total / draws - x.double()).abs() <= 5 * sigma).all()
    p = k / n  # each index is chosen with probability k/n
    assert ((chosen - draws * p).abs() <= 5 * math.sqrt(draws * p * (1 - p))).all()
    # a different stream, step or run seed draws another subset; the same ones the same subset
    def support(s):
        return c.decode(c.encode(x, s), n, s) != 0
    assert torch.equal(support(Slot("grad", 3, seed=7)), support(Slot("grad", 3, seed=7)))
    assert not torch.equal(support(Slot("grad", 3, seed=7)), support(Slot("delta", 3, seed=7)))
    assert not torch.equal(support(Slot("grad", 3, seed=7)), support(Slot("grad", 3, seed=8)))
    # unbiased=false: the plain (contractive) random-k sends x_i itself
    plain = randk(randk.Options(ratio=ratio, unbiased=False))
    s = Slot("grad", 3, seed=7)
    y = plain.decode(plain.encode(x, s), n, s)
    assert torch.equal(y, torch.where(support(s), x, torch.zeros_like(x)))


def test_randk_stream_that_is_too_short_is_extended(monkeypatch):
    from sgdlab.exchange import randk

    want = randk.shared_indices(1000, 200, 1, "grad", 5)
    monkeypatch.setattr(randk, "DRAW_MARGIN", 0.01)   # the first draws hold far fewer than k distinct values
    got = randk.shared_indices(1000, 200, 1, "grad", 5)
    assert torch.equal(got, want)  # the first k distinct values of one stream: the margin changes nothing


# ---- training: ddp / localsgd / diloco on the simulator, and under torchrun ----------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D_OUT)


def _batches(rank, steps=STEPS):
    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(8, D_IN, generator=g) for _ in range(steps)]
    return [(x, x[:, :D_OUT] * (1 + rank) - x[:, D_OUT:2 * D_OUT]) for x in xs]


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _sgd(model, momentum=0.0):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)


def _strategy(name, opts, compress, world, seed=3):
    from sgdlab import strategies
    from sgdlab.distributed import NetworkModel, SimGroup

    group = SimGroup(world, NetworkModel())
    return strategies.create(name, group, dict(opts), exchange=exchange.ExchangeSpec(compress), seed=seed), group


def _train_sim(name, opts, compress, world=WORLD, steps=STEPS, momentum=0.0, stop=None, state=None):
    """Train ``steps`` steps (from ``state`` when given: a step and a checkpoint); returns the strategy,
    workers and group, and a checkpoint taken after step ``stop``."""
    from sgdlab.strategies import Worker

    strategy, group = _strategy(name, opts, compress, world)
    workers = [Worker(r, m, _sgd(m, momentum)) for r, m in ((r, _model()) for r in range(world))]
    strategy.setup(workers)
    first, saved = 1, None
    if state is not None:
        first, ck = state
        ck = torch.load(io.BytesIO(ck), weights_only=True)
        strategy.load_state_dict(ck["strategy"])
        for w, s in zip(workers, ck["workers"], strict=True):
            w.model.load_state_dict(s["model"])
            w.optimizer.load_state_dict(s["opt"])
    for step in range(first, steps + 1):
        for w in workers:
            _loss(w.model, _batches(w.rank, steps)[step - 1]).backward()
        strategy.after_backward(workers, step)
        for w in workers:
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
        strategy.after_step(workers, step)
        if step == stop:
            buf = io.BytesIO()
            torch.save({"strategy": strategy.state_dict(), "workers": [
                {"model": w.model.state_dict(), "opt": w.optimizer.state_dict()} for w in workers]}, buf)
            saved = (step + 1, buf.getvalue())
    return strategy, workers, group, saved


def _params(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


@pytest.mark.parametrize("compress", ["topk,ratio=1", "randk,ratio=1", "randk,ratio=1,unbiased=false",
                                      "dgc,ratio=1,momentum=0"])
@pytest.mark.parametrize("name", ["ddp", "localsgd", "diloco"])
def test_ratio_one_equals_uncompressed_training_bit_for_bit(name, compress):
    opts = {} if name == "ddp" else {"sync_every": H, **({"outer_lr": 0.5, "outer_args": {}} if name == "diloco"
                                                        else {})}
    _, ref, _, _ = _train_sim(name, opts, "fp32", world=3)
    _, got, group, _ = _train_sim(name, opts, compress, world=3)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(_params(a.model), _params(b.model))
    rounds = STEPS if name == "ddp" else STEPS // H
    payload = 4 * NP if compress.startswith("randk") else ref_bytes(NP, NP)   # randk: values only, all-reduced
    per_round = 2 * 2 / 3 * payload if compress.startswith("randk") else 2 * payload
    assert group.bytes_sent == pytest.approx(rounds * per_round, rel=1e-12)


def test_dgc_at_ratio_one_without_masking_is_momentum_sgd_on_the_mean_gradient():
    """Momentum correction replaces the optimizer's momentum: DGC(m) + inner SGD(0) == fp32 + SGD(m)."""
    _, ref, _, _ = _train_sim("ddp", {}, "fp32", momentum=0.9)
    _, got, _, _ = _train_sim("ddp", {}, "dgc,ratio=1,momentum=0.9,masking=false")
    torch.testing.assert_close(_params(got[0].model), _params(ref[0].model), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("compress", ["topk,ratio=0.2", "randk,ratio=0.3", "dgc,ratio=0.2,momentum=0.5"])
def test_streaming_diloco_fragments_are_sparsified_per_stream(compress):
    opts = {"sync_every": 2 * H, "outer_lr": 0.5, "outer_args": {}, "fragments": 2, "overlap": 1}
    strategy, workers, group, _ = _train_sim("streaming-diloco", opts, compress, world=3)
    assert all(torch.isfinite(_params(w.model)).all() for w in workers) and group.bytes_sent > 0
    if compress.startswith("dgc"):  # a velocity and an accumulation per fragment stream and worker
        assert sorted(strategy.exchange.memory) == [f"fragment{p}/{r}" for p in range(2) for r in range(3)]


PAPER_WARMUP_SPARSITY = [0.75, 0.9375, 0.984375, 0.99609375]  # the paper's four warm-up epochs, then the target


def ref_dgc_ratio(step, ratio, warmup):
    if warmup and step - 1 < warmup:
        return max(ratio, 1 - PAPER_WARMUP_SPARSITY[(step - 1) * 4 // warmup])
    return ratio


def ref_dgc_training(world, steps, ratio, momentum=0.9, masking=True, nesterov=False, clip=0.0, warmup=0,
                     per_tensor=True):
    """DGC's Algorithm written out in the paper's own terms (Lin et al. 2018, Alg. 1 with momentum
    correction, momentum factor masking, local clipping and warm-up): node k's share of the batch gradient
    is G_k = g_k / N, clipped at clip·N^(-1/2), accumulated, sparsified with a threshold per layer, and the
    update is w ← w − lr · Σ_k G̃_k. Per worker over flat vectors. Returns (w, bytes per worker)."""
    models = [_model() for _ in range(world)]
    w = torch.nn.utils.parameters_to_vector(models[0].parameters()).detach().clone()
    sizes = [math.prod(s) for s in SHAPES] if per_tensor else [NP]
    u = [torch.zeros(NP) for _ in range(world)]
    v = [torch.zeros(NP) for _ in range(world)]
    sent_bytes = 0
    for step in range(1, steps + 1):
        r_t = ref_dgc_ratio(step, ratio, warmup)
        total = torch.zeros(NP)
        for k, m in enumerate(models):
            torch.nn.utils.vector_to_parameters(w.clone(), m.parameters())
            m.zero_grad()
            _loss(m, _batches(k, steps)[step - 1]).backward()
            g = torch.cat([p.grad.reshape(-1) for p in m.parameters()]) / world   # G_k: a share of the sum
            if clip:
                threshold = clip / math.sqrt(world)
                norm = math.sqrt(sum(float(t) ** 2 for t in g))
                if norm > threshold:
                    g = g * (threshold / norm)
            if nesterov:
                u[k] = (u[k] + g) * momentum
                v[k] = v[k] + u[k] + g
            else:
                u[k] = u[k] * momentum + g
                v[k] = v[k] + u[k]
            keep, off = [], 0
            for size in sizes:  # the threshold of each layer
                keep += [off + i for i in ref_top(v[k][off:off + size].tolist(), ref_k(r_t, size))]
                off += size
            total[keep] += v[k][keep]   # G̃_k, summed over nodes
            v[k][keep] = 0              # v ← v ⊙ ¬mask
            if masking:
                u[k][keep] = 0          # u ← u ⊙ ¬mask
        sent_bytes += (world - 1) * ref_bytes(NP, len(keep))
        w = w - LR * total
    return w, sent_bytes


DGC_CASES = {  # spec: reference keyword arguments
    "dgc,ratio=0.1": dict(ratio=0.1),
    "dgc,ratio=0.05,masking=false": dict(ratio=0.05, masking=False),
    "dgc,ratio=0.1,nesterov=true,per_tensor=false": dict(ratio=0.1, nesterov=True, per_tensor=False),
    "dgc,ratio=0.02,clip=0.5,warmup_steps=4,momentum=0.8": dict(ratio=0.02, clip=0.5, warmup=4, momentum=0.8),
}


@pytest.mark.parametrize("spec", sorted(DGC_CASES))
def test_dgc_matches_the_papers_algorithm(spec):
    want, want_bytes = ref_dgc_training(3, STEPS, **DGC_CASES[spec])
    strategy, workers, group, _ = _train_sim("ddp", {}, spec, world=3)
    for w in workers:
        torch.testing.assert_close(_params(w.model), want, atol=1e-6, rtol=1e-6)
    assert group.bytes_sent == want_bytes
    mem = strategy.exchange.memory
    assert sorted(mem) == [f"grad/{r}" for r in range(3)] and all(sorted(m) == ["dgc.u", "dgc.v"] for m in mem.values())


def test_dgc_warmup_follows_the_papers_sparsities_and_counts_bytes():
    dgc = exchange.compressors.get("dgc")
    c = dgc(dgc.Options(ratio=0.001, warmup_steps=8))
    assert [c.ratio_at(s) for s in range(1, 11)] == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625,
                                                     0.00390625, 0.00390625, 0.001, 0.001]
    assert dgc(dgc.Options(ratio=0.01, warmup_steps=4)).ratio_at(4) == 0.01      # never sparser than the target
    n = 4000
    for step, k in [(1, 1000), (3, 250), (5, 63), (7, 16), (9, 4)]:
        slot = Slot("grad", step, shapes=(torch.Size([n]),))
        payload = c.encode(torch.randn(n), slot, memory={})
        assert payload[0].numel() == k == c.kept(n, slot)
        assert c.payload_bytes(payload) == 4 * k + min(4 * k, n // 8) == c.nbytes(n, slot)


@pytest.mark.parametrize(("compress", "match"), [
    ("topk,ratio=0", r"^ratio=0\.0: the fraction of entries kept must be in \(0, 1\]"),
    ("topk,ratio=1.5", r"^ratio=1\.5: .* must be in \(0, 1\]"),
    ("randk,ratio=-0.1", r"^ratio=-0\.1: .* must be in \(0, 1\]"),
    ("randk,ratio=nan", r"^ratio=nan: .* must be in \(0, 1\]"),
    ("dgc,ratio=2", r"^ratio=2\.0: .* must be in \(0, 1\]"),
    ("dgc,momentum=1", r"^momentum=1\.0: the DGC momentum must be in \[0, 1\)"),
    ("dgc,clip=-1", r"^clip=-1\.0: the clipping threshold must be a finite number >= 0"),
    ("dgc,warmup_steps=-2", r"^warmup_steps=-2: must be an integer >= 0"),
    ("topk,ratio=true", r"ratio must be float, got True"),
    ("dgc,feedback=sparse-toy-ef", r"feedback=sparse-toy-ef does not apply; dgc keeps what it did not send"),
    ("randk,ratio=0.1,feedback=ef", r"feedback=ef does not apply; randk with unbiased=true scales .* use "
                                    r"randk,unbiased=false with feedback"),
])
def test_bad_sparsifier_options_end_in_one_line(compress, match):
    with pytest.raises(ConfigError, match=match) as info:
        exchange.ExchangeSpec(compress)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("compress", "stop"), [("dgc,ratio=0.05,warmup_steps=4,clip=1", 3),
                                                 ("topk,ratio=0.1,feedback=sparse-toy-ef", 2)])
def test_sparsifier_state_resumes_bit_identically(compress, stop):
    name = "ddp" if compress.startswith("dgc") else "diloco"
    opts = {} if name == "ddp" else {"sync_every": H, "outer_lr": 0.5, "outer_args": {}}
    strategy, whole, _, saved = _train_sim(name, opts, compress, world=3, stop=stop)
    assert all(t.abs().sum() > 0 for m in strategy.exchange.memory.values() for t in m.values())
    strategy2, parts, _, _ = _train_sim(name, opts, compress, world=3, state=saved)
    for a, b in zip(whole, parts, strict=True):
        assert torch.equal(_params(a.model), _params(b.model))
    for key, mem in strategy.exchange.memory.items():
        assert all(torch.equal(t, strategy2.exchange.memory[key][n]) for n, t in mem.items())


def test_runner_resumes_dgc_exactly(tmp_path):
    from sgdlab import Config, run

    def cfg(name):
        return Config(task="digits", optimizer="sgd", lr=0.05, steps=6, batch_size=16, eval_every=3, log_every=1,
                      device="cpu", step_time=0.01, out=str(tmp_path / name), workers=2, strategy="ddp",
                      compress="dgc,ratio=0.01,warmup_steps=2")
    whole = run(cfg("whole"))
    run(cfg("parts"), stop_at=3)
    parts = run(cfg("parts"), resume=True)
    assert parts.summary["final_train_loss"] == whole.summary["final_train_loss"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["workers"][0]["model"][k], b["workers"][0]["model"][k]) for k in a["workers"][0]["model"])
    mem = b["strategy"]["exchange"]["memory"]
    assert sorted(mem) == ["grad/0", "grad/1"] and all(
        torch.equal(mem[k][n], a["strategy"]["exchange"]["memory"][k][n]) for k in mem for n in mem[k])


TORCH_CASES = {  # name: (strategy, options, compress)
    "ddp-topk-bitmap": ("ddp", {}, "topk,ratio=0.3"),
    "ddp-topk-indices": ("ddp", {}, "topk,ratio=0.02"),
    "ddp-randk": ("ddp", {}, "randk,ratio=0.4"),
    "localsgd-randk-plain": ("localsgd", {"sync_every": H}, "randk,ratio=0.5,unbiased=false"),
    "diloco-topk-ef": ("diloco", {"sync_every": H, "outer_lr": 0.5, "outer_args": {}},
                       "topk,ratio=0.25,feedback=sparse-toy-ef"),
    "ddp-dgc": ("ddp", {}, "dgc,ratio=0.05,warmup_steps=4,clip=1"),
    "ddp-dgc-nesterov-flat": ("ddp", {}, "dgc,ratio=0.1,nesterov=true,per_tensor=false"),
}


@pytest.mark.parametrize("world", [2, 3])
def test_sim_equals_torch_backend_for_every_sparsifier(tmp_path, world):
    from .test_torch_backend import torchrun

    res = torchrun(world, __file__, str(tmp_path / "out.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for case, (name, opts, compress) in TORCH_CASES.items():
        _, workers, group, _ = _train_sim(name, opts, compress, world=world)
        torch.testing.assert_close(got[case]["params"], _params(workers[0].model), atol=1e-6, rtol=0)
        assert got[case]["bytes"] == group.bytes_sent, case


def _train_torch(name, opts, compress):
    import os

    from sgdlab.distributed import Distributed

    rank = int(os.environ["RANK"])
    model = _model()
    opt = _sgd(model)
    dd = Distributed(model, opt, name, compress=compress, seed=3, **opts)
    for batch in _batches(rank):
        _loss(model, batch).backward()
        dd.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": _params(model), "bytes": dd.bytes_sent}
    dd.close()
    return out


if __name__ == "__main__":  # run by test_sim_equals_torch_backend_for_every_sparsifier under torchrun
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {case: _train_torch(*spec) for case, spec in TORCH_CASES.items()}
    if int(os.environ["RANK"]) == 0:
        torch.save(results, sys.argv[1])
    dist.destroy_process_group()
    os._exit(0)
