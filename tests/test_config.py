import json

import pytest

from sgdlab import Config
from sgdlab.config import parse_value
from sgdlab.errors import ConfigError, UnknownNameError


def test_defaults_resolve():
    cfg = Config().resolve()
    assert cfg.task == "charlm" and cfg.optimizer == "adamw"
    assert cfg.lr == 1e-3  # the optimizer's registered default
    assert cfg.checkpoint_every == cfg.eval_every
    assert cfg.optimizer_args["betas"] == [0.9, 0.999]
    assert cfg.task_args["context"] == 128
    assert cfg.device == "cpu"


def test_set_resolution_order():
    cfg = Config(optimizer="sgd")
    assert cfg.set("steps=7").steps == 7
    assert cfg.set("momentum=0.9").optimizer_args == {"momentum": 0.9}
    assert cfg.set("d_model=64").task_args == {"d_model": 64}
    assert cfg.set("optim.nesterov=true").optimizer_args == {"nesterov": True}
    assert cfg.set("task_args.context=16").task_args == {"context": 16}
    assert Config(optimizer="adam").set("betas=[0.8, 0.9]").optimizer_args == {"betas": [0.8, 0.9]}


def test_set_unknown_key_lists_valid_and_closest():
    with pytest.raises(UnknownNameError, match=r"unknown config key 'momentun'.*Did you mean 'momentum'.*Valid:"):
        Config(optimizer="sgd").set("momentun=0.9")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        Config().set("steps")


@pytest.mark.parametrize("raw,value", [("0.9", 0.9), ("3", 3), ("true", True), ("cnn", "cnn"),
                                       ("[1, 2]", [1, 2]), ('"a b"', "a b")])
def test_parse_value(raw, value):
    assert parse_value(raw) == value


@pytest.mark.parametrize("changes,pattern", [
    ({"lr": -1.0}, r"lr=-1.0 is out of range; allowed: 0 <= lr"),
    ({"steps": 0}, r"steps=0 is out of range; allowed: 1 <= steps"),
    ({"batch_size": 0}, r"batch_size=0 is out of range"),
    ({"warmup_steps": 500, "steps": 100}, r"warmup_steps=500 is out of range; allowed: 0 <= warmup_steps <= 100"),
    ({"grad_clip": -0.5}, r"grad_clip"),
    ({"min_lr_ratio": 2.0}, r"min_lr_ratio"),
    ({"schedule": "cosin"}, r"unknown schedule 'cosin'. Did you mean 'cosine'"),
    ({"device": "gpu"}, r"device='gpu'; allowed: auto, cpu, cuda, cuda:N, mps"),
    ({"task": "charlmm"}, r"unknown task 'charlmm'. Did you mean 'charlm'\?.*Valid: charlm, digits"),
    ({"optimizer": "adamm"}, r"unknown optimizer 'adamm'.*Valid: adam, adamomentum, adamp, adamw, ademamix"),
    ({"strategy": "dpp"}, r"unknown strategy 'dpp'"),
    ({"optimizer_args": {"momentum": 0.9}}, r"hyperparameter of optimizer 'adamw' 'momentum'"),
    ({"task_args": {"d_modell": 3}}, r"unknown option of task 'charlm' 'd_modell'. Did you mean 'd_model'"),
    ({"task_args": {"d_model": 30, "n_heads": 4}}, r"d_model=30 must be divisible by n_heads=4"),
    ({"task": "digits", "task_args": {"model": "resnet"}}, r"model='resnet'; allowed: mlp, cnn"),
])
def test_out_of_range_values_are_named(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config(**changes).validate()


def test_lr_nan_and_inf_rejected():
    with pytest.raises(ConfigError, match="NaN"):
        Config(lr=float("nan")).validate()
    with pytest.raises(ConfigError, match="finite"):
        Config(lr=float("inf")).validate()


def test_wrong_types():
    with pytest.raises(ConfigError, match="steps must be int"):
        Config().set("steps=1.5")
    with pytest.raises(ConfigError, match="lr must be float or none"):
        Config.from_dict({"lr": "fast"})


def test_toml_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('task = "digits"\noptimizer = "sgd"\nlr = 0.05\n[optimizer_args]\nmomentum = 0.9\n'
                 '[task_args]\nmodel = "cnn"\n')
    cfg = Config.from_toml(p).resolve()
    assert (cfg.task, cfg.lr, cfg.optimizer_args["momentum"], cfg.task_args["model"]) == ("digits", 0.05, 0.9, "cnn")


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("task = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(bad)
    unk = tmp_path / "unk.toml"
    unk.write_text("stepz = 3\n")
    with pytest.raises(UnknownNameError, match="unknown key in config file .*unk.toml: 'stepz'. Did you mean 'steps'"):
        Config.from_toml(unk)


def test_config_json_round_trip(tmp_path):
    cfg = Config(task="digits").resolve()
    cfg.save(tmp_path / "c.json")
    again = Config.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again.resolve().to_dict() == Config.from_dict(cfg.to_dict()).resolve().to_dict()


def test_spec_is_typed_frozen_and_resolves_to_the_config_json_form():
    import dataclasses

    from sgdlab.config import RunSpec
    from sgdlab.distributed import NetworkModel
    from sgdlab.privacy import DPOptions

    cfg = Config(task="digits", strategy="diloco", workers=2, network="bandwidth=10G,latency=5ms",
                 strategy_args={"sync_every": 4, "outer_args": {"betas": (0.9, 0.95)}, "outer_optimizer": "adam"},
                 dp="noise=1,clip=0.5,unit=client")
    spec = cfg.spec()
    assert isinstance(spec, RunSpec)
    assert spec.network == NetworkModel(1e10, 5e-3) and spec.network_text == "bandwidth=1e+10,latency=0.005"
    assert spec.dp == DPOptions(noise=1.0, clip=0.5, unit="client") and spec.client_dp is spec.dp
    assert spec.dp_sgd is None
    assert spec.strategy_options.sync_every == 4 and spec.strategy_options.outer_args == {"betas": [0.9, 0.95]}
    assert spec.task_options.model == "mlp" and spec.worker_speeds == (1.0, 1.0) and spec.name == "diloco"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.out = "elsewhere"
    with pytest.raises(TypeError):
        spec.optimizer_args["weight_decay"] = 1.0
    kwargs = spec.optimizer_kwargs()
    assert kwargs["betas"] == [0.9, 0.999] and "lr" not in kwargs
    kwargs["betas"].append(0)  # a fresh copy each time
    assert spec.optimizer_kwargs()["betas"] == [0.9, 0.999]
    assert spec.to_config() == cfg.resolve() and spec.to_dict() == cfg.resolve().to_dict()
    assert Config.from_dict(spec.to_dict()).spec() == spec  # config.json resolves to the same spec
    placed = spec.placed(out="runs/x", device="cpu")
    assert placed.out == "runs/x" and spec.out is None
    assert spec.placed(device="cuda:1").fingerprint() == spec.fingerprint()  # ranks differ only in their device


def test_validate_and_spec_check_the_same_way():
    with pytest.raises(ConfigError, match="dp unit=client: steps=3 < sync_every=5"):
        Config(task="digits", strategy="localsgd", workers=2, steps=3, strategy_args={"sync_every": 5},
               dp="noise=1,clip=1,unit=client").spec()
    Config(device="cuda:3").validate()  # a device is only looked for when the run is resolved


def test_every_setting_has_a_description():
    import dataclasses

    from sgdlab.config import describe

    for f in dataclasses.fields(Config):
        assert f.metadata["help"], f.name
    assert describe("steps") == "optimizer steps; default 300"
    assert describe("lr") == "learning rate; default: the optimizer's registered default"
    assert describe("network").endswith("default: bandwidth=1G,latency=1ms")
    assert describe("io_adamw").endswith("default false")
