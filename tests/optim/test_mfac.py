"""M-FAC against a direct solve of the damped empirical Fisher and an unrolled Sherman-Morrison loop (float64)."""

import pytest
import torch

from sgdlab import optim
from sgdlab.errors import ConfigError
from sgdlab.optim.mfac import MFAC

DT = torch.float64


def fisher_solve(window: list[torch.Tensor], g: torch.Tensor, m: int, damp: float) -> torch.Tensor:
    """(damp I + (1/m) sum g_i g_i^T)^{-1} g, the window padded with zero rows to m."""
    d = g.numel()
    gmat = torch.zeros(m, d, dtype=DT)
    for i, row in enumerate(window[-m:]):
        gmat[i] = row
    f = damp * torch.eye(d, dtype=DT) + gmat.T @ gmat / m
    return torch.linalg.solve(f, g)


def sherman_morrison(window: list[torch.Tensor], g: torch.Tensor, m: int, damp: float) -> torch.Tensor:
    """The paper's recursion H_k = H_{k-1} - H g g^T H / (m + g^T H g) from H_0 = I / damp."""
    h = torch.eye(g.numel(), dtype=DT) / damp
    for row in window[-m:]:
        hg = h @ row
        h = h - torch.outer(hg, hg) / (m + row @ hg)
    return h @ g


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=gen, dtype=DT), torch.randn(5, generator=gen, dtype=DT)]


def _grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 4, generator=gen, dtype=DT), torch.randn(5, generator=gen, dtype=DT)]
            for _ in range(steps)]


@pytest.mark.parametrize("m, damp", [(4, 0.1), (1, 0.5), (3, 1e-4)])
def test_step_is_the_inverse_fisher_times_the_gradient(m, damp):
    params = _params()
    opt = MFAC(params, lr=1.0, ngrads=m, damp=damp)
    window = []
    for gs in _grads(9):  # more steps than m: the ring buffer wraps
        flat = torch.cat([g.reshape(-1) for g in gs])
        window.append(flat)
        before = torch.cat([p.reshape(-1) for p in params])
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        after = torch.cat([p.reshape(-1) for p in params])
        expected = fisher_solve(window, flat, m, damp)
        torch.testing.assert_close(before - after, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(expected, sherman_morrison(window, flat, m, damp), rtol=1e-9, atol=1e-12)


def test_one_gradient_window_closed_form():
    p = torch.zeros(6, dtype=DT)
    opt = MFAC([p], lr=1.0, ngrads=1, damp=0.3)
    g = torch.arange(1.0, 7.0, dtype=DT)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(-p, g / (0.3 + g @ g), rtol=1e-12, atol=0)


def test_large_damping_is_sgd_with_lr_over_damp():
    p = torch.zeros(5, dtype=DT)
    opt = MFAC([p], lr=1.0, ngrads=4, damp=1e8)
    g = torch.linspace(-1, 1, 5, dtype=DT)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(-p * 1e8, g, rtol=1e-6, atol=0)


def test_momentum_weight_decay_groups_and_maximize_follow_the_rule():
    params = _params()
    groups = [{"params": [params[0]], "lr": 0.1, "momentum": 0.8, "weight_decay": 0.05},
              {"params": [params[1]], "lr": 0.02, "maximize": True}]
    opt = MFAC(groups, ngrads=3, damp=0.2)
    ref = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    window = []
    for gs in _grads(6, seed=3):
        eff = [gs[0] + 0.05 * ref[0], -gs[1]]  # weight decay folded in; maximize negates
        flat = torch.cat([g.reshape(-1) for g in eff])
        window.append(flat)
        u = fisher_solve(window, flat, 3, 0.2)
        u0, u1 = u[:12].reshape(3, 4), u[12:]
        bufs[0] = 0.8 * bufs[0] + 0.2 * u0
        ref[0] = ref[0] - 0.1 * bufs[0]
        ref[1] = ref[1] - 0.02 * u1
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        for p, q in zip(params, ref, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_splitting_the_parameters_does_not_change_the_steps():
    """The Fisher is over all parameters together (one global window), however they are split."""
    whole = torch.zeros(17, dtype=DT)
    parts = [torch.zeros(12, dtype=DT), torch.zeros(5, dtype=DT)]
    opt_w, opt_p = MFAC([whole], lr=0.5, ngrads=3, damp=0.1), MFAC(parts, lr=0.5, ngrads=3, damp=0.1)
    for gs in _grads(5):
        flat = torch.cat([g.reshape(-1) for g in gs])
        whole.grad = flat.clone()
        parts[0].grad, parts[1].grad = flat[:12].clone(), flat[12:].clone()
        opt_w.step()
        opt_p.step()
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-10, atol=1e-13)


def test_a_parameter_without_gradient_enters_the_window_as_zeros_and_stays():
    params = _params()
    opt = MFAC(params, lr=1.0, ngrads=3, damp=0.1)
    window = []
    for k, gs in enumerate(_grads(4)):
        if k == 2:
            gs = [gs[0], torch.zeros(5, dtype=DT)]
        flat = torch.cat([g.reshape(-1) for g in gs])
        window.append(flat)
        before = [p.clone() for p in params]
        params[0].grad = gs[0].clone()
        params[1].grad = None if k == 2 else gs[1].clone()
        opt.step()
        expected = fisher_solve(window, flat, 3, 0.1)
        torch.testing.assert_close(before[0] - params[0], expected[:12].reshape(3, 4), rtol=1e-9, atol=1e-12)
        if k == 2:
            assert torch.equal(before[1], params[1])


def test_float32_with_float64_coefficients_is_close_to_float64():
    p64 = torch.zeros(20, dtype=DT)
    p32 = torch.zeros(20, dtype=torch.float32)
    o64 = MFAC([p64], lr=1.0, ngrads=8, damp=1e-3)
    o32 = MFAC([p32], lr=1.0, ngrads=8, damp=1e-3, coef_dtype="float64")
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        g = torch.randn(20, generator=gen, dtype=DT)
        p64.grad, p32.grad = g.clone(), g.float()
        o64.step()
        o32.step()
    torch.testing.assert_close(p32.double(), p64, rtol=5e-3, atol=1e-3)  # (g - G^T z) / damp cancels in fp32


def test_state_layout_and_memory():
    params = _params()
    opt = optim.create("mfac", params, ngrads=16)
    for p, g in zip(params, _grads(1)[0], strict=True):
        p.grad = g
    opt.step()
    assert opt.state[params[0]]["grad_window"].shape == (16, 12)
    assert optim.state_bytes(opt) == 16 * 17 * 8
    assert opt.state_dict()["mfac"]["dots"].shape == (16, 16)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(ngrads=0), r"ngrads=0"), (dict(ngrads=2.5), r"ngrads must be an integer"), (dict(damp=0.0), r"damp=0\.0"),
    (dict(damp=-1.0), r"damp"), (dict(momentum=1.0), r"momentum=1\.0"), (dict(weight_decay=-0.1), r"weight_decay"),
    (dict(lr=-1.0), r"lr=-1\.0"), (dict(coef_dtype="half"), r"coef_dtype"), (dict(maximize=1), r"maximize")])
def test_bad_hyperparameters_are_config_errors_naming_them(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MFAC([torch.zeros(3, requires_grad=True)], **kwargs)
    with pytest.raises(ConfigError, match=pattern.split("=")[0].split(" ")[0]):
        optim.create("mfac", [torch.zeros(3, requires_grad=True)], **kwargs)


def test_a_foreign_state_dict_is_refused():
    opt = MFAC([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ConfigError, match="mfac"):
        opt.load_state_dict(torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1).state_dict())
