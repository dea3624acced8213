"""Hyper-parameter dataclasses: frozen, typed, reject unknown keys, each field with its meaning and paper value."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..errors import ConfigError, suggest


def hp(default: Any, help: str, **checks: Any) -> Any:
    """A hyper-parameter: default from the paper, a one-line meaning, and range checks.

    checks: ``ge``, ``gt``, ``le``, ``lt`` (bounds), ``choices`` (allowed values), ``integer`` (bool).
    """
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class HyperParams:
    """Base class: subclass with ``hp(...)`` fields. ``from_dict`` validates types, ranges and names."""

    owner: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, owner: str = "") -> "HyperParams":
        values = dict(values or {})
        names = {f.name: f for f in fields(cls)}
        who = owner or cls.owner or "algorithm"
        unknown = [k for k in values if k not in names]
        if unknown:
            k = unknown[0]
            valid = ", ".join(sorted(names)) or "none"
            raise ConfigError(f"{who} has no hyper-parameter '{k}'{suggest(k, names)}; valid: {valid}.")
        coerced = {k: _coerce(who, names[k], v) for k, v in values.items()}
        obj = cls(**coerced)
        for f in fields(cls):
            _check(who, f, getattr(obj, f.name))
        obj.validate(who)
        return obj

    def validate(self, owner: str) -> None:
        """Cross-field checks; raise ConfigError naming the parameter, its range and the paper's default."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cls)]


def _coerce(who: str, f: dataclasses.Field, v: Any) -> Any:
    default = f.default
    try:
        if isinstance(default, bool):
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
                return v.lower() in ("true", "yes", "1")
            raise ValueError
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(v)
        if isinstance(default, float):
            if isinstance(v, bool):
                raise ValueError
            x = float(v)
            if math.isnan(x):
                raise ValueError
            return x
        if isinstance(default, str):
            if not isinstance(v, str):
                raise ValueError
            return v
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise ConfigError(f"{who}: {f.name} must be a {kind}, got {v!r} ({f.metadata.get('help', '')}).") from None
    return v


def _check(who: str, f: dataclasses.Field, v: Any) -> None:
    m = f.metadata
    conds = []
    if "ge" in m:
        conds.append((v >= m["ge"], f">= {m['ge']}"))
    if "gt" in m:
        conds.append((v > m["gt"], f"> {m['gt']}"))
    if "le" in m:
        conds.append((v <= m["le"], f"<= {m['le']}"))
    if "lt" in m:
        conds.append((v < m["lt"], f"< {m['lt']}"))
    if "choices" in m:
        conds.append((v in m["choices"], f"one of {', '.join(map(str, m['choices']))}"))
    if conds and not all(ok for ok, _ in conds):
        rng = " and ".join(desc for _, desc in conds)
        raise ConfigError(f"{who}: {f.name} must be {rng}, got {v}; the paper's default is {f.default} ({m.get('help', '')}).")
