"""Experiment trackers as subscribers of a run session (``--tracker tensorboard|wandb|mlflow``, repeatable).

A tracker receives the run's config when it starts (``start(config, run_dir, resumed)``), every metrics record as
it is written (``log(record)``) and the end of the run (``finish(summary, run_dir, status)``). The back-ends live in
:mod:`fedforge.integrations.trackers`; each imports its library only when it is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from ..registry import Registry


class Tracker(Protocol):
    name: str

    def start(self, config: dict[str, Any], run_dir: Path | None, resumed: bool) -> None: ...
    def log(self, record: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any] | None, run_dir: Path | None, status: str) -> None: ...


TRACKERS: Registry[Any] = Registry("tracker", "choose tensorboard, wandb or mlflow",
                                   populate="fedforge.integrations.trackers")


def open_trackers(names: list[str] | tuple[str, ...] | None) -> list[Tracker]:
    """One tracker per name (each name once), or a :class:`ConfigError` naming the extra to install."""
    out: list[Tracker] = []
    for name in dict.fromkeys(names or []):
        factory = TRACKERS.get(name)
        try:
            out.append(factory())
        except ImportError as e:
            raise ConfigError(f"the {name} tracker needs a library that is not installed ({e}); install it with "
                              f'pip install "fedforge[{name}]".') from None
    return out
