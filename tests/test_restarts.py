"""Issue 12 item 9: restarts without a person. ``--resume auto`` continues the run in --out when it holds this
configuration's run with a checkpoint of every process, and starts it otherwise, so the same command line
works for a first start and for every restart torchrun (``--max-restarts N``) makes after a worker died."""

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
from sgdlab.errors import ConfigError
from sgdlab.metrics import read_metrics

from .test_user_errors import assert_tensorboard_equals_metrics


def _losses(out: Path) -> list:
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]


def _model(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["workers"][0]["model"]


def test_resume_auto_starts_continues_and_refuses_another_run(tmp_path):
    cfg = Config(task="digits", optimizer="sgd", lr=0.1, steps=20, batch_size=16, eval_every=5, log_every=5,
                 optimizer_args={"momentum": 0.9}, out=str(tmp_path / "auto"), device="cpu")
    whole = run(cfg.replace(out=str(tmp_path / "whole")))
    assert run(cfg, resume="auto", stop_at=12).summary["status"] == "stopped"  # nothing there: starts
    res = run(cfg, resume="auto")  # continues from the checkpoint at step 12
    assert res.summary["status"] == "completed" and _losses(tmp_path / "auto") == _losses(tmp_path / "whole")
    assert all(torch.equal(a, b) for a, b in zip(_model(tmp_path / "auto").values(),
                                                 _model(tmp_path / "whole").values(), strict=True))
    assert res.summary["final_val_loss"] == whole.summary["final_val_loss"]
    # the same configuration without a checkpoint (died before the first one): started again
    (tmp_path / "auto" / "checkpoint.pt").unlink()
    assert run(cfg, resume="auto").summary["steps"] == 20
    assert _losses(tmp_path / "auto") == _losses(tmp_path / "whole")
    # another configuration's run is never replaced without overwrite
    with pytest.raises(ConfigError, match=r"--resume auto: .* holds another run: cannot change lr when resuming"):
        run(cfg.replace(lr=0.05), resume="auto")
    assert run(cfg.replace(lr=0.05), resume="auto", overwrite=True).config.lr == 0.05
    with pytest.raises(ConfigError, match="resume='maybe'; allowed: true, false or 'auto'"):
        run(cfg, resume="maybe")


def _workers(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun's agent started."""
    pids = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in map(int, pids):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


@pytest.mark.slow
def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_as_if_uninterrupted(tmp_path):
    """torchrun --max-restarts 1 restarts both workers after rank 1 is killed; with --resume auto they go on
    from the newest checkpoint both ranks have, and the run ends bit-identical to one that was never
    interrupted: the steps after that checkpoint are recomputed from the same state, so nothing is lost."""
    steps = 400

    def torchrun(out: Path) -> subprocess.Popen:
        args = ["-m", "sgdlab", "run", "--backend", "torch", "--workers", "2", "--strategy", "diloco",
                "--sync-every", "20", "--task", "digits", "--steps", str(steps), "--eval-every", "200",
                "--checkpoint-every", "50", "--log-every", "10", "--step-time", "0.01", "--timeout", "20",
                "--device", "cpu", "--no-progress", "--tensorboard", "--out", str(out), "--resume", "auto"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--max-restarts=1", "--monitor-interval=0.1", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    procs = [torchrun(killed), torchrun(whole)]  # side by side: the uninterrupted run is the reference
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (killed / "checkpoint.rank1.pt").is_file():
            time.sleep(0.05)
        workers = _workers(procs[0].pid)
        assert (killed / "checkpoint.rank1.pt").is_file() and set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)  # one worker dies mid-run
        at_kill = torch.load(killed / "checkpoint.rank1.pt", weights_only=True)["step"]
        assert at_kill < steps and not (killed / "summary.json").exists()
        results = [p.communicate(timeout=100) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    # torchrun saw rank 1 die (SIGKILL) and restarted the group itself: nobody typed --resume
    assert "failed (exitcode: -9) local_rank: 1" in results[0][1], results[0][1][-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (killed, whole))
    assert a["status"] == "completed" and a["steps"] == steps
    assert a["final_val_loss"] == b["final_val_loss"] and a["final_train_loss"] == b["final_train_loss"]
    assert _losses(killed) == _losses(whole)  # every record, once, as in the uninterrupted run
    for name in ("checkpoint.pt", "checkpoint.rank1.pt"):
        ka = torch.load(killed / name, weights_only=True)["workers"][0]["model"]
        kb = torch.load(whole / name, weights_only=True)["workers"][0]["model"]
        assert all(torch.equal(ka[k], kb[k]) for k in kb), name
    # the restarted run continued (a second event file: the first attempt's, purged past the checkpoint)
    assert len(list(killed.glob("events.out.tfevents.*"))) == 2
    assert_tensorboard_equals_metrics(killed)
