"""QSR (Gu et al., 2023, arXiv:2310.14423) as ``sync_rule`` of localsgd and diloco: the rule against
hand-computed values, α = 0 is the fixed rule bit for bit, H is logged, resume is exact, bad options are
one ConfigError."""

import json
import math
from pathlib import Path

import pytest
import torch

from sgdlab import Config, run
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics
from sgdlab.strategies.qsr import SyncSchedule

BASE = dict(task="digits", optimizer="sgd", lr=0.1, batch_size=16, workers=2, device="cpu", step_time=0.01,
            log_every=1, eval_every=0)


def _cfg(tmp_path, name, **kw):
    return Config(**{**BASE, **kw, "out": str(tmp_path / name)})


def _final(out):
    ck = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    return ck["workers"][0]["model"], read_metrics(Path(out) / "metrics.jsonl")


def _sync_steps(records):
    """The steps after which bytes were sent (the round ends)."""
    out, before = [], 0.0
    for r in records:
        if r["bytes_sent"] > before:
            out.append(r["step"])
        before = r["bytes_sent"]
    return out


def test_rule_table_values():
    # the brief's table: alpha 0.0175; lr 0.008 -> floor(4.78) = 4 = H_base; lr 0.001 -> floor(306.25) = 306
    s = SyncSchedule("qsr,alpha=0.0175", 4)
    assert s.period_at(0, 0.008) == 4 and s.period_at(0, 0.001) == 306
    assert s.period_at(0, 0.0) == 2**63 - 1  # lr 0: never again (no run length known)
    capped = SyncSchedule("qsr,alpha=0.0175", 4, total_steps=100)
    assert capped.period_at(0, 0.001) == 100 and capped.period_at(90, 0.001) == 10 and capped.period_at(100, 1e-4) == 1
    assert SyncSchedule("qsr,alpha=0.0175,gamma=1", 4).period_at(0, 0.001) == 17
    warm = SyncSchedule("qsr,alpha=0.0175", 4, total_steps=100, warmup_steps=10)
    assert warm.period_at(9, 1e-6) == 4 and warm.period_at(10, 0.001) == 90
    assert SyncSchedule("qsr,alpha=0", 4, total_steps=10).period_at(8, 0.001) == 4  # alpha 0: no cap either


@pytest.mark.parametrize("strategy", ["localsgd", "diloco"])
def test_cosine_schedule_rounds_match_hand_computed_values(tmp_path, strategy):
    # lr 0.1, cosine after 4 warm-up steps over 40 steps, H_base 2, alpha 0.2: H = max(2, floor(4 / f^2)) with
    # f = (1 + cos(pi (t - 4) / 36)) / 2 at the round's first step t (0-based), capped at 40 - t.
    #   t=0, 2: warm-up -> 2 | t=4: f=1 -> 4 | t=8: cos 20deg=0.93969, f^2=0.94060 -> 4.25 -> 4
    #   t=12: cos 40deg=0.76604, f^2=0.77973 -> 5.13 -> 5 | t=17: cos 65deg=0.42262, f^2=0.50596 -> 7.91 -> 7
    #   t=24: cos 100deg=-0.17365, f^2=0.17071 -> 23.4 -> 23, capped at 16 -> the last round ends on step 40
    cfg = _cfg(tmp_path, strategy, strategy=strategy, steps=40, schedule="cosine", warmup_steps=4,
               strategy_args={"sync_every": 2, "sync_rule": "qsr,alpha=0.2"})
    run(cfg)
    _, recs = _final(cfg.out)
    assert _sync_steps(recs) == [2, 4, 8, 12, 17, 24, 40]
    period = {r["step"]: r["sync_period"] for r in recs}
    assert [period[s] for s in (1, 2, 4, 8, 12, 17, 24, 39)] == [2, 2, 4, 4, 5, 7, 16, 16]
    # the same from the rule's formula in float64 (independent of the runner's schedule code)
    t, ends = 0, []
    while t < 40:
        f = 1.0 if t < 4 else 0.5 * (1 + math.cos(math.pi * (t - 4) / 36))
        h = 2 if t < 4 else min(max(2, math.floor((0.2 / (0.1 * f)) ** 2)), 40 - t)
        t += h
        ends.append(t)
    assert ends == [2, 4, 8, 12, 17, 24, 40]
    hs = [b - a for a, b in zip([0, *ends], ends, strict=False)]
    assert hs[2:-1] == sorted(hs[2:-1])  # non-decreasing while the LR decays (the last round is capped)


@pytest.mark.parametrize("strategy, optimizer, lr", [("localsgd", "sgd", 0.1), ("diloco", "adamw", 1e-3)])
def test_alpha_zero_is_the_fixed_rule_bit_for_bit(tmp_path, strategy, optimizer, lr):
    common = dict(strategy=strategy, optimizer=optimizer, lr=lr, steps=10, schedule="cosine")
    fixed = _cfg(tmp_path, "fixed", **common, strategy_args={"sync_every": 3})
    qsr = _cfg(tmp_path, "qsr", **common, strategy_args={"sync_every": 3, "sync_rule": "qsr,alpha=0"})
    run(fixed)
    run(qsr)
    (ma, ra), (mb, rb) = _final(fixed.out), _final(qsr.out)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert _sync_steps(ra) == _sync_steps(rb) == [3, 6, 9]  # no sync forced on the last step at alpha 0
    assert "sync_period" not in ra[0] and {r["sync_period"] for r in rb} == {3}


@pytest.mark.parametrize("strategy, optimizer, lr", [("localsgd", "sgd", 0.1), ("diloco", "adamw", 3e-3)])
def test_resume_mid_round_is_bit_identical(tmp_path, strategy, optimizer, lr):
    common = dict(strategy=strategy, optimizer=optimizer, lr=lr, steps=24, schedule="cosine", warmup_steps=2,
                  strategy_args={"sync_every": 2, "sync_rule": f"qsr,alpha={lr * 2.5}"})
    whole, part = _cfg(tmp_path, "whole", **common), _cfg(tmp_path, "part", **common)
    run(whole)
    run(part, stop_at=9)  # rounds end at 2, 8, 17, 24: stopped inside the round of steps 9-17
    run(part, resume=True)
    (ma, ra), (mb, rb) = _final(whole.out), _final(part.out)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    drop = ("wall_time_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]
    assert len(set(_sync_steps(ra))) >= 3 and max(r["sync_period"] for r in ra) > 2
    assert 9 not in _sync_steps(ra) and 9 + 1 not in _sync_steps(ra)  # the stop really was mid-round


def test_set_syntax_and_bad_options(tmp_path):
    cfg = Config(task="digits", strategy="localsgd").set("sync_rule=qsr,alpha=0.02")
    assert cfg.strategy_args == {"sync_rule": "qsr,alpha=0.02"}
    cfg.validate()
    bad = {
        "qsr,alpha=-1": "sync_rule qsr alpha=-1.0 is out of range; allowed: 0.0 <= ",
        "qsr": "sync_rule qsr needs alpha",
        "qsr,alpha=0.1,beta=2": "unknown sync_rule qsr key 'beta'",
        "qsr,alpha=0.1,gamma=0": "gamma=0.0 is out of range",
        "qsr,alpha": "expected key=value items",
        "quadratic": "unknown sync_rule 'quadratic'",
        "fixed,alpha=1": "the fixed rule takes no keys",
    }
    for strategy in ("localsgd", "diloco"):
        for rule, msg in bad.items():
            with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
                Config(task="digits", strategy=strategy, strategy_args={"sync_rule": rule}).validate()
    with pytest.raises(ConfigError, match="streaming-diloco staggers"):
        Config(task="digits", strategy="streaming-diloco", strategy_args={"sync_rule": "qsr,alpha=1"}).validate()
    with pytest.raises(ConfigError, match="dp unit=client accounts for rounds of a fixed sync_every"):
        Config(task="digits", strategy="localsgd", workers=2, steps=60, dp="noise=1,clip=1,unit=client",
               strategy_args={"sync_rule": "qsr,alpha=1"}).validate()


def test_summary_unchanged_by_logging(tmp_path):
    cfg = _cfg(tmp_path, "r", strategy="localsgd", steps=6, strategy_args={"sync_every": 2, "sync_rule": "qsr,alpha=0"})
    run(cfg)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["status"] == "completed"
