"""DP-SGD and privacy accounting, against the reference values and mechanics in ORACLES.md."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sgdlab import Config, run, tasks
from sgdlab.cli import main
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics
from sgdlab.privacy import DPSGD, DPOptions, PrivateTraining, accounting

from .conftest import TINY_LM

# ---- accounting -----------------------------------------------------------------------------------


def test_rdp_epsilon_matches_reference():
    # Opacus's RDP test value is 7.32911 on its own order grid; dp-accounting's default grid gives 7.3293
    assert accounting.epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.3293, abs=1e-4)
    assert accounting.epsilon(1.5, 0.04, 2250, 1e-5, accountant="rdp") == pytest.approx(7.3293, abs=1e-4)


def test_pld_epsilon_matches_reference():
    assert accounting.epsilon(1.5, 0.04, 2250, 1e-5, accountant="pld") == pytest.approx(6.7688, abs=1e-4)


def test_rdp_of_the_event_at_given_orders():
    # dp-accounting's own test values for the event sgdlab builds (q=0.01, sigma=2.5, 50 steps)
    from dp_accounting.rdp import RdpAccountant

    orders = [1.5, 2.5, 5, 50, 100, np.inf]
    acc = RdpAccountant(orders=orders).compose(accounting.dp_event(2.5, 0.01, 50))
    expected = [6.70579741e-4, 1.08548710e-3, 2.18075656e-3, 2.38460375e-2, 1.67416308e2, np.inf]
    np.testing.assert_allclose(acc._rdp, expected, rtol=1e-4)  # no public getter for the RDP curve


def test_full_batch_gaussian_is_epsilon_one():
    # q = 1, sigma = 4.530877117 is (1, 1e-6)-DP under RDP (dp-accounting's test uses a fine order grid;
    # the default grid reaches the same optimum to 1e-6)
    assert accounting.epsilon(4.530877117, 1.0, 1, 1e-6) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("steps", "expected"), [(2250, 1.416), (2000, 1.3562)])
def test_noise_multiplier_for_target_epsilon(steps, expected):
    # Opacus bisects to within 0.01 in epsilon on its own RDP order grid; sgdlab bisects to 1e-3 in sigma on
    # dp-accounting's grid. Both land within 0.01 of each other (measured: 1.41602 and 1.35645).
    sigma = accounting.noise_multiplier(8.0, 0.04, steps, 1e-5)
    assert sigma == pytest.approx(expected, abs=0.01)
    assert accounting.epsilon(sigma, 0.04, steps, 1e-5) <= 8.0  # the returned sigma never overshoots
    assert accounting.epsilon(sigma - 2e-3, 0.04, steps, 1e-5) > 8.0  # and is within the tolerance


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"noise_multiplier": 0.0}, "noise_multiplier"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"delta": 0.0}, "delta"),
    ({"delta": 1.0}, "delta"),
    ({"accountant": "prv"}, "accountant"),
])
def test_epsilon_rejects_bad_inputs(kwargs, match):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=match):
        accounting.epsilon(**args)


def test_noise_multiplier_rejects_bad_or_unreachable_targets():
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.noise_multiplier(0.0, 0.01, 10, 1e-5)
    with pytest.raises(ValueError, match="not reachable"):
        accounting.noise_multiplier(1e-9, 1.0, 1000, 1e-5)


# ---- per-sample gradients -------------------------------------------------------------------------

TASKS = [("digits", {"model": "mlp", "hidden": 32}), ("digits", {"model": "cnn", "channels": 4}),
         ("charlm", {**TINY_LM, "context": 16}), ("logreg", {}), ("quadratic", {})]


@pytest.fixture(scope="module")
def loaded_tasks():
    return {f"{n}-{i}": tasks.create(n, o, "cpu") for i, (n, o) in enumerate(TASKS)}


@pytest.mark.parametrize("which", range(len(TASKS)))
def test_per_sample_gradients_equal_a_loop_over_single_examples(which, loaded_tasks):
    task = loaded_tasks[f"{TASKS[which][0]}-{which}"]
    torch.manual_seed(0)
    model = task.build_model()
    if TASKS[which][0] == "quadratic":
        with torch.no_grad():  # off the zero start; its gradients are O(10), hence the rtol 1e-5 below
            model.weight.copy_(task.w_opt.float() + 0.05 * torch.randn(model.weight.shape))
    engine = DPSGD(model, task.loss, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=5)
    batch = task.get_batch(torch.tensor([3, 1, 4, 15, 9]))
    grads, losses = engine.per_sample_gradients(batch)
    for i in range(5):
        model.zero_grad()
        one = tuple(t[i:i + 1] for t in batch)
        loss = task.loss(model, one)
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-5)
        for n, p in model.named_parameters():
            # atol 1e-5 (ORACLES.md), plus float32's relative rounding for entries far above 1
            torch.testing.assert_close(grads[n][i], p.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", [0, 2])
def test_no_clipping_no_noise_equals_plain_sgd(which, loaded_tasks):
    task = loaded_tasks[f"{TASKS[which][0]}-{which}"]
    torch.manual_seed(1)
    dp_model = task.build_model()
    plain = task.build_model()
    plain.load_state_dict(dp_model.state_dict())
    batch = task.get_batch(torch.arange(10, 22))
    engine = DPSGD(dp_model, task.loss, noise_multiplier=0.0, max_grad_norm=math.inf, expected_batch_size=12,
                   max_physical_batch=5)  # three micro-batches (5, 5, 2)
    opt_dp = torch.optim.SGD(dp_model.parameters(), lr=0.1)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    dp_loss = engine.backward(batch)
    opt_dp.step()
    loss = task.loss(plain, batch)
    loss.backward()
    opt_plain.step()
    assert dp_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for (n, a), b in zip(dp_model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_clipped_norms_are_at_most_c(clipping, loaded_tasks):
    task = loaded_tasks["digits-0"]
    torch.manual_seed(2)
    model = task.build_model()
    engine = DPSGD(model, task.loss, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=32,
                   clipping=clipping)
    grads, _ = engine.per_sample_gradients(task.get_batch(torch.arange(32)))
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    c = norms.median().item()  # some examples are clipped and some are not
    engine.max_grad_norm = c
    factors = engine.clip_factors(grads)
    clipped = {n: g * factors[n].view(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}
    per_tensor = torch.stack([g.flatten(1).norm(dim=1) for g in clipped.values()])  # (K, B)
    total = per_tensor.norm(dim=0)
    assert (total <= c * (1 + 1e-6)).all()
    if clipping == "flat":
        big = norms > c
        assert big.any() and (~big).any()
        torch.testing.assert_close(total[big], torch.full_like(total[big], c), rtol=1e-4, atol=0)
        torch.testing.assert_close(total[~big], norms[~big])
    else:
        bound = c / math.sqrt(len(grads))
        raw = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()])
        assert (per_tensor <= bound * (1 + 1e-6)).all()
        big = raw > bound
        assert big.any()
        torch.testing.assert_close(per_tensor[big], torch.full_like(per_tensor[big], bound), rtol=1e-4, atol=0)


class _Zero(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))


def _zero_loss(model, batch):
    return (model.weight * 0).sum() + 0 * batch.sum()


def test_noise_on_the_sum_has_std_sigma_c():
    n, sigma, c, expected_batch = 40_000, 1.3, 0.7, 8.0
    model = _Zero(n)
    engine = DPSGD(model, _zero_loss, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=expected_batch)
    engine.backward(torch.ones(6, 3))
    noise = model.weight.grad.double() * expected_batch  # undo the division by the expected batch size
    # 40,000 draws: the sample std has relative standard error 1/sqrt(2n) = 0.35%; 2% is about 6 of those
    assert noise.std().item() == pytest.approx(sigma * c, rel=0.02)
    assert abs(noise.mean().item()) < 5 * sigma * c / math.sqrt(n)
    # an empty Poisson batch: the update is pure noise and the loss estimate is 0
    loss = engine.backward(torch.ones(0, 3))
    assert loss.item() == 0.0 and model.weight.grad.std().item() * expected_batch == pytest.approx(sigma * c, rel=0.02)


def test_poisson_sampling_is_seeded_with_variable_batches():
    def sizes(seed):
        engine = DPSGD(_Zero(3), _zero_loss, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=20,
                       seed=seed)
        sampler = engine.sampler(1000)
        batches = [sampler.next() for _ in range(200)]
        return batches
    a, b, c = sizes(0), sizes(0), sizes(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    lens = torch.tensor([len(x) for x in a], dtype=torch.float64)
    assert len(set(lens.tolist())) > 5  # variable size
    assert lens.mean().item() == pytest.approx(20, abs=5 * math.sqrt(20 * 0.98 / 200))  # Binomial(1000, 0.02)
    assert all(len(x.unique()) == len(x) for x in a)


def test_engine_state_round_trip_reproduces_sampling_and_noise():
    model = _Zero(10)
    engine = DPSGD(model, _zero_loss, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, seed=3)
    sampler = engine.sampler(100)
    sampler.next()
    state = engine.state_dict()
    first = (sampler.next(), engine.backward(torch.ones(2, 1)), model.weight.grad.clone())
    engine.load_state_dict(state)
    second = (sampler.next(), engine.backward(torch.ones(2, 1)), model.weight.grad.clone())
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


# ---- refusals and warnings ------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(8), nn.SyncBatchNorm(8),
                                   nn.InstanceNorm1d(8, track_running_stats=True)])
def test_layers_that_mix_examples_are_refused(layer):
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=rf"layer '1' \({type(layer).__name__}.*GroupNorm or LayerNorm"):
        DPSGD(model, lambda m, b: m(b).sum(), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_groupnorm_and_layernorm_are_accepted():
    model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    engine = DPSGD(model, lambda m, b: m(b).pow(2).mean(), noise_multiplier=0.0, max_grad_norm=math.inf,
                   expected_batch_size=3)
    engine.backward(torch.randn(3, 4))
    assert all(p.grad is not None for p in model.parameters())


def test_delta_at_least_one_over_n_warns(loaded_tasks):
    task = loaded_tasks["digits-0"]
    with pytest.warns(UserWarning, match=r"delta=0\.001 is not below 1/N"):
        PrivateTraining("noise=1.0,clip=1.0,delta=1e-3", task, task.build_model(), steps=10, batch_size=16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrivateTraining("noise=1.0,clip=1.0,delta=1e-5", task, task.build_model(), steps=10, batch_size=16, seed=0)


@pytest.mark.parametrize(("dp", "match"), [
    ("noise=1.0", "clip=C"),
    ("clip=1.0", "exactly one of noise"),
    ("noise=1,target_epsilon=2,clip=1", "exactly one of noise"),
    ("target_epsilon=8,clip=1", "needs delta"),
    ("noise=-1,clip=1", r"dp noise=-1.0 is out of range"),
    ("noise=1,clip=0", "dp clip"),
    ("noise=1,clip=1,delta=1", "dp delta"),
    ("noise=1,clip=1,accountant=prv", "unknown dp accountant 'prv'"),
    ("noise=1,clip=1,clipping=layer", "unknown dp clipping 'layer'.*per_layer"),
    ("noise=1,clip=1,max_physical_batch=0", "max_physical_batch"),
    ("noise=1,clip=1,max_physical_batch=2.5", "must be an integer"),
    ("noise=1,clip=1,sigma=2", "unknown dp key 'sigma'"),
    ("noise=1,clip", "KEY=VALUE"),
    ("noise=abc,clip=1", "must be a number"),
])
def test_bad_dp_settings_are_refused(dp, match):
    with pytest.raises(ConfigError, match=match):
        Config(task="digits", dp=dp).validate()


def test_example_level_dp_with_distributed_strategies_is_refused():
    with pytest.raises(ConfigError, match="runs on one worker.*add unit=client"):
        Config(task="digits", strategy="ddp", workers=2, dp="noise=1,clip=1").validate()


def test_dp_settings_are_canonical_in_the_resolved_config():
    cfg = Config(task="digits", device="cpu").set("dp=noise=1,clip=0.5").resolve()
    assert cfg.dp == ("noise=1.0,clip=0.5,delta=1e-05,accountant=rdp,clipping=flat,max_physical_batch=256,"
                      "grad_sample=auto")
    assert DPOptions.parse(cfg.dp) == DPOptions(noise=1.0, clip=0.5)


# ---- runs -------------------------------------------------------------------------------------------


def _dp_config(tmp_path, name, **kw):
    base = dict(task="digits", optimizer="sgd", lr=0.3, steps=12, batch_size=32, eval_every=4, log_every=2,
                optimizer_args={"momentum": 0.9}, task_args={"hidden": 32}, device="cpu",
                dp="noise=1.1,clip=1.0,delta=1e-4", out=str(tmp_path / name))
    return Config(**{**base, **kw})


def test_dp_run_logs_epsilon_and_resumes_bit_identically(tmp_path):
    full = _dp_config(tmp_path, "full")
    part = _dp_config(tmp_path, "part")
    res = run(full)
    run(part, stop_at=5)
    resumed = run(part, resume=True)
    a = torch.load(Path(full.out) / "checkpoint.pt", weights_only=True)
    b = torch.load(Path(part.out) / "checkpoint.pt", weights_only=True)
    ma, mb = a["workers"][0]["model"], b["workers"][0]["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert torch.equal(a["dp"]["noise_generator"], b["dp"]["noise_generator"])
    strip = [{k: v for k, v in r.items() if k not in ("wall_time_s", "sim_time_s")}
             for r in read_metrics(Path(full.out) / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in ("wall_time_s", "sim_time_s")}
                     for r in read_metrics(Path(part.out) / "metrics.jsonl")]
    evals = [r for r in strip if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    q = 32 / tasks.create("digits", {}, "cpu").num_train
    assert evals[0]["epsilon"] == 0.0
    for r in evals[1:]:
        assert r["epsilon"] == pytest.approx(accounting.epsilon(1.1, q, r["step"], 1e-4))
    s = res.summary
    assert s == json.loads((Path(full.out) / "summary.json").read_text())
    assert s["epsilon"] == evals[-1]["epsilon"] == resumed.summary["epsilon"]
    assert (s["delta"], s["accountant"], s["noise_multiplier"]) == (1e-4, "rdp", 1.1)
    assert s["sample_rate"] == pytest.approx(q)


def test_target_epsilon_calibrates_the_noise_with_any_optimizer(tmp_path):
    cfg = _dp_config(tmp_path, "target", optimizer="adam", lr=1e-3, optimizer_args={}, steps=6, eval_every=0,
                     dp="target_epsilon=2.0,clip=1.0,delta=1e-4,clipping=per_layer,max_physical_batch=7")
    s = run(cfg).summary
    assert s["epsilon"] <= 2.0
    assert s["noise_multiplier"] == pytest.approx(
        accounting.noise_multiplier(2.0, s["sample_rate"], 6, 1e-4), abs=1e-12)
    assert math.isfinite(s["final_val_loss"])


def test_dp_needs_a_task_with_data(tmp_path):
    with pytest.raises(ConfigError, match="DP-SGD needs a task with training examples"):
        run(Config(task="rosenbrock", optimizer="sgd", steps=2, dp="noise=1,clip=1", device="cpu",
                   out=str(tmp_path / "r")))


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_dp_epsilon_and_dp_noise(capsys):
    assert main(["dp-epsilon", "--noise", "1.5", "--sample-rate", "0.04", "--steps", "2250",
                 "--delta", "1e-5"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(7.3293, abs=1e-4)
    assert main(["dp-epsilon", "--noise", "1.5", "--sample-rate", "0.04", "--steps", "2250",
                 "--delta", "1e-5", "--accountant", "pld"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(6.7688, abs=1e-4)
    assert main(["dp-noise", "--target-epsilon", "8", "--sample-rate", "0.04", "--steps", "2250",
                 "--delta", "1e-5"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(1.416, abs=0.01)


@pytest.mark.parametrize(("argv", "match"), [
    (["dp-epsilon", "--noise", "0", "--sample-rate", "0.04", "--steps", "10", "--delta", "1e-5"],
     "noise_multiplier=0.0 is out of range"),
    (["dp-epsilon", "--noise", "1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5"], "sample_rate"),
    (["dp-epsilon", "--noise", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5",
      "--accountant", "gdp"], "unknown accountant 'gdp'"),
    (["dp-noise", "--target-epsilon", "-1", "--sample-rate", "0.04", "--steps", "10", "--delta", "1e-5"],
     "target_epsilon"),
    (["dp-noise", "--target-epsilon", "1", "--sample-rate", "0.04", "--steps", "10", "--delta", "0"], "delta"),
])
def test_cli_dp_bad_inputs(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgdlab: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(match, err)
