"""sgdlab.bench.claims: power iteration against known Hessian spectra; peak memory against known allocations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgdlab.bench.claims import (
    hessian_vector_product,
    load_run_model,
    peak_allocated,
    top_hessian_eigenvalue,
    training_batches,
    training_step_peak,
)
from sgdlab.errors import ConfigError


def _spd(eigs: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_power_iteration_on_a_quadratic_with_known_spectrum():
    a = _spd([5.0, 2.0, 1.0, 0.5, 0.1, 0.01])
    b = torch.randn(6, dtype=torch.float64)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    e = top_hessian_eigenvalue([(lambda: 0.5 * x @ a @ x - b @ x, 1.0)], [x], iters=50)
    assert e.value == pytest.approx(5.0, rel=1e-12)
    assert e.rel_change < 1e-12 and e.iterations == 50
    assert torch.equal(x.detach(), before)  # the parameters are not moved
    # early stop at tol
    e2 = top_hessian_eigenvalue([(lambda: 0.5 * x @ a @ x, 1.0)], [x], iters=200, tol=1e-10)
    assert e2.iterations < 200 and e2.value == pytest.approx(5.0, rel=1e-8)


def test_weighted_batches_give_the_hessian_of_the_weighted_sum_split_over_tensors():
    a1, a2 = _spd([4.0, 1.0, 0.5, 0.2], 1), _spd([3.0, 2.0, 1.0, 0.1], 2)
    x = torch.randn(2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def quad(a):
        return lambda: 0.5 * torch.cat([x, y]) @ a @ torch.cat([x, y])

    h = 0.25 * a1 + 0.75 * a2
    e = top_hessian_eigenvalue([(quad(a1), 0.25), (quad(a2), 0.75)], [x, y], iters=200, tol=1e-14)
    assert e.value == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-10)
    v = [torch.ones(2, dtype=torch.float64), torch.arange(2, dtype=torch.float64)]
    hv = hessian_vector_product([(quad(a1), 0.25), (quad(a2), 0.75)], [x, y], v)
    assert torch.allclose(torch.cat(hv), h @ torch.cat(v), atol=1e-12)


def test_power_iteration_on_a_network_matches_the_dense_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    xb, yb = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def f(w):
        out, i = xb, 0
        ws = []
        for p in params:
            ws.append(w[i:i + p.numel()].view_as(p))
            i += p.numel()
        out = torch.tanh(out @ ws[0].T + ws[1]) @ ws[2].T + ws[3]
        return F.cross_entropy(out, yb)

    dense = torch.autograd.functional.hessian(f, flat)
    eigs = torch.linalg.eigvalsh(dense)
    top = float(eigs[eigs.abs().argmax()])
    e = top_hessian_eigenvalue([(lambda: F.cross_entropy(model(xb), yb), 1.0)], params, iters=500, tol=1e-13)
    assert e.value == pytest.approx(top, rel=1e-6)


def test_power_iteration_rejects_bad_input():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ConfigError, match="iters"):
        top_hessian_eigenvalue([(lambda: (x * x).sum(), 1.0)], [x], iters=0)
    with pytest.raises(ConfigError, match="requires_grad"):
        top_hessian_eigenvalue([(lambda: (x * x).sum(), 1.0)], [torch.zeros(2)])
    with pytest.raises(ConfigError, match="pair"):
        top_hessian_eigenvalue([], [x])


def test_peak_allocated_counts_known_allocations_exactly():
    keep = torch.zeros(1000)  # allocated before: its free is not counted

    def f():
        nonlocal keep
        a = torch.empty(1000, 1000)            # 4.0 MB
        b = torch.empty(500, 1000)             # + 2.0 MB -> 6 MB peak
        del a
        c = torch.empty(250, 1000)             # 2 + 1 MB
        del b, keep
        return c

    peak, c = peak_allocated(f)
    assert peak.peak_bytes == 6_000_000 and peak.end_bytes == 1_000_000 and c.shape == (250, 1000)
    with pytest.raises(ConfigError, match="device"):
        peak_allocated(lambda: None, device="tpu")


def test_training_step_peak_of_a_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from sgdlab.optim.protocol import StepContext

    ctx = StepContext(loss=lambda: model(x).square().mean(), model=model)
    peak = training_step_peak(opt, ctx)
    # at least the output (64x256) and the weight's gradient (256x256), all float32, live together
    assert peak.peak_bytes >= 4 * (64 * 256 + 256 * 256)
    assert peak.end_bytes == 0  # the gradient was freed by zero_grad
    with torch.no_grad():
        infer, _ = peak_allocated(lambda: model(x).square().mean())
    assert 4 * 64 * 256 <= infer.peak_bytes < peak.peak_bytes


def test_load_run_model_restores_the_final_weights(tmp_path):
    import sgdlab

    res = sgdlab.run(sgdlab.Config(task="digits", optimizer="sgd", lr=0.1, steps=5, eval_every=0, device="cpu",
                                   out=str(tmp_path / "r")))
    task, model, spec = load_run_model(res.out)
    assert spec.task == "digits"
    with torch.no_grad():
        assert task.evaluate(model)["val_loss"] == pytest.approx(res.summary["final_val_loss"], rel=1e-6)
    batches = training_batches(task, 3, 100, seed=0)
    assert len(batches) == 3 and batches[0][0].shape == (100, 64)
    with pytest.raises(ConfigError, match="training"):
        training_batches(task, 100, 100)


def test_bench_claims_cli_runs_are_valid_configs_and_bad_input_is_one_line(capsys, tmp_path):
    from sgdlab.bench import claims_runs
    from sgdlab.cli import main
    from sgdlab.config import Config

    groups = claims_runs.configs()
    assert set(groups) == {"sam", "zo", "precond"} and sum(map(len, groups.values())) == 68
    for c in (c for g in groups.values() for c in g):
        Config(task="digits", batch_size=32, name=c["name"], **{k: v for k, v in c.items() if k != "name"}).validate()
        assert claims_runs.command(c).startswith(f"sgdlab run --task digits --optimizer {c['optimizer']} ")
    assert main(["bench", "claims", "train", "--groups", "sam,nope", "--out", str(tmp_path)]) == 2
    assert "--groups 'sam,nope': unknown ['nope']; allowed: sam, zo, precond" in capsys.readouterr().err
    assert main(["bench", "claims", "report", "--out", str(tmp_path / "none")]) == 2
    assert "no such directory; run `sgdlab bench claims train" in capsys.readouterr().err
