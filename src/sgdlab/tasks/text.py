"""Byte-level language modelling: ``charlm`` (the Python standard library's own source) and ``textfile``.

Examples are windows of ``context + 1`` bytes starting at any position of the training split; the model
predicts each next byte. The loss is in nats per byte; ``val_bits_per_byte`` is the same in bits.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError, check_range
from ..models import ByteTransformer
from .base import Task


@dataclass
class TextOptions:
    context: int = 128        # bytes the model sees
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    max_bytes: int = 2_000_000  # cap on the corpus size (train + validation)
    val_fraction: float = 0.1   # the last fraction of the corpus is the validation split
    eval_windows: int = 64      # validation windows (non-overlapping) per evaluation
    eval_batch: int = 64

    def validate(self) -> None:
        for k in ("context", "d_model", "n_layers", "n_heads", "mlp_ratio", "max_bytes", "eval_windows",
                  "eval_batch"):
            check_range(k, getattr(self, k), low=1, integer=True)
        check_range("val_fraction", self.val_fraction, low=0, high=1, low_open=True, high_open=True)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


class TextFile(Task):
    name = "textfile"
    description = "byte-level transformer LM on a text file given with --data PATH (loss in nats/byte)"
    Options = TextOptions
    unit = "tokens"

    def __init__(self, options: TextOptions, device: torch.device, data: str | None = None):
        super().__init__(options, device, data)
        raw = self.read_corpus()
        o = options
        need = 2 * (o.context + 1)
        n_val = int(len(raw) * o.val_fraction)
        if n_val < o.context + 1 or len(raw) - n_val < o.context + 1 or len(raw) < need:
            raise DataError(f"the corpus has {len(raw)} bytes: too small for context={o.context} and "
                            f"val_fraction={o.val_fraction} (each split needs more than {o.context + 1} bytes)")
        self.sha256 = hashlib.sha256(raw).hexdigest()
        data_t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        self.train = data_t[:len(raw) - n_val].to(device)
        self.val = data_t[len(raw) - n_val:].to(device)
        self._offsets = torch.arange(o.context + 1, device=device)

    def read_corpus(self) -> bytes:
        if not self.data_path:
            raise ConfigError("task textfile needs --data PATH (a text file to train on)")
        path = Path(self.data_path)
        if not path.is_file():
            raise DataError(f"--data {path}: no such file")
        try:
            with open(path, "rb") as f:
                return f.read(self.options.max_bytes)
        except OSError as e:
            raise DataError(f"--data {path}: cannot read it ({e.strerror})") from None

    @property
    def num_train(self) -> int:
        return len(self.train) - self.options.context

    @property
    def tokens_per_example(self) -> int:
        return self.options.context

    def info(self) -> dict:
        return {"num_train": self.num_train, "train_bytes": len(self.train), "val_bytes": len(self.val),
                "data_sha256": self.sha256}

    def build_model(self) -> nn.Module:
        o = self.options
        return ByteTransformer(o.context, o.d_model, o.n_layers, o.n_heads, o.mlp_ratio).to(self.device)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = data[starts.to(self.device)[:, None] + self._offsets].long()
        return w[:, :-1], w[:, 1:]

    def get_batch(self, indices: torch.Tensor | None):
        return self._windows(self.train, indices)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def sampled_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        from ..optim.sophia import gnb_loss

        logits = model(batch[0])
        return gnb_loss(logits), logits.numel() // logits.shape[-1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        o = self.options
        starts = torch.arange(0, len(self.val) - o.context, o.context)[:o.eval_windows]
        was_training = model.training
        model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for chunk in starts.split(o.eval_batch):
            x, y = self._windows(self.val, chunk)
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").double()
        model.train(was_training)
        loss = total.item() / (len(starts) * o.context)
        return {"val_loss": loss, "val_bits_per_byte": loss / math.log(2)}


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, without tests and installed packages."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


class CharLM(TextFile):
    name = "charlm"
    description = ("byte-level transformer LM on the Python standard library's source found on this machine "
                   "(the default task; loss in nats/byte)")

    def read_corpus(self) -> bytes:
        if self.data_path:
            raise ConfigError("task charlm reads the standard library; use --task textfile for --data")
        root = Path(sysconfig.get_paths()["stdlib"])
        parts, size = [], 0
        for f in stdlib_files(root):
            if size >= self.options.max_bytes:
                break
            try:
                b = f.read_bytes()
            except OSError:
                continue
            parts.append(b)
            size += len(b) + 1
        if not parts:
            raise DataError(f"no Python source files found under {root}")
        return b"\n".join(parts)[:self.options.max_bytes]
