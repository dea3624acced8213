"""One way to declare and validate options: dataclass fields made with :func:`option`.

The same declaration serves the run config (:class:`fedforge.config.RunConfig`), every algorithm's hyper-parameters
(:class:`fedforge.core.params.HyperParams`) and ``fedforge synth`` (:class:`fedforge.synth.run.SynthConfig`):

* :func:`option` declares a field: its default, a one-line meaning, and checks (``ge``, ``gt``, ``le``, ``lt``,
  ``choices``; ``finite=False`` admits ±inf; ``flag=False`` keeps it off the command line);
* :func:`coerce` and :func:`check` turn a value from YAML, ``--set`` or the command line into the declared type
  and reject it with one sentence that names the option, the allowed range and the option's meaning;
* :func:`from_mapping` builds a dataclass from a mapping, refusing unknown keys with a suggestion;
* :func:`add_arguments` generates the command-line options, :func:`values_from_args` reads them back.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import math
import typing
from typing import Any, Callable, Iterable, TypeVar

from .errors import ConfigError, suggest

T = TypeVar("T")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def option(default: Any, help: str, *, flag: bool = True, metavar: str | None = None, **checks: Any) -> Any:
    """A declared option: default, one-line meaning and checks (ge, gt, le, lt, choices, finite)."""
    meta = {"help": help, "flag": flag, "metavar": metavar, **checks}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def kind(cls: type, f: dataclasses.Field[Any]) -> tuple[str, bool]:
    """(base type name: bool, int, float, str, list, dict or other; whether None is allowed) of a field."""
    hint = _hints(cls).get(f.name, f.type)
    optional = False
    args = typing.get_args(hint)
    if args and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    origin = typing.get_origin(hint) or hint
    names = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list",
             collections.abc.Sequence: "list", dict: "dict"}
    return names.get(origin, "other"), optional


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)  # each class's annotations in its own module's namespace
        except (NameError, TypeError):  # an annotation that does not resolve: judge by the default's type
            _HINTS[cls] = {f.name: type(f.default) for f in dataclasses.fields(cls)
                           if f.default is not dataclasses.MISSING and f.default is not None}
    return _HINTS[cls]


def _label(owner: str, name: str) -> str:
    return f"{owner}: {name}" if owner else name


def coerce(cls: type, f: dataclasses.Field[Any], value: Any, owner: str = "", label: str | None = None) -> Any:
    """``value`` as the field's declared type, or a :class:`ConfigError` naming the option and its meaning."""
    t, optional = kind(cls, f)
    name = label or _label(owner, f.name)
    help_ = f.metadata.get("help", "")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty ({help_}).")
    try:
        if t == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if t == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, (int, float, str)):
                return int(value)
            raise ValueError
        if t == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if v != v or (math.isinf(v) and f.metadata.get("finite", True)):
                raise ValueError
            return v
        if t == "str":
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            raise ValueError
        if t == "list":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError
            out: list[Any] = []
            for v in items:  # "a,b", ["a", "b"] and ["a,b"] mean the same
                if isinstance(v, str):
                    out.extend(x.strip() for x in v.split(",") if x.strip())
                else:
                    out.append(v)
            return type(f.default)(out) if isinstance(f.default, tuple) else out
        if t == "dict":
            if isinstance(value, dict):
                return value
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        what = "a number" if t == "float" else f"{'an' if t[:1] in 'aeiou' else 'a'} {t}"
        raise ConfigError(f"{name} must be {what}, got {value!r} ({help_}).") from None
    return value


def check(f: dataclasses.Field[Any], value: Any, owner: str = "", label: str | None = None,
          paper_default: bool = False) -> None:
    """The field's range and choice checks; a :class:`ConfigError` says what is allowed."""
    if value is None:
        return
    m = f.metadata
    name = label or _label(owner, f.name)
    if "choices" in m and m["choices"] is not None:
        if value not in m["choices"]:
            paper = f"; the paper's default is {f.default}" if paper_default else ""
            raise ConfigError(f"{name} must be one of {', '.join(map(str, m['choices']))}, got '{value}'{paper}"
                              f"{suggest(str(value), [str(c) for c in m['choices']])}.")
        return
    conds: list[tuple[bool, str]] = []
    tests: tuple[tuple[str, str, Callable[[Any, Any], bool]], ...] = (
        ("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
        ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b))
    for key, op, ok in tests:
        if m.get(key) is not None:
            conds.append((ok(value, m[key]), f"{op} {m[key]}"))
    if conds and not all(ok for ok, _ in conds):
        allowed = " and ".join(desc for _, desc in conds)
        paper = f"; the paper's default is {f.default}" if paper_default else ""
        raise ConfigError(f"{name} must be {allowed}, got {value}{paper} ({m.get('help', '')}).")


def validate_fields(obj: Any, owner: str = "", paper_default: bool = False, flags: bool = False) -> None:
    """Coerce and check every field of a (mutable) dataclass instance in place."""
    for f in dataclasses.fields(obj):
        label = "--" + f.name.replace("_", "-") if flags else None
        value = coerce(type(obj), f, getattr(obj, f.name), owner, label)
        check(f, value, owner, label, paper_default)
        object.__setattr__(obj, f.name, value)


def from_mapping(cls: type[T], values: dict[str, Any] | None, owner: str = "", paper_default: bool = False,
                 what: str = "option") -> T:
    """An instance of dataclass ``cls`` from ``values``: unknown keys refused with a suggestion, every field coerced
    and checked."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in values if k not in fields]
    if unknown:
        k = unknown[0]
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{owner + ' has no' if owner else 'unknown'} {what} '{k}'{suggest(k, fields)}; valid: {valid}.")
    coerced = {k: coerce(cls, fields[k], v, owner) for k, v in values.items()}
    obj = cls(**coerced)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        check(f, getattr(obj, f.name), owner, paper_default=paper_default)
    return obj


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, skip: Iterable[str] = ()) -> None:
    """One ``--kebab-case`` option per field of ``cls`` whose ``flag`` is set. Absent options are not set at all
    (``argparse.SUPPRESS``), so values from a YAML file or the dataclass defaults survive; values are read as text
    and coerced by :func:`coerce`, so the command line, YAML and ``--set`` share one set of rules."""
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True) or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        t, _ = kind(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if f.metadata.get("choices"):
            help_ += f"; one of {', '.join(map(str, f.metadata['choices']))}"
        metavar = f.metadata.get("metavar") or f.name.upper()
        if t == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_)
        elif t == "list":
            parser.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS, metavar=metavar,
                                help=help_ + " (repeatable, or comma-separated)")
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_)


def values_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (those absent are left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}
