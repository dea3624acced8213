"""Per-client state lives in a state store, not in per-client objects."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

from ..registry import Registry
from .messages import State

STORES: Registry[type["StateStore"]] = Registry("state store")


class StateStore(ABC):
    """Maps client id → state (a flat dict of tensors). ``get`` returns None for a client never seen."""

    @abstractmethod
    def get(self, cid: int) -> State | None: ...

    @abstractmethod
    def put(self, cid: int, state: State) -> None: ...

    @abstractmethod
    def cids(self) -> list[int]: ...

    def items(self) -> Iterator[tuple[int, State]]:
        for cid in self.cids():
            s = self.get(cid)
            if s is not None:
                yield cid, s

    def __len__(self) -> int:
        return len(self.cids())

    def close(self) -> None:
        pass


@STORES.register("memory")
class MemoryStore(StateStore):
    """Client states in a dict (the default)."""

    def __init__(self, **_: object):
        self._d: dict[int, State] = {}

    def get(self, cid: int) -> State | None:
        return self._d.get(cid)

    def put(self, cid: int, state: State) -> None:
        self._d[cid] = state

    def cids(self) -> list[int]:
        return sorted(self._d)
