import json

import pytest
import torch

from sgdlab import optim
from sgdlab.errors import ConfigError, UnknownNameError


def test_create_by_name_matches_torch():
    p1 = [torch.nn.Parameter(torch.ones(3))]
    opt = optim.create("sgd", p1, lr=0.5, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert isinstance(optim.create("adamw", [torch.nn.Parameter(torch.ones(1))]), torch.optim.AdamW)


def test_unknown_name_and_hyperparameter():
    with pytest.raises(UnknownNameError, match="unknown optimizer 'sgdd'.*Did you mean 'sgd'"):
        optim.create("sgdd", [torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(TypeError, match="optimizer 'sgd' has no hyperparameter 'betas'; valid: .*momentum"):
        optim.create("sgd", [torch.nn.Parameter(torch.ones(1))], betas=(0.9, 0.99))


def test_out_of_range_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(ConfigError, match="lr=-0.1 is out of range"):
        optim.create("adam", p, lr=-0.1)
    with pytest.raises(ValueError, match="optimizer 'sgd'.*momentum"):
        optim.create("sgd", p, lr=0.1, momentum=-1.0)
    with pytest.raises(ValueError, match="optimizer 'adam'.*beta"):
        optim.create("adam", p, betas=(1.5, 0.9))


def test_state_bytes_counts_moments():
    p = torch.nn.Parameter(torch.ones(10, 10))
    opt = optim.create("adam", [p])
    p.grad = torch.ones_like(p)
    opt.step()
    # exp_avg + exp_avg_sq (fp32, 100 each) + the step counter (one fp32 scalar)
    assert optim.state_bytes(opt) == 2 * 100 * 4 + 4


@pytest.mark.parametrize("name", optim.registry.names())
def test_every_registered_optimizer_trains_through_the_runner(name, tmp_path):
    from sgdlab import Config, run

    cfg = Config(task="digits", optimizer=name, steps=40, batch_size=32, eval_every=40, out=str(tmp_path / "r"),
                 device="cpu")
    res = run(cfg)
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert res.summary["final_val_loss"] < first, (name, first, res.summary["final_val_loss"])
    again = run(cfg.replace(out=str(tmp_path / "r2")), stop_at=17)
    again = run(cfg.replace(out=str(tmp_path / "r2")), resume=True)
    assert again.summary["final_val_loss"] == res.summary["final_val_loss"]  # resumable, bit for bit


def test_lookahead_by_name_takes_base_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(3))]
    opt = optim.create("lookahead", p, base="sgd", k=3, lr=0.5, momentum=0.9)
    assert opt.k == 3 and opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.5
    assert optim.hyperparameters("lookahead", "sgd")["lr"] == 0.1
    with pytest.raises(TypeError, match="no hyperparameter 'betas'"):
        optim.create("lookahead", p, base="sgd", betas=(0.9, 0.9))


def test_sophia_h_through_attention(tmp_path):
    """Hessian-vector products through scaled_dot_product_attention (no double backward in fused kernels)."""
    from sgdlab import Config, run

    cfg = Config(task="charlm", optimizer="sophia-h", steps=3, batch_size=2, eval_every=0, device="cpu",
                 task_args={"d_model": 16, "n_layers": 1, "n_heads": 2, "context": 16, "max_bytes": 20000,
                            "eval_windows": 2}, optimizer_args={"k": 2}, out=str(tmp_path / "r"))
    assert run(cfg).summary["status"] == "completed"


# ---- compiled kernels (sgdlab.optim._compiled) ----------------------------------------------------------

@pytest.mark.parametrize("compiled", [True, "group"])
def test_compiled_falls_back_to_the_same_update_when_compilation_fails(monkeypatch, compiled):
    from sgdlab.optim import _compiled
    from sgdlab.optim.diffgrad import DiffGrad, _diffgrad_kernel

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_compiled.torch, "compile", broken)
    kernel = _compiled.Kernel(_diffgrad_kernel, "DiffGrad")
    monkeypatch.setattr("sgdlab.optim.diffgrad._DIFFGRAD_KERNEL", kernel)
    torch.manual_seed(0)
    a = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True)]
    b = [a[0].detach().clone().requires_grad_()]
    oa, ob = DiffGrad(a, lr=0.1, compiled=compiled), DiffGrad(b, lr=0.1, compiled=False)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eagerly"):
        for _ in range(3):
            g = torch.randn(5, 4, dtype=torch.float64)
            a[0].grad, b[0].grad = g.clone(), g.clone()
            oa.step()
            ob.step()
    assert kernel.error is not None
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-14)


def test_compiled_is_chosen_by_size_and_validated():
    from sgdlab.optim._compiled import AUTO_MIN_NUMEL, compiled_mode, use_compiled
    from sgdlab.optim.grams import Grams

    small, big = [torch.zeros(10)], [torch.zeros(AUTO_MIN_NUMEL)]
    assert not use_compiled(None, small) and use_compiled(None, big)
    assert use_compiled(True, small) and not use_compiled(False, big)
    assert not use_compiled(True, [torch.zeros(4, 4).t()])  # non-contiguous: the eager paths
    assert compiled_mode(None, big) == compiled_mode(True, small) == compiled_mode("tensor", small) == "tensor"
    assert compiled_mode("group", small) == compiled_mode("group", [torch.zeros(4, 4).t()]) == "group"
    assert compiled_mode(False, big) is None and compiled_mode(None, small) is None
    with pytest.raises(ValueError, match="compiled must be None .*'group'.*got 'yes'"):
        Grams([torch.zeros(2, requires_grad=True)], compiled="yes")
    with pytest.raises(ValueError, match="compiled must be None"):
        Grams([torch.zeros(2, requires_grad=True)]).add_param_group(
            {"params": [torch.zeros(2, requires_grad=True)], "compiled": 1})


def test_adam_and_adamw_are_built_fused_unless_told_otherwise():
    from sgdlab.optim import create

    torch.manual_seed(0)
    m = torch.nn.Linear(6, 3)
    fused = create("adamw", [{"params": m.parameters()}], lr=0.01, weight_decay=0.1)  # a generator in a group
    assert fused.defaults["fused"] is True and len(fused.param_groups[0]["params"]) == 2
    assert create("adam", m.parameters()).defaults["fused"] is True
    assert create("adamw", m.parameters(), foreach=True).defaults["fused"] is None
    assert create("adamw", m.parameters(), fused=False).defaults["fused"] is False
    # same algorithm as torch's for-loop AdamW, to rounding
    a = [p.detach().clone().requires_grad_() for p in m.parameters()]
    b = [p.detach().clone().requires_grad_() for p in m.parameters()]
    oa, ob = create("adamw", a, lr=0.01, weight_decay=0.1), torch.optim.AdamW(b, lr=0.01, weight_decay=0.1,
                                                                              foreach=False)
    for _ in range(10):
        for x, y in zip(a, b, strict=True):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_group_kernel_updates_non_contiguous_parameters_in_place():
    from sgdlab.optim.diffgrad import DiffGrad

    torch.manual_seed(0)
    first = torch.empty_strided((5, 4), (1, 5), dtype=torch.float64).copy_(torch.randn(5, 4))
    a = [first.requires_grad_(), torch.randn(3, dtype=torch.float64, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    assert not a[0].is_contiguous()
    oa, ob = DiffGrad(a, lr=0.1, compiled="group"), DiffGrad(b, lr=0.1, compiled=False)
    for _ in range(3):
        for x, y in zip(a, b, strict=True):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
