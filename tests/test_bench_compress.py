"""`sgdlab bench compress`: a tiny run through the CLI; rows, their bytes and the JSON."""

import json

import pytest
import torch

from sgdlab.bench import compress
from sgdlab.bench.optim import params_charlm
from sgdlab.cli import main
from sgdlab.exchange import ExchangeSpec, Slot, flatten


def test_bench_compress_charlm_rows_and_bytes(tmp_path, capsys):
    out = tmp_path / "res.json"
    code = main(["bench", "compress", "--params", "charlm", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--compressors", "topk,int8,powersgd", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for name in ("topk", "int8", "powersgd"):
        assert any(line.startswith(f"| {name} |") for line in text.splitlines()), text
    assert "target ≤ 10% of a charlm step" in text
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["topk", "int8", "powersgd"]
    params = params_charlm(torch.device("cpu"), torch.float32)
    shapes = tuple(p.shape for p in params)
    x = flatten([torch.randn(p.shape) for p in params])
    assert res["values"] == x.numel()
    for name in ("topk", "int8"):
        comp = ExchangeSpec(compress=name).stages()[0]
        payload = comp.encode(x, Slot("grad", 0, 0, shapes, 1), 0)
        assert rows[name]["bytes"] == comp.payload_bytes(payload)
        assert rows[name]["ratio"] == pytest.approx(4 * x.numel() / rows[name]["bytes"])
    psgd = ExchangeSpec(compress="powersgd").stages()[0]
    assert rows["powersgd"]["bytes"] == compress.powersgd_bytes(psgd, shapes, x.numel())
    assert rows["powersgd"]["bytes"] < 4 * x.numel()
    for r in rows.values():
        assert r["ms"] > 0 and r["of_step"] == pytest.approx(r["ms"] / res["charlm_step_ms"])
        assert r["meets_target"] == (r["of_step"] <= 0.10)


def test_bench_compress_unknown_compressor(capsys):
    assert main(["bench", "compress", "--params", "charlm", "--compressors", "nope", "--device", "cpu"]) != 0
    assert "unknown compressor 'nope'" in capsys.readouterr().err


def test_bench_ddp_hooks_match_the_compressor():
    import pytest

    from sgdlab.bench.ddp import _hook_for
    from sgdlab.errors import ConfigError

    assert _hook_for("fp32") == ("", 0)
    assert _hook_for("powersgd,rank=4") == ("powersgd", 4)
    assert _hook_for("bf16") == ("bf16", 0)
    for spec in ("topk,ratio=0.1", "powersgd,error_feedback=false", "int8"):
        with pytest.raises(ConfigError, match="no matching hook"):
            _hook_for(spec)
