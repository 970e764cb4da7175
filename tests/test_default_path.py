"""The default path (issue 16): ``compiled=None`` with a run-length hint (``expect_steps``) compiles the
"group" kernel only where the run repays the compile (``sgdlab.optim._compiled.planned_mode``)."""

from __future__ import annotations

import pytest
import torch

from sgdlab import Config, optim
from sgdlab.errors import ConfigError
from sgdlab.optim import _compiled
from sgdlab.optim._base import expect_steps
from sgdlab.optim._compiled import break_even, planned_mode

CHARLM = (28, 450_000)  # tensors, elements of the charlm model's parameters


# ---- the rule, with the measured constants and with stubbed costs ---------------------------------------

def test_the_rule_picks_the_group_kernel_for_long_runs_only():
    n, numel = CHARLM
    be = break_even(n, numel)
    assert 5_000 < be < 50_000  # measured: 10-40k steps for LaProp, MARS, Grams, SGD-SaI (BENCHMARKS.md)
    assert planned_mode(None, 1000, n, numel, "cpu", True) is None  # a short run: the multi-tensor path
    assert planned_mode(None, be - 1, n, numel, "cpu", True) is None
    assert planned_mode(None, be, n, numel, "cpu", True) == "group"
    assert planned_mode(None, 10**6, n, numel, "cpu", True) == "group"
    assert planned_mode(None, None, n, numel, "cpu", True) is None  # no hint: as before
    # a handful of tiny tensors saves little per step: only very long runs
    assert break_even(4, 256) > 50_000 and planned_mode(None, 20_000, 4, 256, "cpu", True) is None
    # not measured there, several devices, or too big for the group kernel: the rule without a hint
    assert planned_mode(None, 10**9, n, numel, "cuda", True) is None
    assert planned_mode(None, 10**9, n, numel, "cpu", False) is None
    assert planned_mode(None, 10**9, n, _compiled.GROUP_MAX_NUMEL, "cpu", True) is None
    # per-tensor kernels (groups of >= 4M elements) only where they repay their compile; never on an unmeasured
    # device type
    assert planned_mode("tensor", 10, 19, 10_000_000, "cpu", True) is None
    assert planned_mode("tensor", 1000, 19, 10_000_000, "cpu", True) == "tensor"
    assert planned_mode("tensor", 10, 19, 10_000_000, "cuda", True) == "tensor"
    assert planned_mode("tensor", None, 19, 10_000_000, "cpu", True) == "tensor"


def test_the_rule_is_saving_times_steps_against_compile_time(monkeypatch):
    monkeypatch.setattr(_compiled, "GROUP_COMPILE_BASE_S", 1.0)
    monkeypatch.setattr(_compiled, "GROUP_COMPILE_PER_TENSOR_S", 0.0)
    monkeypatch.setattr(_compiled, "GROUP_SAVING_PER_TENSOR_S", 1e-3)
    monkeypatch.setattr(_compiled, "GROUP_SAVING_PER_ELEMENT_S", 0.0)
    # 10 tensors save 10 ms a step: a 1 s compile pays from the 101st step (100 steps save exactly 1 s)
    assert break_even(10, 1000) == 101
    assert planned_mode(None, 100, 10, 1000, "cpu", True) is None
    assert planned_mode(None, 101, 10, 1000, "cpu", True) == "group"
    monkeypatch.setattr(_compiled, "GROUP_COMPILE_BASE_S", 0.0)  # free compiles: every run
    assert planned_mode(None, 1, 10, 1000, "cpu", True) == "group"
    assert planned_mode(None, 0, 10, 1000, "cpu", True) is None  # ... that takes a step


# ---- the seam ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, 2.5, "1000", True, float("nan")])
def test_bad_hints_are_refused(bad):
    opt = optim.create("laprop", [torch.zeros(3, requires_grad=True)])
    with pytest.raises(ConfigError, match=r"expected steps must be None \(unknown\) or a non-negative integer.*got"):
        opt.expect_steps(bad)
    with pytest.raises(ConfigError, match="non-negative integer"):
        expect_steps(torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1), bad)  # checked for any
    assert opt.expected_steps is None


def test_the_hint_reaches_optimizers_inside_wrappers_and_the_runner_sets_it():
    p = [torch.zeros(3, requires_grad=True)]
    look = optim.create("lookahead", p, base="laprop")
    assert expect_steps(look, 5000) is look and look.base_optimizer.expected_steps == 5000
    plain = torch.optim.SGD(p, lr=0.1)
    assert expect_steps(plain, 10) is plain  # torch.optim's own: nothing to set
    opt = optim.create("grams", p)
    assert opt.expect_steps(7) is opt and opt.expected_steps == 7 and opt.expect_steps(None).expected_steps is None

    from sgdlab.distributed import SimGroup
    from sgdlab.runner.build import build_parts

    spec = Config(task="quadratic", optimizer="laprop", lr=0.01, steps=37, batch_size=10, eval_every=0,
                  device="cpu").spec()
    parts = build_parts(spec, SimGroup(1, spec.network))
    assert parts.replicas[0].worker.optimizer.expected_steps == 37


# ---- dispatch: numbers, overrides ---------------------------------------------------------------------------

def _model() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 6), (3,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 4) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _kernels() -> list[_compiled.Kernel]:
    from sgdlab.optim._base import ElementwiseOptimizer

    out, todo = [], [ElementwiseOptimizer]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        k = cls.__dict__.get("kernel")
        if isinstance(k, _compiled.Kernel):
            out.append(k)
    return out


@pytest.fixture
def cheap_compiles(monkeypatch):
    """A compile cost of zero (every hinted run takes the group kernel) and a ``torch.compile`` that records its
    calls and returns the function itself (the kernel's update, run eagerly: no compilation in these tests)."""
    calls: list[str] = []
    for k in _kernels():  # fresh caches, so that nothing compiled elsewhere is used here (or kept from here)
        monkeypatch.setattr(k, "_compiled", {})
        monkeypatch.setattr(k, "error", None)

    def fake_compile(fn, **kw):
        calls.append(fn.__code__.co_name)
        return fn

    monkeypatch.setattr(_compiled, "GROUP_COMPILE_BASE_S", 0.0)
    monkeypatch.setattr(_compiled, "GROUP_COMPILE_PER_TENSOR_S", 0.0)
    monkeypatch.setattr(_compiled.torch, "compile", fake_compile)
    return calls


@pytest.mark.parametrize("name", ["laprop", "sgd-sai", "mars"])
def test_the_hint_changes_no_numbers(cheap_compiles, name):
    a, b, c = _model(), _model(), _model()
    hinted = optim.create(name, a, lr=0.01).expect_steps(10**6)  # long run: the group kernel
    plain = optim.create(name, b, lr=0.01)  # no hint: the multi-tensor path
    short = optim.create(name, c, lr=0.01).expect_steps(0)  # short run: the multi-tensor path as without a hint
    for opt, ps in ((hinted, a), (plain, b), (short, c)):
        _run(opt, ps)
    assert hinted.planned_modes() == {"group"} and short.planned_modes() == {None} and not plain.planned_modes()
    assert cheap_compiles and all(n.endswith(("_over_group", "_over_group_counted")) for n in cheap_compiles)
    for x, y, z in zip(a, b, c, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)  # the fused kernel form: equal to rounding
        assert torch.equal(y, z)  # below the break-even: exactly the path without a hint


def test_compiled_false_and_explicit_modes_override_the_hint(cheap_compiles):
    a, b = _model(), _model()
    off = optim.create("laprop", a, compiled=False).expect_steps(10**9)
    _run(off, a, 2)
    assert not cheap_compiles and not off.planned_modes()  # never compiles
    tensor = optim.create("laprop", b, compiled="tensor").expect_steps(1)  # a 1-step run still gets its kernels
    _run(tensor, b, 2)
    assert cheap_compiles == ["_laprop_kernel"] and not tensor.planned_modes()
    c = _model()
    group = optim.create("laprop", c, compiled="group").expect_steps(0)
    _run(group, c, 2)
    assert cheap_compiles[-1].endswith("_over_group_counted")


def test_a_kernel_that_failed_to_compile_falls_back_to_the_multi_tensor_path(monkeypatch, cheap_compiles):
    from sgdlab.optim.laprop import LaProp

    def broken(fn, **kw):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_compiled.torch, "compile", broken)
    monkeypatch.setattr(LaProp, "kernel", _compiled.Kernel(LaProp.kernel.fn, "LaProp"))
    a, b = _model(), _model()
    hinted = LaProp(a, lr=0.01).expect_steps(10**6)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        _run(hinted, a, 4)  # the first step runs the kernel's update eagerly, the next ones the multi-tensor path
    assert hinted.kernel.error and hinted._planned(hinted.param_groups[0], a, None) is None
    plain = LaProp(b, lr=0.01)
    _run(plain, b, 4)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_one_real_group_compile_gives_the_same_numbers(monkeypatch):
    """The only real compile here: two small float64 tensors, the hint of a long run."""
    for k in _kernels():
        monkeypatch.setattr(k, "_compiled", {})
    monkeypatch.setattr(_compiled, "GROUP_COMPILE_BASE_S", 0.0)
    monkeypatch.setattr(_compiled, "GROUP_COMPILE_PER_TENSOR_S", 0.0)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(4, 3), (3,)]]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    hinted = optim.create("grams", a, lr=0.01).expect_steps(10**6)
    plain = optim.create("grams", b, lr=0.01)
    _run(hinted, a, 3)
    _run(plain, b, 3)
    assert hinted.planned_modes() == {"group"} and hinted.kernel.error is None
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_bench_counts_the_compile_in_the_amortised_time():
    from sgdlab.bench.optim import Contender, amortised

    c = Contender("x", None, lambda: None, times=[1e-3, 1e-3, 2e-3], first=5.001)  # a 5 s compile
    assert amortised(c, 1000) == pytest.approx((5.0 + 1.0) / 1000)
    c.warm = [5.001, 0.501, 1e-3]  # and a recompile in the second warm-up step
    assert amortised(c, 1000) == pytest.approx((5.5 + 1.0) / 1000)
    c.warm = [0.0]  # a first step faster than the median counts nothing
    assert amortised(c, 10) == pytest.approx(1e-3)


def test_every_registered_optimizer_takes_the_hint(cheap_compiles):
    """A long-run hint on each registered optimizer that takes plain ``backward(); step()``: it steps, and its
    numbers are those without the hint (to rounding, the group kernels' fused form)."""
    from sgdlab.optim import protocol

    checked = 0
    for name in optim.registry.names():
        a, b = _model(), _model()
        try:
            hinted, plain = optim.create(name, a), optim.create(name, b)
        except (TypeError, ValueError):  # needs arguments of its own (a base optimizer, a model)
            continue
        if not protocol.needs(hinted).plain:
            continue
        assert expect_steps(hinted, 10**6) is hinted
        _run(hinted, a, 3)
        _run(plain, b, 3)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=name)
        checked += 1
    assert checked >= 20


def test_bench_names_the_path_the_hint_picked(cheap_compiles):
    from sgdlab.bench.optim import planned_label

    a = _model()
    look = optim.create("lookahead", a, base="laprop")
    assert planned_label(look) == "as default"  # no step yet
    expect_steps(look, 10**6)
    _run(look, a, 1)
    assert planned_label(look) == "group"
    short = optim.create("grams", _model()).expect_steps(0)  # (compiles cost nothing here)
    _run(short, short.param_groups[0]["params"], 1)
    assert planned_label(short) == "not compiled"
    assert planned_label(torch.optim.SGD(a, lr=0.1)) == "as default"
