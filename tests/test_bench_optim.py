"""Smoke test of ``sgdlab bench optim`` on tiny parameter sets (1 warm-up step, 1 timed step)."""

from __future__ import annotations

import argparse

import pytest
import torch

from sgdlab.bench import optim as bench


def _tiny(device: torch.device, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    shapes = [(16, 8), (8,), (8, 8), (8,)]
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_bench_optim_table_shape(monkeypatch, capsys):
    monkeypatch.setitem(bench.PARAM_SETS, "10m", _tiny)
    monkeypatch.setitem(bench.PARAM_SETS, "charlm", _tiny)
    names = ["sgd", "adamp", "sophia-h", "lookahead"]  # plain, p_o-compared, closure-needing, wrapper
    args = _parse(["--optimizers", ",".join(names), "--params", "both", "--repeats", "1", "--warmup", "1",
                   "--block-ms", "0", "--device", "cpu"])
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    header, sep, rows = table[0], table[1], table[2:]
    assert [c.strip() for c in header.strip("|").split("|")] == bench.COLUMNS
    assert sep == "|" + "---|" * len(bench.COLUMNS)
    assert len(rows) == 2 * (len(names) + 1)  # every optimizer on both sets, plus the AdamW reference rows
    for row in rows:
        assert len(row.strip("|").split("|")) == len(bench.COLUMNS)
    cells = {(r.split("|")[1].strip(), r.split("|")[2].strip()): r.split("|")[1:-1] for r in rows}
    assert set(cells) >= {(s, n) for s in ("10m", "charlm") for n in names}
    col = {name: i for i, name in enumerate(bench.COLUMNS)}
    assert cells[("10m", "sgd")][col["eager ms"]].strip() != "–"  # sgd has a foreach switch: eager time shown
    assert cells[("10m", "adamp")][col["pytorch_optimizer ms"]].strip() != "–"  # pytorch_optimizer has AdamP
    assert cells[("10m", "sgd")][col["pytorch_optimizer ms"]].strip() == "–"  # ... and no comparison for SGD
    assert cells[("10m", "sophia-h")][col["group ms"]].strip() != "–"  # Sophia has compiled kernels
    assert cells[("10m", "sophia-h")][col["group compile s"]].strip() != "–"
    assert cells[("10m", "sgd")][col["group ms"]].strip() == "–"  # ... torch SGD has none
    assert out.count("median speed-up over pytorch_optimizer") == 3
    assert out.count("of fused AdamW's effective bandwidth") == 2


def test_bench_optim_rejects_bad_input():
    with pytest.raises(ValueError, match="nosuch"):
        bench.main(_parse(["--optimizers", "nosuch", "--params", "charlm"]))
    with pytest.raises(ValueError, match="repeats"):
        bench.main(_parse(["--optimizers", "sgd", "--repeats", "0"]))
