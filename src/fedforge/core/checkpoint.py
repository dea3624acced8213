"""Checkpoints: everything a run needs to go on exactly where it stopped, in files that load without running code.

Layout inside a run directory::

    checkpoints/round-000010.safetensors   every tensor (server state, each client's state, RNG states), and in
                                           its ``__metadata__`` one JSON document (metrics so far, totals, failures,
                                           Python/numpy RNG states, the config's identity, the tensor index)
    checkpoints/latest.json                the manifest: which file is current, its size and SHA-256

A checkpoint is written tensor by tensor into a temporary file (memory stays bounded by one tensor, so a disk-backed
state store of thousands of clients can be saved), fsync'd, renamed into place, and only then does the manifest
(itself written to a temporary file and renamed) point at it; older files are removed last. A kill at any moment
therefore leaves either the previous checkpoint or the new one complete. Loading checks the manifest, the file's
size and SHA-256 first (a truncated or edited file is refused with one sentence), then reads the tensors with
safetensors (no pickle is ever loaded).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Iterable, Iterator, Mapping

import numpy as np
import torch

from .._io import atomic_open, atomic_write_text
from ..errors import FedforgeError

FORMAT = "fedforge-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
MANIFEST = "latest.json"
_FILE_RE = re.compile(r"^round-\d{6,}(-final)?\.safetensors$")

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2"), ("complex64", "C64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


class CheckpointError(FedforgeError):
    """A checkpoint is missing, truncated, tampered with, or belongs to another run."""


@dataclass
class Checkpoint:
    """The state at the end of round ``round`` (0: before any round)."""

    round: int
    server: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # JSON: records, totals, failures, identity, ...
    rng: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    _clients: list[int] = field(default_factory=list, repr=False)
    _index: list[list[Any]] = field(default_factory=list, repr=False)

    @property
    def client_ids(self) -> list[int]:
        return list(self._clients)

    def client_states(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(client id, state) for every client that had a state, read one client at a time."""
        if self.path is None:
            return
        from safetensors import safe_open

        by_client: dict[int, list[tuple[str, str]]] = {}
        for i, (group, cid, key) in enumerate(self._index):
            if group == "client":
                by_client.setdefault(int(cid), []).append((f"t{i}", key))
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                for cid in self._clients:
                    yield cid, {key: f.get_tensor(name) for name, key in by_client.get(cid, [])}
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.path} cannot be read ({type(e).__name__}: {e}); "
                                  f"delete the {CHECKPOINT_DIR} folder to restart the run from round 0.") from None


# --------------------------------------------------------------------------------------- RNG states
def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The process's global random states: (JSON part, tensor part)."""
    np_state = np.random.get_state(legacy=True)  # the default, named: numpy's stubs pick the dict form otherwise
    assert isinstance(np_state, tuple)  # the legacy form is a tuple unless the generator is not MT19937
    py_state = random.getstate()
    meta = {"numpy": {"kind": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]}}
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).view(np.int32).copy())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return meta, tensors


def restore_rng(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    if "numpy" in tensors and "numpy" in meta:
        m = meta["numpy"]
        keys = tensors["numpy"].numpy().view(np.uint32)
        np.random.set_state((m["kind"], keys, m["pos"], m["has_gauss"], m["cached_gaussian"]))
    if "python" in meta:
        p = meta["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(cuda)
        except RuntimeError:
            pass  # fewer devices now than when the checkpoint was written


# --------------------------------------------------------------------------------------------- write
def _as_tensor(group: str, cid: int | None, key: str, v: Any) -> torch.Tensor:
    where = "server state" if group == "server" else (f"client {cid} state" if group == "client" else "RNG state")
    if not torch.is_tensor(v):
        raise CheckpointError(f"{where} entry '{key}' is a {type(v).__name__}, not a tensor; algorithms must keep "
                              f"all state as tensors so that checkpoints can hold it.")
    if v.dtype not in _DTYPES:
        raise CheckpointError(f"{where} entry '{key}' has dtype {v.dtype}, which checkpoints cannot store; "
                              f"convert it to a float or integer dtype.")
    return v


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy stubs: __buffer__ only on 3.12+


def _entries(server: Mapping[str, Any], clients: Iterable[tuple[int, Mapping[str, Any]]],
             rng_tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, int | None, str, torch.Tensor]]:
    for k, v in server.items():
        yield "server", None, k, _as_tensor("server", None, k, v)
    for cid, state in clients:
        for k, v in state.items():
            yield "client", int(cid), k, _as_tensor("client", int(cid), k, v)
    for k, v in rng_tensors.items():
        yield "rng", None, k, _as_tensor("rng", None, k, v)


def _in_order(index: list[list[Any]], server: Mapping[str, Any], clients: Iterable[tuple[int, Mapping[str, Any]]],
              rng_tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, int | None, str, torch.Tensor]]:
    """The tensors named by ``index`` (group, cid, key), in its order, reading each client's state once."""
    groups = {"server": server, "rng": rng_tensors}
    it = iter(clients)
    cid_now: int | None = None
    state: Mapping[str, Any] | None = None
    for group, cid, key in index:
        if group == "client":
            if cid != cid_now:
                for got, state in it:  # clients with an empty state have no entries in the index
                    if int(got) == cid or state:
                        break
                else:
                    got = None
                if got is None or int(got) != cid:
                    raise CheckpointError("the set of clients changed while the checkpoint was being written; "
                                          "this is a bug in the state store.")
                cid_now = cid
            assert state is not None  # the client's state was found above (or it raised)
            src = state
        else:
            src = groups[group]
        if key not in src:
            raise CheckpointError(f"{group} state entry '{key}' disappeared while the checkpoint was being written; "
                                  f"this is a bug in the state store.")
        yield group, cid, key, _as_tensor(group, cid, key, src[key])


class CheckpointWriter:
    """Writes checkpoints. Its two file operations are methods so that a wrapper can act between them (tests kill
    the process half-way through the data, or after the file is in place but before the manifest points at it)."""

    def open_data(self, path: Path, size: int) -> ContextManager[BinaryIO]:
        """The file the checkpoint's ``size`` bytes are written to; it replaces ``path`` when the block ends."""
        return atomic_open(path)

    def write_manifest(self, path: Path, text: str) -> None:
        atomic_write_text(path, text)

    def save(self, run_dir: str | os.PathLike[str], rnd: int, server: Mapping[str, torch.Tensor],
             clients: Callable[[], Iterable[tuple[int, Mapping[str, torch.Tensor]]]], info: dict[str, Any],
             final: bool = False) -> Path:
        """Write the checkpoint of round ``rnd`` atomically and make it the current one; return its path.

        ``clients`` is a callable returning a fresh iterable of (cid, state): it is walked twice (once for the
        header, once for the data), so that no more than one tensor is held in memory at a time.
        """
        folder = Path(run_dir) / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        rng_meta, rng_tensors = capture_rng()

        # pass 1: the header (names, dtypes, shapes, offsets) and the index of what each tensor is
        header: dict[str, Any] = {}
        index: list[list[Any]] = []
        client_ids: list[int] = []
        offset = 0
        for i, (group, cid, key, t) in enumerate(_entries(server, _with_ids(clients(), client_ids), rng_tensors)):
            n = t.numel() * t.element_size()
            header[f"t{i}"] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            index.append([group, cid, key])
            offset += n
        doc = {"format": FORMAT, "round": int(rnd), "final": bool(final),
               "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "clients": client_ids, "index": index,
               "rng": rng_meta, "info": info}
        header["__metadata__"] = {"fedforge": json.dumps(doc, allow_nan=False, separators=(",", ":"))}
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)

        name = f"round-{int(rnd):06d}{'-final' if final else ''}.safetensors"
        path = folder / name
        digest = hashlib.sha256()
        with self.open_data(path, 8 + len(head) + offset) as f:
            def write(b: bytes | memoryview) -> None:
                digest.update(b)
                f.write(b)

            write(len(head).to_bytes(8, "little"))
            write(head)
            written = 0
            # pass 2 writes in pass 1's order, looked up by name: a store may hand out a state's keys in a different
            # order each time it is read (safetensors does), so the order is never taken from the second reading
            for i, (group, _cid, key, t) in enumerate(_in_order(index, server, clients(), rng_tensors)):
                spec = header[f"t{i}"]
                if _DTYPES[t.dtype] != spec["dtype"] or list(t.shape) != spec["shape"]:
                    raise CheckpointError(f"{group} state entry '{key}' changed while the checkpoint was being "
                                          f"written; this is a bug in the state store.")
                b = _tensor_bytes(t)
                write(b)
                written += len(b)
            if written != offset:
                raise CheckpointError("a client state changed while its checkpoint was being written; "
                                      "this is a bug in the state store.")
        manifest = {"format": FORMAT, "round": int(rnd), "final": bool(final), "file": name,
                    "bytes": 8 + len(head) + offset, "sha256": digest.hexdigest()}
        self.write_manifest(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(folder)
        for old in folder.iterdir():  # the previous checkpoint and any temporary file a kill left behind
            if old.name != name and old.name != MANIFEST and (_FILE_RE.match(old.name) or old.name.endswith(".tmp")):
                try:
                    old.unlink()
                except OSError:
                    pass
        return path


def save_checkpoint(run_dir: str | os.PathLike[str], rnd: int, server: Mapping[str, torch.Tensor],
                    clients: Callable[[], Iterable[tuple[int, Mapping[str, torch.Tensor]]]], info: dict[str, Any],
                    final: bool = False) -> Path:
    """:meth:`CheckpointWriter.save` with the plain writer."""
    return CheckpointWriter().save(run_dir, rnd, server, clients, info, final)


def _with_ids(items: Iterable[tuple[int, Mapping[str, Any]]], out: list[int]) -> Iterator[tuple[int, Mapping[str, Any]]]:
    for cid, state in items:
        out.append(int(cid))
        yield cid, state


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- read
def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """The current checkpoint of a run directory (None when it has none), verified against its manifest."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return None
    fix = f"delete {folder} to restart the run from round 0"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint manifest {mpath} is unreadable ({type(e).__name__}); {fix}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a {FORMAT} manifest; {fix}.")
    name, size, sha = manifest.get("file"), manifest.get("bytes"), manifest.get("sha256")
    if not isinstance(name, str) or not _FILE_RE.match(name) or not isinstance(size, int) or isinstance(size, bool) \
            or not isinstance(sha, str):
        raise CheckpointError(f"checkpoint manifest {mpath} is malformed; {fix}.")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} named by {mpath} is missing; {fix}.")
    actual = path.stat().st_size
    if actual != size:
        raise CheckpointError(f"checkpoint {path} is truncated or was changed ({actual} bytes, expected {size}); {fix}.")
    if _sha256(path) != sha:
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check (it was changed or corrupted); {fix}.")
    return read_checkpoint_file(path, fix)


def read_checkpoint_file(path: str | os.PathLike[str], fix: str = "write a new checkpoint") -> Checkpoint:
    """Parse a checkpoint file (after its checksum was verified); any defect is a :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    bad = f"checkpoint {path} is not a valid fedforge checkpoint"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            doc = json.loads(meta.get("fedforge", "null"))
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise CheckpointError(f"{bad} (no {FORMAT} metadata); {fix}.")
            index, clients = doc["index"], doc["clients"]
            keys = set(f.keys())
            if not isinstance(index, list) or len(index) != len(keys) or any(f"t{i}" not in keys for i in range(len(index))):
                raise CheckpointError(f"{bad} (its tensor index does not match its tensors); {fix}.")
            server: dict[str, torch.Tensor] = {}
            rng_t: dict[str, torch.Tensor] = {}
            for i, entry in enumerate(index):
                group, cid, key = entry
                if group == "server":
                    server[str(key)] = f.get_tensor(f"t{i}")
                elif group == "rng":
                    rng_t[str(key)] = f.get_tensor(f"t{i}")
                elif group != "client" or not isinstance(cid, int):
                    raise CheckpointError(f"{bad} (unknown entry {entry!r}); {fix}.")
            rnd = int(doc["round"])
            info = doc["info"]
            if not isinstance(info, dict) or not isinstance(clients, list) or not all(isinstance(c, int) for c in clients):
                raise CheckpointError(f"{bad} (malformed metadata); {fix}.")
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError,
            json.JSONDecodeError) as e:
        raise CheckpointError(f"{bad} ({type(e).__name__}); {fix}.") from None
    return Checkpoint(rnd, server, info, {"meta": doc.get("rng") or {}, "tensors": rng_t}, path, clients, index)
