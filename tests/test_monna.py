"""MoNNA (local momentum + nearest-neighbour averaging of models) against a plain float64 reference of the
paper's update, with a far-away and a NaN worker; f = 0 is full averaging; bytes of the model all-gather;
bad configurations in one line. (sim == torch for monna runs in test_robust_aggregators' torchrun launch.)"""

from __future__ import annotations

import math

import pytest
import torch

from sgdlab import strategies
from sgdlab.distributed import NetworkModel, SimGroup
from sgdlab.errors import ConfigError
from sgdlab.exchange import ExchangeSpec
from sgdlab.strategies import Worker

D_IN, D_OUT, B, STEPS, LR, BETA, N = 4, 2, 6, 5, 0.1, 0.9, 5


def _data(rank):
    g = torch.Generator().manual_seed(10 + rank)
    xs = [torch.randn(B, D_IN, generator=g) for _ in range(STEPS)]
    return [(x, x[:, :D_OUT] * (1 + rank)) for x in xs]


def _models(n, init=None):
    out = []
    for r in range(n):
        torch.manual_seed(0)
        m = torch.nn.Linear(D_IN, D_OUT)
        if init is not None and r in init:
            with torch.no_grad():
                for p in m.parameters():
                    p.fill_(init[r])
        out.append(m)
    return out


def _train(n, f, init=None, **spec):
    group = SimGroup(n, NetworkModel())
    strategy = strategies.create("monna", group, {"f": f}, exchange=ExchangeSpec(**spec) if spec else None)
    workers = [Worker(r, m, torch.optim.SGD(m.parameters(), lr=LR, momentum=BETA, dampening=BETA))
               for r, m in enumerate(_models(n, init))]
    strategy.setup(workers)
    data = [_data(r) for r in range(n)]
    for step in range(1, STEPS + 1):
        for w in workers:
            x, y = data[w.rank][step - 1]
            (w.model(x) - y).pow(2).mean().backward()
        strategy.after_backward(workers, step)
        for w in workers:
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
        strategy.after_step(workers, step)
    return [torch.nn.utils.parameters_to_vector(w.model.parameters()).detach() for w in workers], group


# ---- the paper's update in plain float64 -----------------------------------------------------------------
def ref_monna(n, f, init=None):
    thetas = []
    for m in _models(n, init):
        thetas.append([v for v in m.weight.detach().double().flatten().tolist()] + m.bias.detach().double().tolist())
    moms = [None] * n
    data = [_data(r) for r in range(n)]
    for step in range(STEPS):
        halves = []
        for i in range(n):
            x, y = (t.double().tolist() for t in data[i][step])
            w = [thetas[i][o * D_IN:(o + 1) * D_IN] for o in range(D_OUT)]
            b = thetas[i][D_OUT * D_IN:]
            gw = [[0.0] * D_IN for _ in range(D_OUT)]
            gb = [0.0] * D_OUT
            for xr, yr in zip(x, y, strict=True):
                for o in range(D_OUT):
                    err = sum(a * c for a, c in zip(w[o], xr, strict=True)) + b[o] - yr[o]
                    for k in range(D_IN):
                        gw[o][k] += 2 * err * xr[k] / (B * D_OUT)
                    gb[o] += 2 * err / (B * D_OUT)
            g = [v for row in gw for v in row] + gb
            # torch's SGD: the buffer starts at g_1, then m <- beta m + (1 - beta) g
            moms[i] = g if moms[i] is None else [BETA * a + (1 - BETA) * c for a, c in zip(moms[i], g, strict=True)]
            halves.append([a - LR * c for a, c in zip(thetas[i], moms[i], strict=True)])

        def dist(a, c):
            d = math.sqrt(sum((u - v) ** 2 for u, v in zip(a, c, strict=True)))
            return math.inf if math.isnan(d) else d

        thetas = []
        for i in range(n):
            near = sorted(range(n), key=lambda j, i=i: (0.0 if j == i else dist(halves[i], halves[j]), j))[:n - f]
            thetas.append([sum(halves[j][k] for j in near) / len(near) for k in range(len(halves[i]))])
    return thetas


def test_monna_matches_the_float64_reference():
    got, _ = _train(N, 1)
    want = ref_monna(N, 1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), torch.tensor(w, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert not torch.equal(got[0], got[4])  # decentralised: the workers' models differ


@pytest.mark.parametrize("bad", [100.0, float("nan")])
def test_a_far_or_nan_worker_never_reaches_the_honest_models(bad):
    got, _ = _train(N, 1, init={4: bad})
    want = ref_monna(N, 1, init={4: bad})
    for g, w in zip(got[:4], want[:4], strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), torch.tensor(w, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    clean, _ = _train(N - 1, 0)  # worker 4 is never among the honest workers' n - f = 4 nearest
    for g, c in zip(got[:4], clean, strict=True):
        torch.testing.assert_close(g, c, atol=1e-5, rtol=1e-5)


def test_f_zero_is_full_averaging_and_the_model_all_gather_is_counted():
    got, group = _train(3, 0)
    assert all(torch.allclose(g, got[0], atol=1e-6) for g in got)
    params = D_IN * D_OUT + D_OUT
    assert group.bytes_sent == STEPS * NetworkModel().all_gather(4 * params, 3)[0]


@pytest.mark.parametrize("spec, workers, f, match", [
    (dict(aggregate="krum,f=1"), 5, 1, r"strategy monna mixes models by nearest-neighbour averaging"),
    (dict(pre_aggregate="nnm,f=1"), 5, 1, r"strategy monna mixes models .*pre_aggregate='nnm,f=1'"),
    (dict(compress="topk,ratio=0.5"), 5, 1, r"strategy monna exchanges models, not updates: compress='topk"),
    ({}, 4, 2, r"strategy monna: f=2 with n=4 vectors breaks its bound n > 2f"),
])
def test_bad_monna_configurations_fail_in_one_line(spec, workers, f, match):
    with pytest.raises(ConfigError, match=match) as err:
        strategies.create("monna", SimGroup(workers, NetworkModel()), {"f": f}, exchange=ExchangeSpec(**spec))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="monna f=-1 is out of range"):
        strategies.options("monna", {"f": -1})
