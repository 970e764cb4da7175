import os
import pickle

import pytest
import torch

from sgdlab import checkpoint
from sgdlab.errors import CheckpointError


def test_round_trip_and_no_temp_files(tmp_path):
    p = tmp_path / "c.pt"
    checkpoint.save({"step": 3, "w": torch.arange(4.0)}, p)
    st = checkpoint.load(p)
    assert st["step"] == 3 and torch.equal(st["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_failed_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    checkpoint.save({"step": 1}, p)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save({"step": 2}, p)
    monkeypatch.undo()
    assert checkpoint.load(p)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_runs_no_code(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"step": 1, "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        checkpoint.load(p)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_corrupt_and_missing(tmp_path):
    p = tmp_path / "c.pt"
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(p)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "none.pt")
