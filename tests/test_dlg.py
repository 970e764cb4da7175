"""DLG / iDLG (sgdlab.leakage.dlg): reconstruction without a defence, failure under DP noise, the iDLG label
rule on constructed cases, the attacker's simulation of each defence against the worker's real update, and
the ``sgdlab attack dlg`` command."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdlab.cli import main
from sgdlab.errors import ConfigError
from sgdlab.leakage import dlg

SMALL = {"hidden": 16}   # a 64-16-16-10 MLP: ~1.5k weights, an attack of a fraction of a second


def small_attack(**kw):
    opts = dlg.DLGOptions(**{"restarts": 2, "iters": 100, "seed": 0, **kw})
    return dlg.attack(opts, SMALL)


def test_undefended_single_image_is_reconstructed():
    r = small_attack()
    assert r["label_accuracy"] == 1.0
    assert r["examples"][0]["mse"] < 1e-6           # bound: pixel-exact (observed ~1e-16)
    assert r["mean_psnr"] > 60
    assert r["grad_distance"] < 1e-10


def test_dp_noise_sigma_1_defeats_the_attack():
    r = small_attack(defence="dp,sigma=1,clip=1")
    assert r["examples"][0]["mse"] > 0.05           # bound: no better than a blurry guess (observed ~0.3)
    clean = small_attack(defence="dp,sigma=0,clip=1")  # clipping alone is no defence: the noise is what defends
    assert clean["examples"][0]["mse"] < 1e-6


def _ce_grads(w: torch.Tensor, b: torch.Tensor | None, h: torch.Tensor, y: torch.Tensor):
    w = w.clone().requires_grad_(True)
    bb = None if b is None else b.clone().requires_grad_(True)
    logits = h @ w.t() + (0 if bb is None else bb)
    loss = F.cross_entropy(logits, y)
    gs = torch.autograd.grad(loss, [w] + ([] if bb is None else [bb]))
    return gs[0], (gs[1] if bb is not None else None)


def test_idlg_label_rule_is_exact_on_constructed_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        c, d = 10, 12
        w = torch.randn(c, d, generator=g, dtype=torch.float64)
        b = torch.randn(c, generator=g, dtype=torch.float64)
        h = torch.relu(torch.randn(1, d, generator=g, dtype=torch.float64)) + 1e-3  # non-negative features
        y = torch.randint(0, c, (1,), generator=g)
        gw, gb = _ce_grads(w, b, h, y)
        assert dlg.idlg_labels(gw, gb, 1).tolist() == y.tolist()        # bias: p_j − 1[j = y]
        gw, _ = _ce_grads(w, None, h, y)
        assert dlg.idlg_labels(gw, None, 1).tolist() == y.tolist()      # rows of ∂ℓ/∂W: (p_j − 1[j = y]) h
    # batches with repeated labels: with a zero last layer p = 1/C exactly, so the counts are exact
    for labels in ([3, 3, 7, 0], [1, 1, 1, 1, 1, 1, 1, 1], [9, 0, 5, 5, 2, 8]):
        y = torch.tensor(labels)
        h = torch.relu(torch.randn(len(labels), 5, generator=g, dtype=torch.float64))
        gw, gb = _ce_grads(torch.zeros(10, 5, dtype=torch.float64), torch.zeros(10, dtype=torch.float64), h, y)
        assert dlg.idlg_labels(gw, gb, len(labels)).tolist() == sorted(labels)


@pytest.mark.parametrize("spec", ["none", "dp,sigma=0,clip=0.05", "dp,sigma=0,clip=100", "local,steps=3,lr=0.5"])
def test_the_attackers_simulation_equals_the_shared_update_at_the_true_batch(spec):
    """Exact equivalence: the attacker's objective is 0 at the truth, i.e. its simulation of clipping (against
    sgdlab's DP-SGD engine) and of local steps (against torch.optim.SGD) is the worker's computation."""
    from sgdlab import tasks

    task = tasks.create("digits", SMALL)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.get_batch(torch.arange(3))
    d = dlg.Defence.parse(spec)
    shared = dlg.shared_update(model, task.loss, batch, d)
    m64 = copy.deepcopy(model).double()
    params = {n: p.detach().requires_grad_(True) for n, p in m64.named_parameters()}
    sim = dlg.simulated_update(m64, params, "digits", [batch[0].double()], batch[1], d)
    for s, t in zip(sim, shared, strict=True):
        torch.testing.assert_close(s.detach().float(), t, rtol=1e-4, atol=1e-6)
    if spec == "dp,sigma=0,clip=0.05":  # the mean of three gradients clipped to 0.05
        assert math.sqrt(sum((t.double() ** 2).sum().item() for t in shared)) <= 0.05 + 1e-6


def test_compressor_defences_go_through_sgdlabs_compressors():
    from sgdlab import tasks
    from sgdlab.exchange.topk import num_kept

    task = tasks.create("digits", SMALL)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.get_batch(torch.arange(2))
    plain = dlg.shared_update(model, task.loss, batch, dlg.Defence.parse("none"))
    n = sum(t.numel() for t in plain)
    sparse = dlg.shared_update(model, task.loss, batch, dlg.Defence.parse("topk,ratio=0.1"))
    assert sum(int((t != 0).sum()) for t in sparse) <= num_kept(0.1, n)
    q = dlg.shared_update(model, task.loss, batch, dlg.Defence.parse("int8"))
    err = max((a - b).abs().max().item() for a, b in zip(q, plain, strict=True))
    top = max(t.abs().max().item() for t in plain)
    assert 0 < err <= top / 127 / 2 + 1e-7          # int8: at most half a step of the block's scale


def test_charlm_soft_one_hot_objective_is_zero_at_the_true_window():
    r = dlg.attack(dlg.DLGOptions(task="charlm", restarts=1, iters=2),
                   {"context": 4, "d_model": 16, "n_heads": 2, "max_bytes": 20_000})
    assert r["truth_distance"] < 1e-10   # the soft embedding P·E of a one-hot P is the real embedding
    assert len(r["examples"][0]["text"]) >= 5 and 0 <= r["label_accuracy"] <= 1


def test_assignment_and_psnr():
    cost = torch.tensor([[5.0, 0.1, 9.0], [0.2, 7.0, 9.0], [9.0, 9.0, 0.3]])
    assert dlg.assign(cost) == [1, 0, 2]
    assert dlg.psnr(0.01) == pytest.approx(20.0) and dlg.psnr(0.0) == pytest.approx(100.0)


@pytest.mark.parametrize("text, match", [
    ("dp,sigma=1", "dp needs sigma=S"), ("dp,sigma=-1,clip=1", "sigma"), ("local", "local needs steps=H"),
    ("local,steps=0", "steps"), ("nope", "unknown defence 'nope'"), ("topk,ratio=2", "ratio"),
    ("powersgd", "never decodes one worker"), ("dp,sigma=1,clip=1,foo=2", "unknown defence dp key")])
def test_bad_defences(text, match):
    with pytest.raises(ConfigError, match=match):
        dlg.Defence.parse(text)


def test_bad_options():
    with pytest.raises(ConfigError, match="batch=9 is out of range"):
        dlg.DLGOptions(batch=9).validate()
    with pytest.raises(ConfigError, match="unknown attack task"):
        dlg.DLGOptions(task="cifar").validate()


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "dlg"
    code = main(["attack", "dlg", "--batch", "2", "--restarts", "1", "--iters", "20", "--set", "hidden=16",
                 "--defence", "int4", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "PSNR" in stdout and "label accuracy" in stdout
    assert (out / "dlg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "dlg.json").read_text())
    assert report["options"]["defence"] == "int4" and len(report["examples"]) == 2
    assert {"mse", "psnr", "label", "recovered_label"} <= set(report["examples"][0])


def test_last_linear():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    assert dlg.last_linear(model)[0] == "2"
    with pytest.raises(ConfigError, match="final nn.Linear"):
        dlg.last_linear(nn.Sequential(nn.ReLU()))
