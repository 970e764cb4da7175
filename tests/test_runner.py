import json
import math
from pathlib import Path

import pytest
import torch

from sgdlab import Config, run, tasks
from sgdlab.errors import CheckpointError, ConfigError, DivergenceError
from sgdlab.metrics import read_metrics


def _model(out) -> dict:
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)["workers"][0]["model"]


def _metrics_without_time(out):
    return [{k: v for k, v in r.items() if k not in ("wall_time_s", "sim_time_s")}
            for r in read_metrics(Path(out) / "metrics.jsonl")]


def test_run_writes_the_run_directory(digits_config):
    res = run(digits_config)
    out = Path(digits_config.out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl",
                                                     "summary.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optimizer_args"]["momentum"] == 0.9 and cfg["lr"] == 0.1
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 5, 10, 15, 20, 25, 30]
    for r in recs[1:]:
        assert {"step", "samples", "train_loss", "lr", "wall_time_s"} <= set(r)
        assert r["samples"] == 16 * r["step"]
    assert {"val_loss", "val_accuracy"} <= set(recs[2])
    s = res.summary
    for k in ("task", "optimizer", "steps", "final_train_loss", "final_val_loss", "best_val_loss",
              "wall_time_s", "val_accuracy"):
        assert s[k] is not None, k
    assert s["status"] == "completed" and s["steps"] == 30
    assert s["best_val_loss"] == min(r["val_loss"] for r in recs if "val_loss" in r)
    assert s["val_accuracy"] > 0.5


def test_runner_equals_a_plain_loop(tmp_path):
    """Oracle: the runner's SGD trajectory is bit-identical to a hand-written loop with the same data order."""
    cfg = Config(task="quadratic", optimizer="sgd", lr=0.01, steps=25, batch_size=10, seed=5, eval_every=0,
                 out=str(tmp_path / "r"), device="cpu")
    run(cfg)
    task = tasks.create("quadratic")
    torch.manual_seed(5)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = tasks.EpochSampler(torch.arange(task.num_train), 10, seed=5)
    for _ in range(25):
        loss = task.loss(model, task.get_batch(sampler.next()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(_model(cfg.out)["weight"], model.weight.detach())


def test_lr_schedule_matches_formula(tmp_path):
    cfg = Config(task="quadratic", optimizer="sgd", lr=0.01, steps=40, batch_size=10, schedule="cosine",
                 warmup_steps=8, min_lr_ratio=0.1, log_every=1, eval_every=0, out=str(tmp_path / "r"), device="cpu")
    run(cfg)
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "lr" in r}
    for step, lr in lrs.items():
        k = step - 1  # the lr of the step-th update
        if k < 8:
            want = 0.01 * (k + 1) / 8
        else:
            p = (k - 8) / 32
            want = 0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        assert lr == pytest.approx(want, rel=1e-12), step


@pytest.mark.parametrize("which", ["digits", "charlm"])
def test_resume_is_bit_identical(which, tmp_path, digits_config, tiny_lm_config):
    base = (digits_config if which == "digits" else tiny_lm_config).replace(
        schedule="cosine", warmup_steps=3, grad_clip=1.0)
    full = base.replace(out=str(tmp_path / "full"))
    part = base.replace(out=str(tmp_path / "part"))
    run(full)
    stopped = run(part, stop_at=7)
    assert stopped.summary["status"] == "stopped" and stopped.summary["steps"] == 7
    resumed = run(part, resume=True)
    assert resumed.summary["status"] == "completed"
    a, b = _model(full.out), _model(part.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics_without_time(full.out) == _metrics_without_time(part.out)
    for k in ("final_train_loss", "final_val_loss", "best_val_loss"):
        assert resumed.summary[k] == json.loads((Path(full.out) / "summary.json").read_text())[k]


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = Config(task="quadratic", optimizer="sgd", lr=0.5, steps=200, batch_size=10, eval_every=2,
                 log_every=1, out=str(tmp_path / "r"), device="cpu")
    with pytest.raises(DivergenceError, match=r"at step (\d+).*last good checkpoint is kept") as ei:
        run(cfg)
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert 0 < ck["step"] < ei.value.step
    assert torch.isfinite(ck["workers"][0]["model"]["weight"]).all()
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "diverged"


def test_existing_run_is_not_destroyed(digits_config):
    run(digits_config)
    out = Path(digits_config.out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        run(digits_config.replace(lr=0.2))
    with pytest.raises(ConfigError, match="cannot change lr when resuming"):
        run(digits_config.replace(lr=0.2), resume=True)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}


def test_corrupt_checkpoint_on_resume(digits_config):
    run(digits_config, stop_at=10)
    out = Path(digits_config.out)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        run(digits_config, resume=True)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}


def test_out_is_a_file_and_resume_without_run(tmp_path, digits_config):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run(digits_config.replace(out=str(f)))
    with pytest.raises(CheckpointError, match="cannot resume"):
        run(digits_config.replace(out=str(tmp_path / "empty")), resume=True)


def test_batch_larger_than_data(tmp_path):
    cfg = Config(task="digits", batch_size=5000, steps=2, out=str(tmp_path / "r"), device="cpu")
    with pytest.raises(ConfigError, match="batch_size=5000 is larger than the data"):
        run(cfg)


def test_steps_can_be_extended_on_resume(digits_config):
    run(digits_config)
    res = run(digits_config.replace(steps=40), resume=True)
    assert res.summary["steps"] == 40 and res.summary["status"] == "completed"


def test_io_adamw_puts_embeddings_and_first_and_last_layers_in_the_adamw_group(tmp_path):
    from sgdlab.models import MLP, ByteTransformer, SmallCNN, io_parameters

    lm = ByteTransformer(context=16, d_model=16, n_layers=2, n_heads=2)
    assert [id(p) for p in io_parameters(lm)] == [id(lm.tok.weight), id(lm.pos.weight), id(lm.ln_f.weight),
                                                  id(lm.ln_f.bias)]  # the output layer is tied to tok
    mlp = MLP(4, 8, 3)
    assert [id(p) for p in io_parameters(mlp)] == [id(p) for m in (mlp.net[1], mlp.net[5]) for p in m.parameters()]
    cnn = SmallCNN(4)
    assert [id(p) for p in io_parameters(cnn)] == [id(p) for m in (cnn.net[0], cnn.net[-1]) for p in m.parameters()]
    cfg = Config(task="digits", optimizer="muon", steps=3, eval_every=3, device="cpu", io_adamw=True,
                 out=str(tmp_path / "io"))
    res = run(cfg)
    assert res.summary["status"] == "completed"
    ck = torch.load(tmp_path / "io" / "checkpoint.pt", weights_only=True)
    groups = ck["workers"][0]["optimizer"]["param_groups"]
    assert [g["use_adamw"] for g in groups] == [False, True] and len(groups[1]["params"]) == 4
    with pytest.raises(ConfigError, match="io_adamw=true needs an optimizer with a use_adamw group option"):
        Config(task="digits", optimizer="adamw", io_adamw=True).validate()


class _ProtocolProbe(torch.optim.SGD):
    """SGD that asks for everything the step protocol offers, and checks what it gets."""

    step_closure = True
    log: list = []

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)

    def before_backward(self, ctx):
        sampled, n = ctx.sampled_loss()
        assert n > 0 and sampled.requires_grad
        self._loss = ctx.loss().item()  # no backward: no gradient left behind

    def step(self, closure=None):
        assert closure is not None
        with torch.enable_grad():
            again = closure().item()  # this worker's loss on this worker's batch, parameters not yet moved
        _ProtocolProbe.log.append(again == self._loss)
        return super().step()


@pytest.fixture
def probe_optimizer(monkeypatch):
    from sgdlab import optim
    from sgdlab.registry import Entry

    monkeypatch.setitem(optim.registry._entries, "probe", Entry("probe", _ProtocolProbe, "test probe", {}))
    _ProtocolProbe.log.clear()
    return "probe"


def test_the_loop_drives_any_optimizer_through_the_step_protocol(tmp_path, probe_optimizer):
    # localsgd: ddp refuses optimizers whose extra losses each worker would compute alone
    kw = dict(task="digits", lr=0.05, steps=6, batch_size=8, eval_every=0, strategy="localsgd",
              strategy_args={"sync_every": 2}, workers=3, device="cpu", step_time=0.01)
    run(Config(optimizer=probe_optimizer, out=str(tmp_path / "probe"), **kw))
    assert _ProtocolProbe.log == [True] * 18  # every worker's closure is its own (3 workers x 6 steps)
    run(Config(optimizer="sgd", out=str(tmp_path / "sgd"), **kw))
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["workers"] for d in ("probe", "sgd"))
    for wa, wb in zip(a, b, strict=True):  # the extra losses changed nothing
        assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wb["model"])


def test_dp_sgd_refuses_an_optimizer_that_evaluates_extra_losses(tmp_path, probe_optimizer):
    cfg = Config(task="digits", optimizer=probe_optimizer, steps=2, dp="noise=1,clip=1", device="cpu",
                 out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"dp: optimizer 'probe' evaluates extra non-private losses \(an extra "
                                          r"loss before each backward, step\(closure\)\); choose another"):
        run(cfg)


def test_a_run_parses_its_settings_once(tmp_path, monkeypatch):
    from sgdlab import strategies
    from sgdlab.distributed import NetworkModel
    from sgdlab.privacy import DPOptions

    calls = {"dp": 0, "network": 0, "strategy": 0}

    def counted(key, fn):
        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(DPOptions, "parse", classmethod(counted("dp", DPOptions.parse.__func__)))
    monkeypatch.setattr(NetworkModel, "parse", classmethod(counted("network", NetworkModel.parse.__func__)))
    monkeypatch.setattr(strategies, "options", counted("strategy", strategies.options))
    cfg = Config(task="digits", optimizer="sgd", steps=4, batch_size=8, eval_every=2, strategy="localsgd", workers=2,
                 strategy_args={"sync_every": 2}, dp="noise=0.5,clip=0.1,unit=client", network="bandwidth=10G",
                 device="cpu", out=str(tmp_path / "r"))
    res = run(cfg)
    assert calls == {"dp": 1, "network": 1, "strategy": 1}
    assert res.config == cfg.resolve()  # the run directory's config.json is the resolved Config
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == res.config.to_dict()


def test_backend_differences_live_in_the_group():
    from sgdlab.distributed import NetworkModel
    from sgdlab.distributed.group import SimGroup

    g = SimGroup(2, NetworkModel())
    assert g.is_lead and not g.needs_out and not g.keeps_previous_checkpoint
    assert g.stops_at_once(True) and g.stop_vote(True) == 0.0  # one process stops at once, no vote
    assert g.agreed_step([7, 4]) == 7 and g.agreed_step([]) is None
    g.barrier()
    g.check_same("00")
