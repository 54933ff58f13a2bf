"""Parsing and range checks of run-config and node-config values (`common/config.py`).

Each helper raises ConfigError naming the dashed key and what it accepts.
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A bad config value; the message names the key and what it accepts (safe to send)."""


def dashed(name: str) -> str:
    return name.replace("_", "-")


def undashed(key: str) -> str:
    return key.replace("-", "_")


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def coerce(key: str, value: Any, kind: str) -> Any:
    """A TOML value as `kind` (the field's annotation), or ConfigError naming `key`."""
    key = dashed(key)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
                return _BOOL_WORDS[value.strip().lower()]
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value.strip()
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}={value!r}: expected {_KIND_WORDS.get(kind, kind)}")


_KIND_WORDS = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "str": 'a string (quote it: key="value")',
}


def positive_int(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{dashed(name)}={getattr(cfg, name)}: expected a whole number >= 1")


def at_least_zero(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value >= 0:
            raise ConfigError(f"{dashed(name)}={value}: expected a value >= 0")


def positive_float(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{dashed(name)}={value}: expected a positive number")


def in_range(
    cfg: Any, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    value = getattr(cfg, name)
    ok = (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high
    )
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{dashed(name)}={value}: expected a value in {lo}{low:g}, {high:g}{hi}")


def choice(cfg: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{dashed(name)}={value!r}: expected one of {', '.join(allowed)}")
