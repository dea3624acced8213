"""Per-client state lives in a state store, not in per-client objects.

Three stores share one small interface (``get``/``put``/``cids``/``items``/``close``):

* ``memory`` keeps every client's state in a dict;
* ``disk`` writes one safetensors file per client, with a SHA-256 checksum of the tensors in the file's
  metadata, and reads a state back only when it is asked for. The engine asks for the states of one round's
  cohort (and evaluation streams clients one at a time), so memory follows the cohort, not the federation;
* ``auto`` (the default) keeps states in memory while the federation's states are projected to stay under
  :data:`AUTO_DISK_BYTES` (number of clients × the mean size of the states stored so far), and moves them to a
  ``disk`` store, once and for good, when the projection passes it. The choice is logged.

The store never changes results (a state read back is the state put), so it is not part of a run's identity.

A file that was truncated, overwritten or bit-flipped fails its checksum and stops the run with a
:class:`~fedforge.errors.DataError` that names the file, never with a silently wrong state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import torch

from .._io import atomic_write_bytes
from ..errors import ConfigError, DataError
from ..registry import Registry
from .messages import State

log = logging.getLogger("fedforge")

STORES: Registry[type[StateStore]] = Registry("state store", "choose memory, disk or auto")

# --state-store auto: client states move to disk once clients × (mean bytes of a stored state) would pass this
# (10^9 bytes). 500 Ditto clients of the CIFAR CNN hold 1.7 GB of personal models: in memory their run peaked at
# 3.1 GB RSS, on disk at 1.4 GB (docs/performance.md).
AUTO_DISK_BYTES = 1_000_000_000


class StateStore(ABC):
    """Maps client id → state (a flat dict of tensors). ``get`` returns None for a client never seen."""

    @abstractmethod
    def get(self, cid: int) -> State | None: ...

    @abstractmethod
    def put(self, cid: int, state: State) -> None: ...

    @abstractmethod
    def cids(self) -> list[int]: ...

    def items(self) -> Iterator[tuple[int, State]]:
        """(cid, state) pairs, read one at a time (a disk store never holds them all)."""
        for cid in self.cids():
            s = self.get(cid)
            if s is not None:
                yield cid, s

    def __len__(self) -> int:
        return len(self.cids())

    def close(self) -> None:  # noqa: B027  (an optional hook: a store without files or handles has nothing to close)
        pass


@STORES.register("memory", summary="client states in a dict in memory")
class MemoryStore(StateStore):
    """Client states in a dict."""

    def __init__(self, **_: object):
        self._d: dict[int, State] = {}

    def get(self, cid: int) -> State | None:
        return self._d.get(cid)

    def put(self, cid: int, state: State) -> None:
        self._d[cid] = state

    def cids(self) -> list[int]:
        return sorted(self._d)


# ----------------------------------------------------------------------------------------- on disk
_NAME = re.compile(r"^client-(\d+)\.safetensors$")
_FORMAT = "fedforge-client-state-1"


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy stubs: __buffer__ only on 3.12+


def state_digest(state: State) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state's tensors (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _header_metadata(raw: bytes) -> dict[str, str]:
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or n <= 0 or 8 + n > len(raw):
        raise ValueError("bad header length")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return meta


@STORES.register("disk", summary="one checksummed safetensors file per client; memory follows the round's cohort")
class DiskStore(StateStore):
    """One ``client-<cid>.safetensors`` file per client under ``path``, each with a checksum of its tensors.

    ``path=None`` uses a temporary folder that is removed when the store is closed or garbage-collected.
    ``fresh=True`` (a new run) refuses a folder that already holds client states, so that two runs never mix
    their states; ``fresh=False`` opens such a folder as it is, and ``clear=True`` first deletes the client-state
    files in it (a resumed run refills the store from its checkpoint, and states written after that checkpoint
    must not survive). Writes are atomic (a temporary file renamed over the old one), so an interrupted write
    leaves the previous state intact.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, fresh: bool = True, clear: bool = False, **_: Any):
        self._tmp = path is None
        self.path = Path(tempfile.mkdtemp(prefix="fedforge-states-")) if path is None else Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the state folder {self.path} ({e.strerror}); set state_dir to a writable folder.") from None
        self._cids: set[int] = set()
        for f in self.path.iterdir():
            m = _NAME.match(f.name)
            if m and clear:
                f.unlink()
            elif m:
                self._cids.add(int(m.group(1)))
        if fresh and self._cids:
            raise ConfigError(f"the state folder {self.path} already holds {len(self._cids)} client states of another run; "
                              f"choose an empty state_dir or delete that folder.")
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True) if self._tmp else None

    def file(self, cid: int) -> Path:
        return self.path / f"client-{int(cid):07d}.safetensors"

    def put(self, cid: int, state: State) -> None:
        from safetensors.torch import save

        tensors = {}
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"client {cid}'s state entry '{k}' is a {type(v).__name__}, not a tensor")
            tensors[k] = v.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory; a clone of such entries keeps the file self-contained
        seen: set[tuple[int, int]] = set()
        for k, v in tensors.items():
            key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
            if v.numel() and key in seen:
                tensors[k] = v.clone()
            seen.add(key)
        # safetensors sorts entries by name; the key order is kept in the metadata so get() returns the state as put
        data = save(tensors, metadata={"format": _FORMAT, "cid": str(int(cid)), "sha256": state_digest(tensors),
                                       "order": json.dumps(list(tensors))})
        # scratch state of this run (a crash means resuming from a checkpoint, which clears the folder): no fsync
        atomic_write_bytes(self.file(cid), data, durable=False)
        self._cids.add(int(cid))

    def get(self, cid: int) -> State | None:
        from safetensors.torch import load

        if int(cid) not in self._cids:
            return None
        path = self.file(cid)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"client {cid}'s state file {path} has disappeared; the state folder was changed while the run "
                            f"used it (restart the run, or resume it from a checkpoint).") from None
        fix = "delete the state folder and restart the run, or resume it from a checkpoint"
        try:
            meta = _header_metadata(raw)
            state = load(raw)
        except Exception as e:
            raise DataError(f"client {cid}'s state file {path} is corrupt or truncated ({type(e).__name__}); {fix}.") from None
        if meta.get("format") != _FORMAT or "sha256" not in meta:
            raise DataError(f"{path} is not a fedforge client-state file (no checksum in its metadata); {fix}.")
        if meta.get("cid") != str(int(cid)):
            raise DataError(f"{path} holds the state of client {meta.get('cid')}, not of client {cid}; {fix}.")
        if state_digest(state) != meta["sha256"]:
            raise DataError(f"client {cid}'s state file {path} fails its checksum (the file was modified or damaged); {fix}.")
        try:
            order = json.loads(meta.get("order", "[]"))
        except ValueError:
            order = []
        if isinstance(order, list) and sorted(map(str, order)) == sorted(state):
            state = {k: state[k] for k in order}
        return state

    def cids(self) -> list[int]:
        return sorted(self._cids)

    def disk_bytes(self) -> int:
        return sum(self.file(c).stat().st_size for c in self._cids if self.file(c).exists())

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def state_bytes(state: State) -> int:
    """Bytes of a state's tensors."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


@STORES.register("auto", summary="memory while the clients' states are projected to stay under 1 GB, then disk (the default)")
class AutoStore(StateStore):
    """Memory while ``num_clients`` × (mean bytes of the states stored so far) stays within ``limit``; past it, every
    state moves to the disk store that ``open_disk()`` opens, and all later states go there (the switch is one-way
    and logged). The first state stored decides for a federation of equal states, so memory never holds more than
    about ``limit`` of states."""

    def __init__(self, num_clients: int, open_disk: Any, limit: int | None = None, **_: Any):
        self.num_clients = max(1, int(num_clients))
        self.limit = AUTO_DISK_BYTES if limit is None else int(limit)
        self._open_disk = open_disk
        self.inner: StateStore = MemoryStore()
        self._bytes: dict[int, int] = {}
        self._total = 0
        self._told = False

    @property
    def kind(self) -> str:
        return "disk" if isinstance(self.inner, DiskStore) else "memory"

    def get(self, cid: int) -> State | None:
        return self.inner.get(cid)

    def put(self, cid: int, state: State) -> None:
        self.inner.put(cid, state)
        if isinstance(self.inner, DiskStore):
            return
        n = state_bytes(state)
        self._total += n - self._bytes.get(int(cid), 0)
        self._bytes[int(cid)] = n
        projected = self.num_clients * self._total / len(self._bytes)
        if projected > self.limit:
            self._to_disk(projected)
        elif not self._told:
            self._told = True
            log.info("client states: %d clients × %.2f MB ≈ %.3g GB projected, within --state-store auto's limit of "
                     "%.2f GB: kept in memory", self.num_clients, projected / self.num_clients / 1e6, projected / 1e9,
                     self.limit / 1e9)

    def _to_disk(self, projected: float) -> None:
        disk = self._open_disk()
        for cid, state in self.inner.items():
            disk.put(cid, state)
        self.inner = disk
        self._bytes.clear()
        log.info("client states: %d clients × %.1f MB ≈ %.3g GB projected, above --state-store auto's limit of "
                 "%.2f GB: kept on disk from now on (%s)", self.num_clients, projected / self.num_clients / 1e6,
                 projected / 1e9, self.limit / 1e9, getattr(disk, "path", "disk"))

    def cids(self) -> list[int]:
        return self.inner.cids()

    def disk_bytes(self) -> int:
        return self.inner.disk_bytes() if isinstance(self.inner, DiskStore) else 0

    def close(self) -> None:
        self.inner.close()


def open_store(kind: str = "auto", path: str | os.PathLike[str] | None = None, run_dir: str | os.PathLike[str] | None = None,
               fresh: bool = True, clear: bool = False, num_clients: int = 1, limit: int | None = None) -> StateStore:
    """The state store a run asked for: ``memory``, ``disk`` under ``path`` (default ``<run_dir>/client_states``,
    or a temporary folder when the run keeps no directory), or ``auto`` for ``num_clients`` clients (memory, then
    that disk store once the projected states pass ``limit``, default :data:`AUTO_DISK_BYTES`)."""
    cls = STORES.get(kind)

    def disk() -> DiskStore:
        where = path if path is not None else (Path(run_dir) / "client_states" if run_dir is not None else None)
        return DiskStore(where, fresh=fresh and not clear, clear=clear)

    if cls is DiskStore:
        return disk()
    if cls is AutoStore:
        log.debug("client states: --state-store auto (memory while %d clients' states stay under %.2f GB)",
                  num_clients, (AUTO_DISK_BYTES if limit is None else limit) / 1e9)
        return AutoStore(num_clients, disk, limit)
    return cls()
