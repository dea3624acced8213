"""Decorator registries with a factory and a filtered listing (algorithms, models, datasets, ...)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError, suggest

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        if self.meta.get("summary"):
            return str(self.meta["summary"])
        doc = getattr(self.obj, "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """A named collection: ``@REG.register("name")`` adds, ``REG.get("name")`` looks up with suggestions."""

    def __init__(self, kind: str, hint: str = "", populate: str | tuple[str, ...] | None = None):
        self.kind = kind
        self.hint = hint  # e.g. "see `fedforge list algorithms`"
        self._entries: dict[str, Entry[T]] = {}
        # the modules whose import registers the entries (imported on first use, so that a lower layer can own the
        # registry without importing the layers that fill it, and nothing is registered as a side effect of
        # importing something else)
        self.populated_by: tuple[str, ...] = (populate,) if isinstance(populate, str) else tuple(populate or ())
        self._loaded = not self.populated_by

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            import importlib

            for mod in self.populated_by:
                importlib.import_module(mod)

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return deco

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if name in self._entries and self._entries[name].obj is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = Entry(name, obj, meta)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            hint = f"; {self.hint}" if self.hint else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{suggest(name, self._entries)}{hint}."
            ) from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def names(self, pattern: str | None = None) -> list[str]:
        self._load()
        names = sorted(self._entries)
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        return names

    def entries(self, pattern: str | None = None) -> Iterator[Entry[T]]:
        for n in self.names(pattern):
            yield self._entries[n]
