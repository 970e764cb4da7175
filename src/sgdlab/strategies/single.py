"""``single``: one worker, no communication — the plain training loop."""

from __future__ import annotations

from .base import Strategy


class Single(Strategy):
    name = "single"
    description = "one worker, no communication: the plain training loop"
