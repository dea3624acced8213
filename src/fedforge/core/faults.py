"""Reliability: client failures, the divergence guard, stop requests (signals).

* :func:`run_guarded` runs one local update in a worker and turns any exception into a :class:`ClientFailure` value,
  so that every executor returns it like a result and the round goes on without that client.
* :class:`FaultPlan` decides, from ``(seed, round, client)`` alone, whether a client's local update fails and how
  (``exception``: it crashes before training; ``timeout``: it never answers; ``straggler``: it trains but answers
  after the round's deadline). The draw does not depend on the executor, the cohort or earlier rounds, so a resumed
  run injects exactly the failures an uninterrupted one does. :class:`fedforge.core.injection.FaultInjector` applies
  it around any executor (``--fail-rate``).
* :func:`first_nonfinite` finds the first NaN/Inf tensor of a state or message (the divergence guard).
* :class:`StopSignals` turns SIGINT/SIGTERM into a stop request that the round loop honours after the current
  client: it writes a checkpoint and exits with 128 + the signal number.
"""
from __future__ import annotations

import math
import signal
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch

from ..errors import FedforgeError
from .context import derive_seed

_T = TypeVar("_T")

FAULT_KINDS = ("exception", "timeout", "straggler")


# ------------------------------------------------------------------------------------------- errors
class RunStopped(FedforgeError):
    """The run stopped on purpose (too many failures, divergence); its last good checkpoint is kept."""

    exit_code = 3


class TooManyFailures(RunStopped):
    """More than ``max_fail_fraction`` of a round's clients failed."""


class DivergenceError(RunStopped):
    """A NaN or Inf appeared in a loss, an upload, a client state or the aggregated server state."""


class RunInterrupted(FedforgeError):
    """SIGINT or SIGTERM: the run wrote a checkpoint and stopped; exit code 128 + signal number."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class InjectedFault(RuntimeError):
    """A failure injected by ``--fail-rate`` (never raised in a run without it)."""


class ClientTimeout(InjectedFault):
    """An injected timeout or straggler: the client's answer did not arrive before the round's deadline."""


# ------------------------------------------------------------------------------------------ failures
@dataclass
class ClientFailure:
    """A client's local update that did not come back; it is left out of the round's aggregation."""

    cid: int
    round: int
    kind: str  # exception | timeout | straggler | error (a real exception) | nonfinite
    error: str
    injected: bool = False
    traceback: str | None = None
    exc: BaseException | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # exceptions do not always pickle; the text is what travels
        d = dict(self.__dict__)
        d["exc"] = None
        return d

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "client": self.cid, "kind": self.kind, "injected": self.injected,
                               "error": self.error}
        if self.traceback:
            out["traceback"] = self.traceback
        return out


@dataclass(frozen=True)
class FaultPlan:
    """Which local updates fail: each (round, client) fails with probability ``rate``, of a uniformly drawn kind."""

    seed: int
    rate: float = 0.0

    def draw(self, rnd: int, cid: int) -> str | None:
        if self.rate <= 0:
            return None
        rng = np.random.default_rng(derive_seed(self.seed, rnd, cid, "fault"))
        if rng.random() >= self.rate:
            return None
        return FAULT_KINDS[int(rng.integers(len(FAULT_KINDS)))]


def run_guarded(rnd: int, cid: int, update: Callable[[], _T]) -> _T | ClientFailure:
    """Run ``update()`` (one client's local update); return its result or a :class:`ClientFailure`."""
    try:
        return update()
    except Exception as e:  # noqa: BLE001 - a failing client must never stop the round by itself
        return ClientFailure(cid, rnd, "error", f"{type(e).__name__}: {e}", False, traceback.format_exc(), e)


def injected_failure(kind: str, rnd: int, cid: int) -> ClientFailure:
    """The failure that an injected fault of ``kind`` leaves in place of a client's result."""
    exc: InjectedFault = {
        "exception": InjectedFault("injected failure: the client crashed during its local update"),
        "timeout": ClientTimeout("injected timeout: the client did not answer within the round's deadline"),
        "straggler": ClientTimeout("injected straggler: the client finished after the round's deadline; its update "
                                   "is discarded"),
    }[kind]
    return ClientFailure(cid, rnd, kind, f"{type(exc).__name__}: {exc}", True, None, exc)


# ---------------------------------------------------------------------------------- divergence guard
def first_nonfinite(tensors: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(name, 'NaN' or 'Inf') of the first floating tensor holding a non-finite value, or None."""
    for name, t in (tensors or {}).items():
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and t.numel():
            if not bool(torch.isfinite(t).all()):
                return name, ("NaN" if bool(torch.isnan(t).any()) else "Inf")
    return None


def nonfinite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)


# -------------------------------------------------------------------------------------- stop requests
class StopSignals:
    """While active, SIGINT and SIGTERM set a stop request instead of killing the process.

    A second signal of either kind restores the default behaviour (Ctrl-C twice stops at once; the previous
    checkpoint stays intact because checkpoints are written atomically).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, on_signal: Callable[[int], None]):
        self.on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        for sig, _prev in self._previous.items():  # a second signal acts at once
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        self.on_signal(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev)
            except (ValueError, OSError):
                pass
        self._previous.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class AlreadyComplete(FedforgeError):
    """``--resume`` of a run that already finished: nothing to do (exit code 0)."""

    exit_code = 0
