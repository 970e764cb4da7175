"""Run records on disk: ``metrics.jsonl`` (one JSON object per logged step, written in batches), the same
numbers as TensorBoard event files when asked (:meth:`MetricsLog.open_tensorboard`), and ``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _clean(v: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the file stays valid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


TENSORBOARD_MISSING = ("tensorboard=true needs the tensorboard package, which is not installed here; install it "
                       "with pip install 'sgdlab[tensorboard]' (or pip install tensorboard)")


def require_tensorboard() -> Any:
    """torch's ``SummaryWriter``, or a :class:`ConfigError` saying how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter


class MetricsLog:
    """Buffered JSONL writer; ``flush()`` appends the buffered records in one write. After
    :meth:`open_tensorboard` every record's numbers also go to TensorBoard: one scalar per key, named as in
    ``metrics.jsonl`` (``train_loss``, ``val_loss``, ``lr``, ``bytes_sent``, ``sim_time_s``, ``epsilon``, ...),
    at the record's ``step``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._buf: list[str] = []
        self._tb: Any = None

    def open_tensorboard(self, logdir: str | Path, purge_step: int | None = None) -> None:
        """Also write TensorBoard event files into ``logdir``; ``purge_step``: a resumed run's first new
        step (TensorBoard then hides what an earlier attempt logged from there on, as ``metrics.jsonl``
        drops it)."""
        self._tb = require_tensorboard()(log_dir=str(logdir), purge_step=purge_step, flush_secs=30)

    def append(self, record: dict[str, Any]) -> None:
        self._buf.append(json.dumps({k: _clean(v) for k, v in record.items()}))
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=step)

    def flush(self) -> None:
        if self._buf:
            with open(self.path, "a") as f:
                f.write("\n".join(self._buf) + "\n")
            self._buf.clear()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (those logged after the checkpoint a resumed run starts from)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line of a killed run
                    break
    return out


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in obj.items()}, indent=2) + "\n")
    tmp.replace(path)
