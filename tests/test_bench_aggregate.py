"""`sgdlab bench aggregate`: a tiny run through the CLI (n=8, d=1000); every rule's row, its bytes, skips."""

import json

from sgdlab.cli import main
from sgdlab.exchange import aggregators, pre_aggregators

N, D = 8, 1000


def run(tmp_path, capsys, *extra):
    out = tmp_path / "res.json"
    code = main(["bench", "aggregate", "--workers", str(N), "--params", str(D), "--repeats", "2", "--warmup", "1",
                 "--device", "cpu", "--json", str(out), *extra])
    assert code == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_every_rule_is_timed_with_its_bytes(tmp_path, capsys):
    text, res = run(tmp_path, capsys, "--f", "1")
    names = [*aggregators.names(), *pre_aggregators.names()]
    rows = {r["name"]: r for r in res["rows"]}
    assert sorted(rows) == sorted(names) and res["rows"][0]["name"] == "mean"
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for name in names:
        assert any(line.startswith(f"| {name} |") for line in table), text
    for r in rows.values():
        assert r["skipped"] is None and r["ms"] > 0, r
        assert abs(r["vs_mean"] - r["ms"] / rows["mean"]["ms"]) < 1e-9
    # ring all-reduce of 4d bytes vs all-gather of 4d bytes from each worker, hand-computed
    assert rows["mean"]["bytes"] == 2 * (N - 1) / N * 4 * D == 7000
    for name in names:
        if name != "mean":
            assert rows[name]["bytes"] == (N - 1) * 4 * D == 28000 and rows[name]["bytes_vs_mean"] == N / 2
    assert rows["krum"]["spec"] == "krum,f=1,m=1" and rows["nnm"]["spec"] == "nnm,f=1"
    assert rows["bucketing"]["out"] == N // 2


def test_rules_refusing_the_setting_are_skipped(tmp_path, capsys):
    # n=8, f=3: krum needs n > 2f + 2; trimmed mean (n > 2f) and bucketing (no f) still run
    text, res = run(tmp_path, capsys, "--f", "3", "--rules", "krum,trimmed-mean,bucketing")
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["mean", "krum", "trimmed-mean", "bucketing"]
    assert rows["krum"]["ms"] is None and "n > 2f + 2" in rows["krum"]["skipped"]
    assert "| krum | aggregator | krum,f=3,m=1 | skipped: aggregator krum: f=3 with n=8" in text
    assert rows["trimmed-mean"]["ms"] > 0 and rows["bucketing"]["ms"] > 0


def test_unknown_rule(capsys):
    assert main(["bench", "aggregate", "--workers", "4", "--params", "10", "--rules", "krum,nope",
                 "--device", "cpu"]) != 0
    assert "unknown aggregator or pre-aggregator 'nope'" in capsys.readouterr().err
