"""The same strategy code on torch.distributed (gloo, real processes) gives the simulator's numbers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sgdlab import Config, run
from sgdlab.metrics import read_metrics

HERE = Path(__file__).parent
COMMON = dict(task="digits", lr=0.05, steps=8, batch_size=16, eval_every=4, log_every=1, device="cpu",
              step_time=0.01)
STRATEGIES = {
    "ddp": dict(strategy="ddp", optimizer="sgd", optimizer_args={"momentum": 0.9}),
    "localsgd": dict(strategy="localsgd", optimizer="sgd", strategy_args={"sync_every": 2}),
    "diloco": dict(strategy="diloco", optimizer="adamw", lr=1e-3, strategy_args={"sync_every": 4}),
    "streaming": dict(strategy="streaming-diloco", optimizer="adamw", lr=1e-3,
                      strategy_args={"sync_every": 4, "fragments": 2, "overlap": 1, "precision": "int4"}),
    # client-level DP: participation and noise drawn alike on every rank
    "localsgd-dp": dict(strategy="localsgd", optimizer="sgd", strategy_args={"sync_every": 2},
                        dp="noise=0.5,clip=0.1,unit=client,participation=0.5"),
    "diloco-dp": dict(strategy="diloco", optimizer="adamw", lr=1e-3, strategy_args={"sync_every": 4},
                      dp="noise=0.5,clip=0.05,unit=client"),
}


def torchrun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _final(out: Path) -> tuple[list[dict], list[float], dict]:
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    recs = read_metrics(out / "metrics.jsonl")
    return ck["workers"][0]["model"], [r["train_loss"] for r in recs if "train_loss" in r], \
        json.loads((out / "summary.json").read_text())


def assert_matches_sim(tmp_path: Path, name: str, kw: dict) -> tuple[dict, dict, list[float]]:
    """Run ``kw`` in the simulator as ``sim/<name>`` and check it against the torch run ``torch/<name>``: the
    first worker's model (atol 1e-6), the train losses and the bytes. Returns the torch and sim summaries and
    the sim losses."""
    run(Config(**{**kw, "out": str(tmp_path / "sim" / name)}))
    m_t, l_t, s_t = _final(tmp_path / "torch" / name)
    m_s, l_s, s_s = _final(tmp_path / "sim" / name)
    for k in m_s:
        torch.testing.assert_close(m_t[k], m_s[k], atol=1e-6, rtol=0, msg=f"{name}: {k}")
    assert l_t == pytest.approx(l_s, abs=1e-6), name
    assert s_t["bytes_sent_per_worker"] == s_s["bytes_sent_per_worker"], name
    return s_t, s_s, l_s


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_torch_backend_matches_simulator(tmp_path, n):
    configs = {name: {**COMMON, **kw, "workers": n} for name, kw in STRATEGIES.items()}
    resumed = {**configs["streaming"], "stop_at": 5}  # stopped mid-round with an exchange in flight
    res = torchrun(n, str(HERE / "dist_script.py"), str(tmp_path / "torch"),
                   json.dumps({**configs, "streaming-resumed": resumed}))
    assert res.returncode == 0, res.stderr[-3000:]
    m_r, l_r, _ = _final(tmp_path / "torch" / "streaming-resumed")
    m_f, l_f, _ = _final(tmp_path / "torch" / "streaming")
    assert l_r == l_f and all(torch.equal(m_r[k], m_f[k]) for k in m_f)  # torch resume is exact too
    for name, kw in configs.items():
        s_t, s_s, _ = assert_matches_sim(tmp_path, name, kw)
        assert s_t["sim_time_s"] == pytest.approx(s_s["sim_time_s"], rel=1e-9), name
        assert s_t["final_val_loss"] == pytest.approx(s_s["final_val_loss"], abs=1e-6), name
        assert s_t.get("epsilon") == s_s.get("epsilon"), name
        # every rank checkpoints its own worker
        assert (tmp_path / "torch" / name / "checkpoint.rank1.pt").is_file()


@pytest.mark.slow
def test_killed_worker_stops_the_others_and_resume_works(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "sgdlab", "run", "--backend", "torch", "--workers", "2", "--strategy", "diloco", "--task", "digits",
            "--steps", "400000", "--eval-every", "50", "--log-every", "10", "--step-time", "0.01", "--timeout", "20",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint.rank1.pt").is_file():
            time.sleep(0.2)
        assert (out / "checkpoint.rank1.pt").is_file(), "the run never checkpointed"
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2, children
        os.kill(int(children[-1]), signal.SIGKILL)  # one worker process dies
        t0 = time.time()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert time.time() - t0 < 60, "the surviving rank did not stop in time"
        # the killed process (the later-started child) is rank 1; rank 0 names it
        assert "rank 0: lost rank 1 during" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert saved >= 50
    res = torchrun(2, *args[:args.index("--steps") + 1], str(saved + 20), *args[args.index("--steps") + 2:],
                   "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == saved + 20


@pytest.mark.slow
def test_wrapping_a_user_loop(tmp_path):
    res = torchrun(2, str(HERE / "wrap_script.py"), str(tmp_path / "w.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    _check_wrapped_loop(torch.load(tmp_path / "w.pt", weights_only=True))


@pytest.mark.slow
def test_wrapped_loop_restarted_by_torchrun(tmp_path):
    """A worker of a user's loop dies; torchrun --max-restarts 1 restarts both and the new attempt's group
    connects (torchrun keeps its store across attempts: sgdlab prefixes it by the attempt)."""
    res = torchrun(2, "--max-restarts=1", str(HERE / "wrap_script.py"), str(tmp_path / "w.pt"), "die-once")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_wrapped_loop(torch.load(tmp_path / "w.pt", weights_only=True))


def _check_wrapped_loop(got: dict) -> None:
    # reference: SGD on the mean of the two ranks' gradients, from rank 0's initial weights
    torch.manual_seed(100)
    w = torch.nn.Linear(4, 1, bias=False).weight.detach().clone()
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    for _ in range(5):
        grads = []
        for g in gens:
            x = torch.randn(8, 4, generator=g)
            wr = w.clone().requires_grad_()
            (x @ wr.t()).squeeze(1).sub(x.sum(1)).pow(2).mean().backward()
            grads.append(wr.grad)
        w -= 0.1 * (grads[0] + grads[1]) / 2
    torch.testing.assert_close(got["weight"], w, atol=1e-6, rtol=0)
    assert got["bytes"] == 5 * 4 * 4  # 2(N-1)/N x 16 bytes per step, N = 2


@pytest.mark.slow
def test_mismatched_configs_between_ranks_are_refused(tmp_path):
    res = torchrun(2, str(HERE / "mismatch_script.py"), str(tmp_path / "r"), timeout=120)
    assert res.returncode != 0
    assert "run a different configuration" in res.stdout + res.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_wrapping_a_user_loop_with_client_dp(tmp_path):
    from sgdlab.privacy import ClientDP, accounting

    res = torchrun(2, str(HERE / "wrap_dp_script.py"), str(tmp_path / "w.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    # reference: three rounds of DP-FedAvg (2 local SGD steps each) written out, same seed and draws
    cdp = ClientDP(noise_multiplier=0.5, clip=0.05, participation=0.5, num_clients=2, sync_every=2, seed=3)
    torch.manual_seed(0)
    w = torch.nn.Linear(4, 1, bias=False).weight.detach().clone()
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    for r in (1, 2, 3):
        total = torch.zeros_like(w)
        for i, g in enumerate(gens):
            wi = w.clone()
            for _ in range(2):
                x = torch.randn(8, 4, generator=g)
                wr = wi.clone().requires_grad_()
                (x @ wr.t()).squeeze(1).sub(x.sum(1)).pow(2).mean().backward()
                wi = wi - 0.1 * wr.grad
            d = w - wi
            if cdp.participants(r)[i]:
                total += d * min(1.0, 0.05 / d.norm().item())
        w = w - (total + 0.5 * 0.05 * cdp.noise(r, [w])[0]) / (0.5 * 2)
    torch.testing.assert_close(got["weight"], w, atol=1e-6, rtol=0)
    assert got["epsilon"] == pytest.approx(accounting.epsilon(0.5, 0.5, 3, 1e-5))
