"""Run records on disk: ``metrics.jsonl`` (one JSON object per logged step, written in batches) and
``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the file stays valid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLog:
    """Buffered JSONL writer; ``flush()`` appends the buffered records in one write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._buf: list[str] = []

    def append(self, record: dict[str, Any]) -> None:
        self._buf.append(json.dumps({k: _clean(v) for k, v in record.items()}))

    def flush(self) -> None:
        if self._buf:
            with open(self.path, "a") as f:
                f.write("\n".join(self._buf) + "\n")
            self._buf.clear()

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
