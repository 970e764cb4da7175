"""Typed option dataclasses built from untyped input (TOML, ``--set``, Python kwargs)."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError, UnknownNameError


def parse_value(raw: str) -> Any:
    """One ``--set``/spec value: ``"0.9"`` → 0.9, ``"[0.9, 0.95]"`` → [0.9, 0.95], ``"true"`` → True, ``"cnn"``
    → "cnn" (read as a TOML value, else taken as a string)."""
    if "\n" in raw or "\r" in raw:
        raise ConfigError(f"value {raw!r} spans several lines; a value is one line")
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    except RecursionError:
        raise ConfigError(f"value {raw[:40]!r}... is nested too deeply") from None


def _accepts(tp: Any, val: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, val) for a in typing.get_args(tp))
    if tp is type(None):
        return val is None
    if tp is bool:
        return isinstance(val, bool)
    if tp is int:
        return isinstance(val, int) and not isinstance(val, bool)
    if tp is float:
        return isinstance(val, (int, float)) and not isinstance(val, bool)
    if tp is str:
        return isinstance(val, str)
    if origin is dict or tp is dict:
        return isinstance(val, dict)
    if origin is list or tp is list:
        return isinstance(val, (list, tuple))
    return True


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_types(cls: type, values: dict[str, Any], owner: str) -> dict[str, Any]:
    """Check ``values`` against the fields of dataclass ``cls``; ints become floats for float fields."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    out = {}
    for key, val in values.items():
        if key not in hints or key not in names:
            raise UnknownNameError(owner, key, names)
        if not _accepts(hints[key], val):
            raise ConfigError(f"{owner} {key} must be {_type_name(hints[key])}, got {val!r}")
        if hints[key] is float or hints[key] == (float | None):
            if isinstance(val, int) and not isinstance(val, bool):
                try:
                    val = float(val)
                except OverflowError:
                    raise ConfigError(f"{owner} {key} is too large ({len(str(val))} digits); allowed: a finite "
                                      "number") from None
        out[key] = val
    return out


def build_options(cls: type, values: dict[str, Any], owner: str):
    """Instantiate option dataclass ``cls`` from ``values`` (names and types checked, then ``validate()``)."""
    opts = cls(**check_types(cls, values, owner))
    if hasattr(opts, "validate"):
        opts.validate()
    return opts
