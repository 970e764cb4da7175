"""Low-precision exchange done right (C1): bf16/fp16/int8/int4 averaged by a quantised reduce-scatter
followed by an all-gather. A plain reference of the two-phase algorithm, byte counts by hand (2(N−1)/N ×
payload per worker), and the simulator against torch.distributed (2 and 3 gloo processes)."""

import math

import pytest
import torch

from sgdlab import exchange
from sgdlab.distributed import NetworkModel, SimGroup

LOSSY = ["bf16", "fp16", "int8", "int4"]
SIZES = [1, 100, 129, 1000, 1001]   # 100: one block, so some ranks' chunks are empty


def _vectors(world, n, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * n)
    return [torch.randn(n, generator=g) * torch.logspace(-2, 1, n) * (1 + r) for r in range(world)]


# ---- the plain reference ------------------------------------------------------------------------------------
def quantised(x, fmt, block=128):
    """x rounded to the format and decoded, written out."""
    if fmt in ("bf16", "fp16"):
        return x.to(torch.bfloat16 if fmt == "bf16" else torch.float16).float()
    qmax = 127 if fmt == "int8" else 7
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % block)).view(-1, block)
    s = blocks.abs().amax(1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(blocks / s[:, None]).clamp(-qmax, qmax)
    return (q * s[:, None]).reshape(-1)[:n]


def two_phase(xs, fmt, block=128):
    """Quantise every worker's chunk r, average the N decoded copies in float32 in rank order, quantise the
    average again; concatenate the chunks. Chunks are whole blocks for int8/int4 (split as evenly as
    possible), elements for bf16/fp16."""
    world, n = len(xs), xs[0].numel()
    if fmt in ("bf16", "fp16"):
        bounds = [(r * n // world, (r + 1) * n // world) for r in range(world)]
    else:
        nb = math.ceil(n / block)
        bounds = [(min(n, r * nb // world * block), min(n, (r + 1) * nb // world * block)) for r in range(world)]
    parts = []
    for s, e in bounds:
        total = quantised(xs[0][s:e], fmt, block)
        for x in xs[1:]:
            total += quantised(x[s:e], fmt, block)
        parts.append(quantised(total / world, fmt, block))
    return torch.cat(parts)


def _exchange(fmt, xs, aggregator=None, block=None):
    cls = exchange.compressors.get(fmt)
    c = cls(cls.Options(block=block)) if block else cls()
    ex = exchange.Exchange(SimGroup(len(xs), NetworkModel()), c, aggregator=aggregator)
    tensors = [[x.clone()] for x in xs]
    ex.mean_(tensors, key="v", step=1)
    assert all(torch.equal(t[0], tensors[0][0]) for t in tensors)  # every worker gets the same aggregate
    return tensors[0][0], ex.group


@pytest.mark.parametrize("fmt", LOSSY)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_two_phase_equals_the_reference(fmt, world):
    for n in SIZES:
        xs = _vectors(world, n)
        got, _ = _exchange(fmt, xs)
        assert torch.equal(got, two_phase(xs, fmt)), (fmt, world, n)
    xs = _vectors(world, 300)
    got, _ = _exchange(fmt, xs, block=64) if fmt.startswith("int") else _exchange(fmt, xs)
    assert torch.equal(got, two_phase(xs, fmt, 64)), (fmt, world, "block=64")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_round_trip_equals_the_reference_on_zero_blocks_and_odd_lengths(fmt):
    c = exchange.compressors.get(fmt)()
    for n in (1, 127, 256, 1001):
        x = _vectors(1, n)[0]
        x[: min(n, 128)] = 0  # an all-zero block: scale 1
        x[-1] = -x.abs().max() * 2  # a block whose absmax is a negative value
        assert torch.equal(c.decode(c.encode(x.clone()), n), quantised(x, fmt)), (fmt, n)


@pytest.mark.parametrize("fmt", LOSSY)
def test_chunks_are_the_quantisation_of_their_slice(fmt):
    c = exchange.compressors.get(fmt)()
    for n in SIZES:
        x = _vectors(1, n)[0]
        payload = c.encode(x)
        for world in (2, 3, 4):
            bounds = c.chunk_bounds(n, world)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            chunks = [c.chunk(payload, s, e) for s, e in bounds]
            for (s, e), ch in zip(bounds, chunks, strict=True):
                alone = c.encode(x[s:e])
                assert all(torch.equal(a, b) for a, b in zip(ch, alone, strict=True)), (fmt, n, world, s, e)
            assert sum(c.payload_bytes(ch) for ch in chunks) == c.payload_bytes(payload) == c.nbytes(n)


# payload bytes of n = 1000 values, by hand: bf16/fp16 2 bytes each; int8 one byte each + a float32 scale per
# block of 128 (ceil(1000/128) = 8 scales = 32 bytes); int4 ceil(1000/2) = 500 bytes + the same 32
PAYLOAD_1000 = {"bf16": 2000, "fp16": 2000, "int8": 1000 + 32, "int4": 500 + 32}


@pytest.mark.parametrize("fmt", LOSSY)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_bytes_are_two_n_minus_one_over_n_payloads(fmt, world):
    _, group = _exchange(fmt, _vectors(world, 1000))
    sent = 2 * (world - 1) / world * PAYLOAD_1000[fmt]
    assert group.bytes_sent == pytest.approx(sent, rel=1e-15)
    net = NetworkModel()
    assert group.sim_time() == pytest.approx(2 * (world - 1) * net.latency + 8 * sent / net.bandwidth, rel=1e-12)
    # int4 with an odd count: ceil(1001/2) = 501 bytes + 8 scales
    if fmt == "int4":
        _, group = _exchange(fmt, _vectors(world, 1001))
        assert group.bytes_sent == pytest.approx(2 * (world - 1) / world * (501 + 32), rel=1e-15)


class CoordMax(exchange.Aggregator):
    name = "lp-test-max"

    def __call__(self, vectors):
        return torch.stack(vectors).amax(0)


def test_non_linear_aggregators_and_one_worker_keep_the_all_gather():
    xs = _vectors(3, 1000)
    got, group = _exchange("int8", xs, aggregator=CoordMax())
    c = exchange.compressors.get("int8")()
    want = torch.stack([c.decode(c.encode(x), 1000) for x in xs]).amax(0)
    assert torch.equal(got, want) and group.bytes_sent == 2 * PAYLOAD_1000["int8"]  # (N-1) x payload
    got, group = _exchange("int4", xs[:1])
    assert torch.equal(got, quantised(xs[0], "int4")) and group.bytes_sent == 0


def test_scatter_chunks_on_the_simulator():
    group = SimGroup(3, NetworkModel())
    chunks = [[[torch.full((j,), 10 * i + j, dtype=torch.int8), torch.tensor([float(i)])] for j in range(3)]
              for i in range(3)]
    out = group.scatter_chunks(chunks)
    for dst in range(3):
        for src in range(3):
            assert torch.equal(out[dst][src][0], chunks[src][dst][0]) and out[dst][src][1].item() == src
    with pytest.raises(ValueError, match="one chunk per rank"):
        group.scatter_chunks([c[:2] for c in chunks])


# ---- the simulator against torch.distributed -----------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_two_phase_sim_equals_torch(tmp_path, world):
    from .test_torch_backend import torchrun

    res = torchrun(world, __file__, str(tmp_path / "out.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for fmt in LOSSY:
        for n in SIZES:
            want, group = _exchange(fmt, _vectors(world, n))
            assert torch.equal(got[f"{fmt}/{n}"]["v"], want), (fmt, n)
            assert got[f"{fmt}/{n}"]["bytes"] == group.bytes_sent, (fmt, n)


if __name__ == "__main__":  # run by test_two_phase_sim_equals_torch under torchrun
    import os
    import sys

    import torch.distributed as dist

    from sgdlab.distributed.group import TorchGroup

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for fmt in LOSSY:
        for n in SIZES:
            group = TorchGroup(NetworkModel(), torch.device("cpu"))
            ex = exchange.Exchange(group, exchange.compressors.get(fmt)())
            mine = [[_vectors(world, n)[rank].clone()]]
            ex.mean_(mine, key="v", step=1)
            results[f"{fmt}/{n}"] = {"v": mine[0][0], "bytes": group.bytes_sent}
    if rank == 0:
        torch.save(results, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
