"""The exchange pipeline: precision compressors, stage specs, and user-defined stages through every
strategy on both backends."""

from dataclasses import dataclass

import pytest
import torch

from sgdlab import exchange


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8", "int4"])
def test_precision_compressors(precision):
    g = torch.Generator().manual_seed(0)
    for n in (1, 127, 128, 129, 1001):
        x = torch.randn(n, generator=g) * torch.logspace(-3, 2, n)
        c = exchange.compressors.get(precision)()
        payload = c.encode(x)
        assert c.payload_bytes(payload) == c.nbytes(n)
        y = c.decode(payload, n)
        assert y.shape == x.shape
        if precision == "fp32":
            assert torch.equal(x, y)
        elif precision in ("int8", "int4"):
            qmax = 127 if precision == "int8" else 7
            blocks = torch.nn.functional.pad(x, (0, (-n) % 128)).view(-1, 128)
            bound = (blocks.abs().amax(1) / qmax / 2).repeat_interleave(128)[:n]
            assert ((x - y).abs() <= bound * (1 + 1e-6) + 1e-12).all()
        else:
            torch.testing.assert_close(y, x, rtol=1e-2, atol=0)




# ---- stages defined here, outside the library: the seam every later compressor/aggregator uses ----------
class EveryOther(exchange.Compressor):
    """Toy compressor: sends the even-indexed values (float32), the rest decode to 0. Payloads add up."""

    name = "toy-every-other"
    summable = True

    def encode(self, x, slot=None, rank=0):
        return [x[0::2].clone()]

    def decode(self, payload, n, slot=None, rank=0):
        out = torch.zeros(n)
        out[0::2] = payload[0]
        return out


class CoordMax(exchange.Aggregator):
    """Toy aggregator: the coordinate-wise maximum over workers (needs every worker's vector)."""

    name = "toy-max"

    def __call__(self, vectors):
        return torch.stack(vectors).amax(0)


class Residual(exchange.Feedback):
    """Toy error feedback (EF): compress x + e, keep e = (x + e) - decoded message."""

    name = "toy-ef"

    def message(self, x, memory):
        return x + memory["e"] if "e" in memory else x

    def sent(self, message, decoded, memory):
        memory["e"] = message - decoded


@dataclass
class PushOptions:
    scale: float = 2.0


class PushAway(exchange.Attack):
    """Toy omniscient attack: send -scale times the mean of the honest vectors."""

    name = "toy-push"
    Options = PushOptions
    omniscient = True

    def __call__(self, own, honest, slot, rank):
        return -self.options.scale * torch.stack(honest).mean(0)


for _reg, _cls in ((exchange.compressors, EveryOther), (exchange.aggregators, CoordMax),
                   (exchange.feedback, Residual), (exchange.attacks, PushAway)):
    if _cls.name not in _reg:
        _reg.register(_cls.name, _cls, _cls.__doc__)

N, STEPS, H, OUTER_LR, LR = 3, 4, 2, 0.5, 0.1
CASES = {  # name: (strategy, options, compress, aggregate)
    "ddp-half-mean": ("ddp", {}, "toy-every-other", "mean"),
    "ddp-half-max": ("ddp", {}, "toy-every-other", "toy-max"),
    "localsgd-fp32-max": ("localsgd", {"sync_every": H}, "fp32", "toy-max"),
    "localsgd-half-mean": ("localsgd", {"sync_every": H}, "toy-every-other", "mean"),
    "diloco-half-max": ("diloco", {"sync_every": H, "outer_lr": OUTER_LR, "outer_args": {}}, "toy-every-other",
                        "toy-max"),
    "diloco-int8-ef": ("diloco", {"sync_every": H, "outer_lr": OUTER_LR, "outer_args": {}}, "int8,feedback=toy-ef",
                       "mean"),
    "ddp-attack-max": ("ddp", {}, "fp32", "toy-max", "count=1,attack=toy-push,scale=3"),
    "localsgd-attack-mean": ("localsgd", {"sync_every": H}, "fp32", "mean", "count=1,attack=toy-push"),
}


def _case(case):
    name, opts, compress, aggregate, *rest = CASES[case]
    return name, opts, compress, aggregate, (rest[0] if rest else None)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 1)


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(8, 5, generator=g) for _ in range(STEPS)]
    return [(x, x.sum(1, keepdim=True) * (1 + rank)) for x in xs]


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _step_all(strategy, workers, step):
    """One training step of the local workers, as sgdlab's runner does it."""
    for w in workers:
        _loss(w.model, _batches(w.rank)[step - 1]).backward()
    strategy.after_backward(workers, step)
    for w in workers:
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
    strategy.after_step(workers, step)


def _reference(case):
    """The same training, written out: flat vectors, the toy stages by hand (plain torch)."""
    name, opts, compress, aggregate, byzantine = _case(case)
    torch.manual_seed(0)
    models = [_model() for _ in range(N)]
    theta = torch.cat([p.detach().reshape(-1) for p in models[0].parameters()])
    memory = [torch.zeros_like(theta) for _ in range(N)]

    def flat_grad(m):
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    def set_flat(m, v):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(v.clone(), m.parameters())

    def combine(vectors):
        if byzantine:
            scale = 3.0 if "scale=3" in byzantine else 2.0
            vectors = [*vectors[:-1], -scale * torch.stack(vectors[:-1]).mean(0)]
        if compress.startswith("int8"):
            from sgdlab.exchange.precision import INT8
            c = INT8()
            msgs = []
            for i, v in enumerate(vectors):
                m = v + memory[i]
                d = c.decode(c.encode(m), m.numel())
                memory[i] = m - d
                msgs.append(d)
            # int8 is averaged by a quantised reduce-scatter + all-gather: 6 values are one block, so one
            # chunk holds everything; its mean (float32, rank order) is quantised once more
            total = msgs[0].clone()
            for d in msgs[1:]:
                total += d
            mean = total / len(msgs)
            return c.decode(c.encode(mean), mean.numel())
        elif compress == "toy-every-other":
            msgs = [torch.where(torch.arange(v.numel()) % 2 == 0, v, torch.zeros_like(v)) for v in vectors]
        else:
            msgs = vectors
        return torch.stack(msgs).amax(0) if aggregate == "toy-max" else torch.stack(msgs).mean(0)

    for step in range(1, STEPS + 1):
        for r, m in enumerate(models):
            m.zero_grad()
            _loss(m, _batches(r)[step - 1]).backward()
        if name == "ddp":
            g = combine([flat_grad(m) for m in models])
            theta = theta - LR * g
            for m in models:
                set_flat(m, theta)
            continue
        for m in models:
            with torch.no_grad():
                for p in m.parameters():
                    p -= LR * p.grad
        if step % H == 0:
            delta = combine([theta - torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in models])
            theta = theta - (OUTER_LR if name == "diloco" else 1.0) * delta
            for m in models:
                set_flat(m, theta)
    return theta


def _expected_bytes(case, n_params=6):
    name, _, compress, aggregate, _ = _case(case)
    rounds = STEPS if name == "ddp" else STEPS // H
    if compress.startswith("int8"):
        payload = n_params + 4  # one scale for the single block
    elif compress == "toy-every-other":
        payload = 4 * ((n_params + 1) // 2)
    else:
        payload = 4 * n_params
    all_reduce = aggregate == "mean"  # int8 under the mean: reduce-scatter + all-gather, an all-reduce's bytes
    per_round = 2 * (N - 1) / N * payload if all_reduce else (N - 1) * payload
    return rounds * per_round


def _train_sim(case):
    from sgdlab import strategies
    from sgdlab.distributed import NetworkModel, SimGroup
    from sgdlab.strategies import Worker

    name, opts, compress, aggregate, byzantine = _case(case)
    group = SimGroup(N, NetworkModel())
    spec = exchange.ExchangeSpec(compress, aggregate, byzantine)
    strategy = strategies.create(name, group, opts, exchange=spec)
    workers = []
    for r in range(N):
        m = _model()
        workers.append(Worker(r, m, torch.optim.SGD(m.parameters(), lr=LR)))
    strategy.setup(workers)
    for step in range(1, STEPS + 1):
        _step_all(strategy, workers, step)
    return strategy, workers, group


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_defined_stages_through_every_strategy_sim(case):
    strategy, workers, group = _train_sim(case)
    want = _reference(case)
    honest = workers[:-1] if _case(case)[4] else workers  # a Byzantine worker's own model is not reported
    for w in honest:
        got = torch.nn.utils.parameters_to_vector(w.model.parameters()).detach()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert group.bytes_sent == pytest.approx(_expected_bytes(case), rel=1e-12)


def test_feedback_memory_is_in_the_checkpoint_and_resumes_exactly():
    case = "diloco-int8-ef"
    strategy, workers, _ = _train_sim(case)
    state = strategy.state_dict()
    mem = state["exchange"]["memory"]
    assert sorted(mem) == [f"delta/{r}" for r in range(N)] and all(m["e"].abs().sum() > 0 for m in mem.values())
    strategy.exchange.memory.clear()
    strategy.load_state_dict(state)
    assert all(torch.equal(strategy.exchange.memory[k]["e"], v["e"]) for k, v in mem.items())


def test_torch_backend_runs_user_defined_stages(tmp_path):
    from .test_torch_backend import torchrun

    res = torchrun(N, __file__, str(tmp_path / "out.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for case in CASES:
        _, workers, group = _train_sim(case)
        sim = torch.nn.utils.parameters_to_vector(workers[0].model.parameters()).detach()
        torch.testing.assert_close(got[case]["params"], sim, atol=1e-6, rtol=0)
        assert got[case]["bytes"] == pytest.approx(_expected_bytes(case), rel=1e-12)


def _train_torch(case):
    """One rank's own loop under torchrun, wrapped with sgdlab.distributed.Distributed."""
    import os

    from sgdlab.distributed import Distributed

    name, opts, compress, aggregate, byzantine = _case(case)
    rank = int(os.environ["RANK"])
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dd = Distributed(model, opt, name, compress=compress, aggregate=aggregate, byzantine=byzantine, **opts)
    for batch in _batches(rank):
        _loss(model, batch).backward()
        dd.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(), "bytes": dd.bytes_sent}
    dd.close()
    return out


if __name__ == "__main__":  # run by test_torch_backend_runs_user_defined_stages under torchrun
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo")  # one process group for every case (Distributed leaves it open)
    results = {}
    for case in CASES:
        results[case] = _train_torch(case)
    if int(os.environ["RANK"]) == 0:
        torch.save(results, sys.argv[1])
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


# ---- the --compress / --aggregate spec parsers ----------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sgdlab.errors import ConfigError as _ConfigError  # noqa: E402

_PARTS = st.sampled_from(["int8", "int4", "fp32", "bf16", "mean", "toy-max", "block", "feedback", "none", "toy-ef",
                          "=", ",", " ", "64", "3", "-2", "nan", "inf", "1e400", "true", "[1]", "x", "", "é"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(_PARTS, max_size=8).map("".join)),
       st.one_of(st.text(max_size=20), st.lists(_PARTS, max_size=6).map("".join)))
def test_exchange_spec_parses_or_says_what_is_wrong(compress, aggregate):
    try:
        spec = exchange.ExchangeSpec(compress, aggregate)
    except _ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    again = spec.canonical()  # a valid spec's canonical form parses to itself
    assert again.canonical() == again


@pytest.mark.parametrize(("compress", "aggregate", "match"), [
    ("int9", "mean", r"unknown compressor 'int9'.*int8"),
    ("int8,blok=64", "mean", r"unknown compressor 'int8' key 'blok'.*block"),
    ("int8,block=3", "mean", r"block=3: the quantisation block must be an even integer >= 2"),
    ("int8,block=64,block=32", "mean", r"block is given twice"),
    ("int8,feedback=nope", "mean", r"unknown error-feedback rule 'nope'"),
    ("fp32,feedback=toy-ef", "mean", r"feedback=toy-ef corrects a lossy compressor; fp32 is lossless"),
    ("int8,64", "mean", r"expected key=value items after the name"),
    ("int8", "medain", r"unknown aggregator 'medain'. Did you mean 'median'\?"),
    ("", "mean", r"expected NAME\[,key=value...\]"),
])
def test_bad_exchange_specs(compress, aggregate, match):
    with pytest.raises(_ConfigError, match=match):
        exchange.ExchangeSpec(compress, aggregate)


def test_exchange_spec_canonical_form():
    assert exchange.ExchangeSpec("int8").canonical() == exchange.ExchangeSpec("int8,block=128", "mean")
    assert exchange.ExchangeSpec("int4,block=64,feedback=toy-ef").canonical().compress == \
        "int4,block=64,feedback=toy-ef"


# ---- the same stages through sgdlab's runner (config keys compress / aggregate) --------------------------
def _digits(tmp_path, name, **kw):
    from sgdlab import Config

    return Config(task="digits", optimizer="sgd", lr=0.05, steps=8, batch_size=16, eval_every=4, log_every=1,
                  device="cpu", step_time=0.01, out=str(tmp_path / name), **{"workers": N, **kw})


def test_runner_counts_bytes_of_user_defined_stages(tmp_path):
    from sgdlab import run

    res = run(_digits(tmp_path, "ddp", strategy="ddp", compress="toy-every-other", aggregate="toy-max"))
    n_params = res.summary["num_params"]
    assert res.summary["bytes_sent_per_worker"] == pytest.approx(8 * (N - 1) * 4 * ((n_params + 1) // 2))
    assert res.config.compress == "toy-every-other" and res.config.aggregate == "toy-max"


def test_runner_resumes_feedback_memory_exactly(tmp_path):
    from sgdlab import run

    kw = dict(strategy="diloco", strategy_args={"sync_every": 2}, compress="int8,feedback=toy-ef")
    whole = run(_digits(tmp_path, "whole", **kw))
    run(_digits(tmp_path, "parts", **kw), stop_at=3)
    parts = run(_digits(tmp_path, "parts", **kw), resume=True)
    assert parts.summary["final_train_loss"] == whole.summary["final_train_loss"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["workers"][0]["model"][k], b["workers"][0]["model"][k]) for k in a["workers"][0]["model"])
    mem = b["strategy"]["exchange"]["memory"]
    assert sorted(mem) == [f"delta/{r}" for r in range(N)]


@pytest.mark.parametrize(("kw", "match"), [
    (dict(compress="int8", workers=1), "strategy 'single' exchanges nothing"),
    (dict(strategy="ddp", compress="int8", strategy_args={"precision": "int4"}), "both choose the compressor"),
    (dict(strategy="ddp", byzantine=f"count={N},attack=toy-push"), f"allowed: 0 <= count < workers={N}"),
    (dict(strategy="ddp", byzantine="count=1"), "expected count=F,attack=NAME"),
    (dict(strategy="diloco", compress="int8", dp="noise=1,clip=1,unit=client"), "needs precision=fp32"),
])
def test_bad_exchange_config(tmp_path, kw, match):
    with pytest.raises(_ConfigError, match=match):
        _digits(tmp_path, "bad", **kw).spec()
