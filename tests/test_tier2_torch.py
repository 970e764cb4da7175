"""QSR (localsgd, diloco), DES-LOC, MT-DAO, EDiT and A-EDiT on torch.distributed (3 gloo processes, one torchrun launch)
give the simulator's numbers, sync periods and bytes; a DES-LOC run stopped and resumed on torch ends as
the uninterrupted one."""

import json

import pytest
import torch

from sgdlab.metrics import read_metrics

from .test_torch_backend import COMMON, HERE, _final, assert_matches_sim, torchrun

N = 3
CASES = {
    "localsgd-qsr": dict(strategy="localsgd", optimizer="sgd", schedule="cosine", steps=10,
                         strategy_args={"sync_every": 2, "sync_rule": "qsr,alpha=0.1"}),
    "diloco-qsr": dict(strategy="diloco", optimizer="adamw", lr=1e-3, schedule="cosine", steps=10,
                       strategy_args={"sync_every": 2, "sync_rule": "qsr,alpha=0.0025"}),
    # eps 1e-3: u is averaged at steps where v is not (see the pitfall in sgdlab.strategies.desloc)
    "desloc": dict(strategy="desloc", optimizer="adamw", lr=1e-3, optimizer_args={"eps": 1e-3},
                   strategy_args={"sync_every": 2, "sync_u": 3, "sync_v": 4}),
    "mtdao": dict(strategy="desloc", optimizer="mtdao", lr=1e-3,
                  optimizer_args={"betas": [0.9, 0.99, 0.999], "weights": [0.3, 0.4]},
                  strategy_args={"sync_every": 2, "sync_u": 2, "sync_v": 2, "state_sync": {"exp_avg_2": 6}}),
    # weights from all-gathered norms, clipping that acts (φ small)
    "edit": dict(strategy="edit", optimizer="adamw", lr=1e-3, strategy_args={"sync_every": 2, "clip": 0.05}),
    # A-EDiT: syncs every 0.04 simulated s; the third worker is 2× slower and takes half the steps
    "a-edit": dict(strategy="edit", optimizer="adamw", lr=1e-3, worker_speeds=[1.0, 1.0, 2.0], steps=12,
                   strategy_args={"sync_time": 0.04, "step_weight": True}),
}


@pytest.mark.slow
def test_torch_backend_matches_simulator(tmp_path):
    configs = {name: {**COMMON, **kw, "workers": N} for name, kw in CASES.items()}
    resumed = {**configs["mtdao"], "stop_at": 5}  # before exp_avg_2's first sync at 6
    res = torchrun(N, str(HERE / "dist_script.py"), str(tmp_path / "torch"),
                   json.dumps({**configs, "mtdao-resumed": resumed}))
    assert res.returncode == 0, res.stderr[-3000:]
    m_r, l_r, _ = _final(tmp_path / "torch" / "mtdao-resumed")
    m_f, l_f, _ = _final(tmp_path / "torch" / "mtdao")
    assert l_r == l_f and all(torch.equal(m_r[k], m_f[k]) for k in m_f)
    for name, kw in configs.items():
        s_t, s_s, _ = assert_matches_sim(tmp_path, name, kw)
        assert s_s["bytes_sent_per_worker"] > 0, name
        assert s_t["sim_time_s"] == pytest.approx(s_s["sim_time_s"], rel=1e-9), name
        periods = [[r.get("sync_period") for r in read_metrics(tmp_path / b / name / "metrics.jsonl")]
                   for b in ("torch", "sim")]
        assert periods[0] == periods[1], name
        if name.endswith("qsr"):
            assert max(p for p in periods[0] if p is not None) > 2, name  # the rule lengthened the rounds
