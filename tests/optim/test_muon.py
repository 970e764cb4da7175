"""Muon against a plain per-parameter transcription of its update, torch.optim.Muon and pytorch_optimizer."""

import math

import pytest
import torch

from sgdlab.optim.muon import Muon, orthogonalize


def ns5(v, steps, eps):
    """Quintic Newton-Schulz on the short side, straight from the formula."""
    x = v / (torch.linalg.norm(v) + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if tall else x


def reference_step(groups, states, sum_momentum=False):
    """One step per parameter: AdamW for ndim < 2 and use_adamw groups, Muon for matrices.

    ``sum_momentum`` uses the blog's form ``B = mu B + g`` (Nesterov ``g + mu B``) instead of the EMA form.
    """
    for group in groups:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            st = states.setdefault(p, {})
            if p.ndim < 2 or group["use_adamw"]:
                b1, b2 = group["adamw_betas"]
                alr = lr * group["adamw_lr_ratio"]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"].item()
                p.mul_(1 - alr * wd)
                st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
                st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                m_hat = st["exp_avg"] / (1 - b1 ** t)
                v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
                p.sub_(alr * m_hat / (v_hat.sqrt() + group["adamw_eps"]))
                continue
            if not st:
                st["momentum_buffer"] = torch.zeros_like(p)
            buf = st["momentum_buffer"]
            if sum_momentum:
                buf = mu * buf + g
                v = g + mu * buf if group["nesterov"] else buf
            else:
                buf = mu * buf + (1 - mu) * g
                v = (1 - mu) * g + mu * buf if group["nesterov"] else buf
            st["momentum_buffer"] = buf
            rows = p.shape[0]
            o = ns5(v.reshape(rows, -1), group["ns_steps"], group["eps"])
            cols = o.shape[1]
            scale = math.sqrt(max(1, rows / cols)) if group["adjust_lr"] == "original" else 0.2 * math.sqrt(
                max(rows, cols))
            p.mul_(1 - lr * wd)
            p.sub_(lr * scale * o.reshape(p.shape))


def make_params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (5, 3), (4, 2, 3, 3), (3, 6), (5, 3), (3, 4), (2,)]
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def groups_of(ps):
    return [dict(params=ps[:3], lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
            dict(params=ps[3:5], lr=0.02, momentum=0.8, weight_decay=0.0, nesterov=False, ns_steps=3,
                 adjust_lr="match_rms_adamw"),
            dict(params=ps[5:], lr=0.03, weight_decay=0.1, use_adamw=True)]


def run_against_reference(opt, ps, ref, sum_momentum, steps=25):
    ref_groups = [dict(opt.defaults, **{k: v for k, v in g.items() if k != "params"}, params=rg)
                  for g, rg in zip(groups_of(ps), [ref[:3], ref[3:5], ref[5:]], strict=True)]
    ref_states = {}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, r in zip(ps[:-1], ref[:-1], strict=True):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        reference_step(ref_groups, ref_states, sum_momentum)
    return ref_states


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference(foreach):
    ps = make_params()
    ref = [p.clone() for p in ps]
    frozen = ps[-1].clone()
    opt = Muon(groups_of(ps), foreach=foreach)
    ref_states = run_against_reference(opt, ps, ref, sum_momentum=False)
    for p, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
        if r in ref_states:
            assert set(opt.state[p]) == set(ref_states[r])
            for k, v in ref_states[r].items():
                torch.testing.assert_close(opt.state[p][k], v, rtol=1e-10, atol=1e-12)
    assert torch.equal(ps[-1], frozen) and ps[-1] not in opt.state


def test_blog_sum_momentum_form_gives_same_steps():
    # The blog's B_t = mu B_{t-1} + g_t is (1 - mu)^{-1} times our EMA buffer; NS is scale invariant
    # (exactly so with a negligible eps), hence identical parameters.
    ps = make_params()
    ref = [p.clone() for p in ps]
    opt = Muon(groups_of(ps), eps=1e-30)
    ref_states = run_against_reference(opt, ps, ref, sum_momentum=True)
    for p, r in zip(ps, ref, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    for p, r in zip(ps[1:3], ref[1:3], strict=True):  # group 0: mu = 0.9
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.1 * ref_states[r]["momentum_buffer"],
                                   rtol=1e-10, atol=1e-12)


def test_orthogonalize_matches_pytorch_optimizer_float64():
    matrix = pytest.importorskip("pytorch_optimizer.optimizer.utils.matrix")
    gen = torch.Generator().manual_seed(3)
    for shape in [(5, 3), (3, 8), (4, 6, 2)]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        # eps enters as ||X|| + eps here and as max(||X||, eps) there; a negligible eps makes both exact.
        theirs = matrix.zero_power_via_newton_schulz_5(x, num_steps=5, eps=1e-30, dtype=torch.float64)
        torch.testing.assert_close(orthogonalize(x, ns_steps=5, eps=1e-30), theirs, rtol=1e-12, atol=1e-12)


def test_orthogonalize_flattens_singular_values():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 48, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(orthogonalize(x))
    # Keller's coefficients trade exactness for speed: singular values land roughly in [0.7, 1.2], not at 1.
    s_in = torch.linalg.svdvals(x)
    assert s_in.max() / s_in.min() > 2.5
    assert s.min() > 0.6 and s.max() < 1.25
    assert orthogonalize(x, ns_dtype="bfloat16").dtype == torch.bfloat16


def two_d_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in [(5, 3), (3, 6), (8, 8), (16, 4)]]


def drive(opts, param_lists, steps=20, seed=6):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i in range(len(param_lists[0])):
            g = torch.randn(param_lists[0][i].shape, generator=gen, dtype=param_lists[0][i].dtype)
            for ps in param_lists:
                ps[i].grad = g.clone()
        for o in opts:
            o.step()


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_bfloat16(adjust_lr, nesterov):
    # torch.optim.Muon (2-D only) always runs NS in bfloat16 and allows no other dtype, so we compare with
    # ns_dtype="bfloat16". Momentum buffers never pass through bfloat16 and agree exactly. Parameters agree to
    # bfloat16 rounding: float32 scalar arithmetic (foreach scaling vs add_ with alpha) differs by ~1e-9, which
    # can flip a bfloat16 rounding of a later NS output by one ulp, i.e. lr * 2^-8 ~ 8e-5 in the step. Hence
    # atol 1e-4; with float32 NS on our side the gap is ~1e-3, so the test does tell the dtypes apart.
    start = two_d_params()
    ours, theirs = [p.clone() for p in start], [p.clone() for p in start]
    kw = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    o1 = Muon(ours, ns_dtype="bfloat16", adjust_lr=adjust_lr, **kw)
    o2 = torch.optim.Muon(theirs, adjust_lr_fn=adjust_lr, **kw)
    drive([o1, o2], [ours, theirs])
    for p, q, s in zip(ours, theirs, start, strict=True):
        assert (p - s).abs().max() > 0.05  # moved well beyond the tolerance
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)
        assert torch.equal(o1.state[p]["momentum_buffer"], o2.state[q]["momentum_buffer"])


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_matches_pytorch_optimizer(adjust_lr):
    # pytorch_optimizer.Muon also always runs NS in bfloat16 and flattens conv weights as we do. Its AdamW groups
    # take an absolute lr (ours: lr * adamw_lr_ratio); with those set equal the trajectories coincide to bfloat16
    # rounding of the NS output (matrices; atol as in the torch test) and to float32 rounding (AdamW on the vector).
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(s, generator=gen) for s in [(5, 3), (3, 6), (4, 2, 3, 3), (7,)]]
    ours, theirs = [p.clone() for p in start], [p.clone() for p in start]
    o1 = Muon(ours, lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype="bfloat16", adjust_lr=adjust_lr,
              adamw_lr_ratio=0.05, adamw_betas=(0.9, 0.95), adamw_eps=1e-10)
    o2 = po.Muon([dict(params=theirs[:3], use_muon=True),
                  dict(params=theirs[3:], use_muon=False, lr=0.02 * 0.05, weight_decay=0.1)],
                 lr=0.02, momentum=0.9, weight_decay=0.1, use_adjusted_lr=adjust_lr == "match_rms_adamw",
                 adamw_betas=(0.9, 0.95), adamw_eps=1e-10)
    drive([o1, o2], [ours, theirs])
    for p, q, s in zip(ours, theirs, start, strict=True):
        assert (p - s).abs().max() > 0.01
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)
