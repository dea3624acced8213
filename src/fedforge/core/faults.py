"""Reliability: client failures (injected and real), the divergence guard, stop requests (signals), test hooks.

* :class:`FaultPlan` decides, from ``(seed, round, client)`` alone, whether a client's local update fails and how
  (``exception``: it crashes before training; ``timeout``: it never answers; ``straggler``: it trains but answers
  after the round's deadline). The draw does not depend on the executor, the cohort or earlier rounds, so a resumed
  run injects exactly the failures an uninterrupted one does.
* :func:`run_guarded` runs one local update in a worker and turns any exception (injected or real) into a
  :class:`ClientFailure` value, so that every executor returns it like a result and the round goes on.
* :func:`first_nonfinite` finds the first NaN/Inf tensor of a state or message (the divergence guard).
* :class:`StopSignals` turns SIGINT/SIGTERM into a stop request that the round loop honours after the current
  client: it writes a checkpoint and exits with 128 + the signal number.
* :func:`test_point` is a hook for tests only: ``FEDFORGE_TEST_DIE_AT=checkpoint-write:2`` kills the process with
  SIGKILL the second time that point is reached; ``FEDFORGE_TEST_PAUSE_AT=client:3`` pauses there (until a stop is
  requested, at most 60 s). Without those variables it does nothing.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import FedforgeError
from .context import derive_seed

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

    def __getstate__(self) -> dict:  # exceptions do not always pickle; the text is what travels
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


def run_guarded(plan: FaultPlan | None, rnd: int, cid: int, update: Callable[[], Any]) -> Any:
    """Run ``update()`` (one client's local update); return its result or a :class:`ClientFailure`."""
    kind = plan.draw(rnd, cid) if plan is not None else None
    try:
        if kind == "exception":
            raise InjectedFault("injected failure: the client crashed during its local update")
        if kind == "timeout":
            raise ClientTimeout("injected timeout: the client did not answer within the round's deadline")
        result = update()
        _test_nan(rnd, cid, result)
        if kind == "straggler":
            raise ClientTimeout("injected straggler: the client finished after the round's deadline; its update is discarded")
        return result
    except Exception as e:  # noqa: BLE001 - a failing client must never stop the round by itself
        injected = isinstance(e, InjectedFault) and kind is not None
        return ClientFailure(cid, rnd, kind if injected else "error", f"{type(e).__name__}: {e}", injected,
                             None if injected else traceback.format_exc(), e)


def _test_nan(rnd: int, cid: int, result: Any) -> None:
    """Test hook: ``FEDFORGE_TEST_NAN_AT=ROUND:CLIENT`` puts a NaN into that client's first uploaded float tensor."""
    spec = os.environ.get("FEDFORGE_TEST_NAN_AT")
    if not spec or ":" not in spec:
        return
    r, c = spec.split(":", 1)
    if (r.strip(), c.strip()) != (str(rnd), str(cid)):
        return
    upload = getattr(result, "upload", None) or {}
    for k, v in upload.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.numel():
            v = v.clone()
            v.view(-1)[0] = float("nan")
            upload[k] = v
            return


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

    def __enter__(self) -> "StopSignals":
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
        for sig, prev in self._previous.items():  # a second signal acts at once
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


# ----------------------------------------------------------------------------------------- test hooks
_hits: dict[str, int] = {}
_stop_requested: Callable[[], bool] = lambda: False  # noqa: E731 - set by the running simulation


def set_stop_probe(probe: Callable[[], bool]) -> None:
    global _stop_requested
    _stop_requested = probe


def _matches(var: str, point: str) -> bool:
    spec = os.environ.get(var)
    if not spec:
        return False
    name, _, n = spec.partition(":")
    if name != point:
        return False
    try:
        return _hits[point] == int(n or 1)
    except ValueError:
        return False


def test_point(point: str) -> None:
    """Count a named point; die (SIGKILL) or pause there when a test asked for it. A no-op in normal runs."""
    if "FEDFORGE_TEST_DIE_AT" not in os.environ and "FEDFORGE_TEST_PAUSE_AT" not in os.environ:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _matches("FEDFORGE_TEST_DIE_AT", point):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # SIGKILL is delivered asynchronously; never go on
    if _matches("FEDFORGE_TEST_PAUSE_AT", point):
        print(f"fedforge-test: paused at {point}:{_hits[point]}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _stop_requested():
            time.sleep(0.02)


test_point.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


class AlreadyComplete(FedforgeError):
    """``--resume`` of a run that already finished: nothing to do (exit code 0)."""

    exit_code = 0
