import pytest
import torch

from sgdlab import Config

TINY_LM = {"d_model": 32, "n_layers": 1, "n_heads": 2, "context": 32, "max_bytes": 60_000, "eval_windows": 8}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_lm_config(tmp_path):
    return Config(task="charlm", optimizer="adamw", lr=3e-3, steps=12, batch_size=8, eval_every=4,
                  log_every=2, task_args=dict(TINY_LM), out=str(tmp_path / "run"), device="cpu")


@pytest.fixture
def digits_config(tmp_path):
    return Config(task="digits", optimizer="sgd", lr=0.1, steps=30, batch_size=16, eval_every=10,
                  log_every=5, optimizer_args={"momentum": 0.9}, out=str(tmp_path / "run"), device="cpu")
