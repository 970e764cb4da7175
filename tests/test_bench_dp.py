"""`sgdlab bench dp`: runs on tiny settings, checks its equality test against Opacus, and fails clearly."""

import sys

import pytest

from sgdlab.bench import dp
from sgdlab.cli import main
from sgdlab.errors import ConfigError


def test_bench_dp_without_opacus_times_sgdlab_and_non_private():
    lines = []
    res = dp.bench_model("digits", batch_size=16, steps=1, rounds=2, device="cpu", opacus=False, log=lines.append)
    assert set(res["ms_per_step"]) == {"non-private", "sgdlab", "sgdlab-vmap"}
    assert all(v > 0 for v in res["ms_per_step"].values())
    assert res["ratio_to_nonprivate"] == pytest.approx(res["ms_per_step"]["sgdlab"] / res["ms_per_step"]["non-private"])
    assert any(line.startswith("| sgdlab |") for line in lines)


def test_opacus_gives_sgdlabs_clipped_gradient():
    pytest.importorskip("opacus")
    from sgdlab import tasks

    task = tasks.create("digits", {"model": "cnn"}, "cpu")
    batch = dp._fixed_batch(task, 24)
    for mode in dp.OPACUS_MODES:
        ok, diff = dp.check_against_opacus(task, batch, 24, mode)
        assert ok and diff < 1e-6, (mode, diff)


def test_bench_dp_with_opacus_reports_every_mode():
    pytest.importorskip("opacus")
    lines = []
    res = dp.bench_model("digits", batch_size=16, steps=1, rounds=1, device="cpu", opacus=True, log=lines.append)
    assert {f"opacus-{m}" for m in dp.OPACUS_MODES} <= set(res["ms_per_step"]) | set(res["notes"])
    assert res["opacus_fastest"] in res["ms_per_step"]


def test_bench_dp_bad_input(capsys, monkeypatch):
    assert main(["bench", "dp", "--models", "digit"]) == 2
    assert "unknown bench dp model 'digit'" in capsys.readouterr().err
    assert main(["bench", "dp", "--models", "digits", "--rounds", "0", "--no-opacus"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "opacus", None)  # as if it were not installed
    assert main(["bench", "dp", "--models", "digits"]) == 2
    assert "pip install opacus==1.6.0" in capsys.readouterr().err


def test_fixed_batch_larger_than_the_data_is_refused():
    from sgdlab import tasks

    with pytest.raises(ConfigError, match="larger than"):
        dp._fixed_batch(tasks.create("digits", {"model": "cnn"}, "cpu"), 10**6)
