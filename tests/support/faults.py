"""Test-only fault injection around a real run, through the run session's wrapping seams
(:class:`fedforge.core.simulation.SessionHooks`): the library itself holds no test points.

Points (``NAME:N`` means the N-th time in this process):

* ``client:N``: before the N-th local update is handed to the executor (train tasks, counted over rounds);
* ``round:N``: when the N-th round starts;
* ``checkpoint-write:N``: half-way through the data of the N-th checkpoint file;
* ``checkpoint-rename:N``: after the N-th checkpoint file is in place, before the manifest points at it.

``die`` kills the process there with SIGKILL; ``pause`` prints ``fedforge-test: paused at POINT`` on stderr and waits
(until the run is asked to stop, at most 60 s) so that a test can send a signal. ``nan_at=(round, client)`` puts a
NaN into that client's first uploaded float tensor.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from fedforge.core.checkpoint import CheckpointWriter
from fedforge.core.executors import Executor
from fedforge.core.simulation import SessionHooks


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # SIGKILL is delivered asynchronously; never go on


class _Points:
    def __init__(self, die: str | None, pause: str | None):
        self.die, self.pause = _parse(die), _parse(pause)
        self.hits: dict[str, int] = {}
        self.session: Any = None

    def hit(self, point: str) -> None:
        n = self.hits[point] = self.hits.get(point, 0) + 1
        if self.die == (point, n):
            _die()
        if self.pause == (point, n):
            print(f"fedforge-test: paused at {point}:{n}", file=sys.stderr, flush=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (self.session and self.session.stop_requested):
                time.sleep(0.02)


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, n = spec.partition(":")
    return name, int(n or 1)


class _Wrapped(Executor):
    """An executor that counts the train tasks it is handed and can corrupt one upload."""

    def __init__(self, inner: Executor, points: _Points, nan_at: tuple[int, int] | None):
        super().__init__(inner.workers, inner.threads)
        self.inner, self.points, self.nan_at, self.name = inner, points, nan_at, inner.name

    def start(self, spec: Any) -> None:
        self.inner.start(spec)

    def close(self) -> None:
        self.inner.close()

    def imap(self, tasks: Iterable[Any]) -> Iterator[Any]:
        return self.inner.imap(tasks)

    def map(self, tasks: Iterable[Any]) -> list[Any]:
        rounds = set()

        def counted() -> Iterator[Any]:
            for t in tasks:
                self.points.hit("client")
                if self.points.session is not None and self.points.session.stop_requested:
                    return
                rounds.add(t.round)
                yield t

        out = self.inner.map(counted())
        if self.nan_at and self.nan_at[0] in rounds:
            for r in out:
                if getattr(r, "cid", None) == self.nan_at[1] and getattr(r, "upload", None):
                    k = next(k for k, v in r.upload.items() if v.is_floating_point() and v.numel())
                    v = r.upload[k].clone()
                    v.view(-1)[0] = float("nan")
                    r.upload[k] = v
        return out


class _Rounds:
    def __init__(self, points: _Points):
        self.points = points

    def round_started(self, rnd: int, active: list[int], dropped: list[int]) -> None:
        self.points.hit("round")


class _Writer(CheckpointWriter):
    def __init__(self, points: _Points):
        self.points = points

    @contextlib.contextmanager
    def open_data(self, path: Path, size: int) -> Iterator[BinaryIO]:
        n = self.points.hits.get("checkpoint-write", 0) + 1
        dies = self.points.die == ("checkpoint-write", n)
        with super().open_data(path, size) as f:
            self.points.hits["checkpoint-write"] = n
            yield _HalfWay(f, size // 2) if dies else f

    def write_manifest(self, path: Path, text: str) -> None:
        self.points.hit("checkpoint-rename")
        super().write_manifest(path, text)


class _HalfWay:
    """A file that kills the process once half of the checkpoint's bytes are written (and flushed)."""

    def __init__(self, f: BinaryIO, half: int):
        self.f, self.half, self.written = f, half, 0

    def write(self, b: bytes | memoryview) -> int:
        n = self.f.write(b)
        self.written += len(b)
        if self.written >= self.half:
            self.f.flush()
            _die()
        return n


def hooks(die: str | None = None, pause: str | None = None, nan_at: tuple[int, int] | None = None) -> SessionHooks:
    points = _Points(die, pause)

    def wrap(executor: Executor, session: Any) -> Executor:
        points.session = session
        return _Wrapped(executor, points, nan_at)

    return SessionHooks(wrap_executor=wrap, checkpoint_writer=_Writer(points), listeners=[_Rounds(points)])


def main(argv: list[str]) -> int:
    """``python -m tests.support.faults [--die-at P:N] [--pause-at P:N] [--nan-at R:C] run ARGS...``"""
    import argparse

    from fedforge.cli import main as cli_main

    p = argparse.ArgumentParser()
    p.add_argument("--die-at")
    p.add_argument("--pause-at")
    p.add_argument("--nan-at")
    ns, rest = p.parse_known_args(argv)
    nan = tuple(int(v) for v in ns.nan_at.split(":")) if ns.nan_at else None
    return cli_main(rest, hooks=hooks(ns.die_at, ns.pause_at, nan))  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
