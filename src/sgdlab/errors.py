"""Error types. Every error a user can cause is one of these, with a message that says what is wrong
and what is allowed; the CLI prints the message alone (no traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SgdlabError(Exception):
    """Base class of all errors sgdlab raises on purpose."""


class ConfigError(SgdlabError, ValueError):
    """A configuration value, name or file is invalid."""


class UnknownNameError(ConfigError):
    """A registry name (task, optimizer, strategy, ...) or a config key does not exist."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        valid = sorted(valid)
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid) or '(none)'}.")
        self.kind, self.name, self.valid = kind, name, valid


class DataError(SgdlabError, ValueError):
    """Input data is missing, unreadable or unusable."""


class CheckpointError(SgdlabError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the run."""


class DivergenceError(SgdlabError, RuntimeError):
    """Training produced a non-finite loss."""

    def __init__(self, step: int, loss: float, checkpoint: str | None, what: str = "the loss",
                 hint: str = "Try a smaller --lr, a warm-up (--warmup-steps) or --grad-clip."):
        kept = (f" The last good checkpoint is kept at {checkpoint}." if checkpoint
                else " No checkpoint had been written yet.")
        super().__init__(f"training diverged: {what} is {loss} at step {step}.{kept} {hint}")
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


def check_range(name: str, value, *, low=None, high=None, low_open=False, high_open=False,
                integer=False, error: type[SgdlabError] = ConfigError):
    """Raise ``error`` naming ``name`` unless ``low (<|<=) value (<|<=) high``; returns ``value``."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise error(f"{name} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise error(f"{name} must be a number, got {value!r}")
    if value != value:  # NaN
        raise error(f"{name} must be a number, got NaN")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise error(f"{name}={value!r} is out of range; allowed: {lo}{name}{hi}")
    return value
