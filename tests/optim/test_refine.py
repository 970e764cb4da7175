"""Tests for sgdlab.optim.refine (Defazio, Cutkosky, Mehta & Mishchenko, arXiv:2310.07831) and the runner's
``--schedule refined``."""

import json
import math

import numpy as np
import pytest

from sgdlab import run
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics
from sgdlab.optim.refine import grad_norms_of, refined_factors, refined_schedule


def reference(norms, tau=0.1, power=2.0):
    """The paper's closed form with the authors' smoothing, written as plain loops (median by sorting)."""
    n = len(norms)
    width = 2 * (int(tau * n) // 2) + 1
    pad = 2 * width
    ext = list(norms)
    for j in range(pad):  # numpy's "reflect" (the edge not repeated), pad < n here
        ext.append(norms[n - 2 - j])
    half = width // 2
    smooth = []
    for t in range(n):
        window = [ext[min(max(i, 0), len(ext) - 1)] for i in range(t - half, t + half + 1)]  # "nearest" edges
        smooth.append(sorted(window)[half])
    w = [g ** -power for g in smooth]
    sched = [w[t] * sum(w[t + 1:]) for t in range(n)]
    peak = max(sched)
    return [s / peak for s in sched]


def test_matches_reference():
    gen = np.random.default_rng(0)
    norms = list(np.exp(gen.normal(size=200)) * np.linspace(3, 1, 200))
    np.testing.assert_allclose(refined_schedule(norms), reference(norms), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(refined_schedule(norms, power=1.0), reference(norms, power=1.0), rtol=1e-12)


def test_constant_norms_give_linear_decay():
    for n in (2, 7, 100):
        np.testing.assert_allclose(refined_schedule([3.0] * n), [(n - 1 - t) / (n - 1) for t in range(n)],
                                   rtol=1e-12, atol=1e-15)


def test_scaling_the_norms_changes_nothing_and_the_end_is_zero():
    gen = np.random.default_rng(1)
    norms = list(gen.uniform(0.5, 2.0, size=150))
    a, b = refined_schedule(norms), refined_schedule([37.0 * g for g in norms])
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert a[-1] == 0.0 and min(a) >= 0.0 and max(a) == 1.0


def test_non_decreasing_norms_give_a_non_increasing_schedule():
    norms = list(np.linspace(1.0, 5.0, 120) ** 2)
    s = refined_schedule(norms)
    assert all(x >= y - 1e-15 for x, y in zip(s[:-1], s[1:], strict=True))


def test_decreasing_norms_give_a_warm_up():
    """Large early gradients (the usual case) make the refined schedule rise first: a warm-up."""
    norms = list(10.0 * np.exp(-np.linspace(0, 4, 300)) + 1.0)
    s = refined_schedule(norms)
    assert s[0] < 0.5 and np.argmax(s) > 10


def test_bad_norms_are_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        refined_schedule([1.0])
    with pytest.raises(ConfigError, match="positive"):
        refined_schedule([1.0, 0.0, 2.0])


def test_norms_from_a_run_directory(tmp_path):
    recs = [{"step": 2, "grad_norm": 1.0}, {"step": 4, "grad_norm": 3.0}, {"step": 4, "val_loss": 1.0},
            {"step": 5, "grad_norm": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert grad_norms_of(tmp_path) == [1.0, 1.0, 3.0, 3.0, 2.0]
    np.testing.assert_allclose(refined_factors(str(tmp_path), 9), refined_schedule(
        np.interp(np.linspace(0, 1, 9), np.linspace(0, 1, 5), [1.0, 1.0, 3.0, 3.0, 2.0])), rtol=1e-12)
    with pytest.raises(ConfigError, match="does not exist"):
        grad_norms_of(tmp_path / "nowhere")


def test_the_runner_logs_grad_norms_and_refines_from_them(tmp_path, digits_config):
    first = digits_config.replace(steps=20, log_every=1, eval_every=0, schedule="linear", out=str(tmp_path / "a"))
    run(first)
    recs = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "grad_norm" in r]
    assert len(recs) == 20 and all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in recs)
    second = first.replace(schedule="refined", out=str(tmp_path / "b")).set(f"refine_from={tmp_path / 'a'}")
    run(second)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "lr" in r]
    want = refined_schedule([r["grad_norm"] for r in recs])
    np.testing.assert_allclose(lrs, [0.1 * f for f in want], rtol=1e-9)
    with pytest.raises(ConfigError, match="refine_from"):
        first.replace(schedule="refined").validate()
    with pytest.raises(ConfigError, match="does not exist"):
        first.replace(schedule="refined", refine_from=str(tmp_path / "missing")).validate()
