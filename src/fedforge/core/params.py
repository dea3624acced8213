"""Hyper-parameter dataclasses: frozen, typed, reject unknown keys, each field with its meaning and paper value."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..options import from_mapping, option


def hp(default: Any, help: str, **checks: Any) -> Any:
    """A hyper-parameter (:func:`fedforge.options.option`): default from the paper, a one-line meaning, and range
    checks (``ge``, ``gt``, ``le``, ``lt``, ``choices``)."""
    return option(default, help, **checks)


@dataclass(frozen=True)
class HyperParams:
    """Base class: subclass with ``hp(...)`` fields. ``from_dict`` validates types, ranges and names."""

    owner: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, owner: str = "") -> HyperParams:
        who = owner or cls.owner or "algorithm"
        obj = from_mapping(cls, values, who, paper_default=True, what="hyper-parameter")
        obj.validate(who)
        return obj

    def validate(self, owner: str) -> None:
        """Cross-field checks; raise ConfigError naming the parameter, its range and the paper's default."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cls)]
