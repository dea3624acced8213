"""Atomic file writes: a temporary file in the target's folder, flushed and fsync'd, then renamed over the target.

A reader sees the old file or the new one, never half of one; a write that fails (or is interrupted by an
exception) removes its temporary file. A process killed mid-write leaves the temporary file behind
(``<name>.<random>.tmp``, with a leading dot where ``hidden``), which callers may clean up.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, hidden: bool = True, durable: bool = True) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` when the ``with`` body ends without an exception.

    ``durable=False`` skips the fsync: still atomic for readers, but a power loss may lose the new contents
    (for scratch files that a crash makes obsolete anyway, such as a run's disk-backed client states).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=("." if hidden else "") + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    with atomic_open(path, durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
