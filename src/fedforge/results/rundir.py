"""The run directory: resolved config, partition and stats, metrics log, summary, plots. Every write is atomic."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from .._io import atomic_write_bytes, atomic_write_text  # noqa: F401  (this module's atomic writes, re-exported)
from ..errors import ConfigError

STATUS_FILE = "run.json"


def _clean(v: Any) -> Any:
    """JSON without NaN/Infinity (they become null)."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(_clean(obj), indent=indent, sort_keys=False, allow_nan=False)


class RunDir:
    """A run's folder. ``summary.json`` exists only for a run that finished; ``run.json`` says the status."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------------------------------- setup
    @classmethod
    def create(cls, path: str | os.PathLike) -> RunDir:
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"run directory {path} already exists and is not empty; choose another --out.")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_text(self.file(name), dumps(obj) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.file(name), text)

    def set_status(self, status: str, **extra: Any) -> None:
        cur = {}
        if self.file(STATUS_FILE).exists():
            try:
                cur = self.read_json(STATUS_FILE)
            except (OSError, json.JSONDecodeError):
                cur = {}
        cur.update(extra)
        cur["status"] = status
        cur["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write_json(STATUS_FILE, cur)

    @property
    def status(self) -> str | None:
        try:
            return self.read_json(STATUS_FILE).get("status")
        except (OSError, json.JSONDecodeError):
            return None

    # ----------------------------------------------------------------------------------------- metrics
    def write_metrics(self, records: Iterable[dict]) -> Path:
        text = "".join(dumps(r, indent=None) + "\n" for r in records)
        return atomic_write_text(self.file("metrics.jsonl"), text)

    def read_metrics(self) -> list[dict]:
        p = self.file("metrics.jsonl")
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def load_run(path: str | os.PathLike) -> tuple[dict, dict, list[dict]]:
    """(config, summary, metrics) of a finished run directory."""
    import yaml

    rd = RunDir(path)
    if not rd.path.is_dir():
        raise ConfigError(f"{rd.path} is not a run directory.")
    if not rd.file("summary.json").exists():
        status = rd.status or "unknown"
        raise ConfigError(f"{rd.path} has no summary.json (status: {status}); the run did not finish.")
    cfg = yaml.safe_load(rd.file("config.yaml").read_text()) if rd.file("config.yaml").exists() else {}
    return cfg, rd.read_json("summary.json"), rd.read_metrics()
