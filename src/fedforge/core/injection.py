"""Injected client failures (``--fail-rate``) as a wrapper around any executor.

:class:`FaultInjector` asks the run's :class:`~fedforge.core.faults.FaultPlan` about every train task before it
reaches the wrapped executor: a task drawn to crash (``exception``) or never answer (``timeout``) is not run and
its result is that failure; a ``straggler`` is run and its result then discarded as late. Everything else passes
through untouched, so the executors themselves know nothing of injected faults.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from .executors import Executor
from .faults import ClientFailure, FaultPlan, injected_failure
from .runtime import Task, WorkerSpec


class FaultInjector(Executor):
    def __init__(self, inner: Executor, plan: FaultPlan):
        super().__init__(inner.workers, inner.threads)
        self.inner, self.plan = inner, plan
        self.name = inner.name

    def start(self, spec: WorkerSpec) -> None:
        self.inner.start(spec)

    def close(self) -> None:
        self.inner.close()

    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        return self.inner.imap(tasks)  # evaluation and fine-tuning: no injected faults

    def map(self, tasks: Iterable[Task]) -> list[Any]:
        drawn: list[tuple[Task, str | None]] = []

        def feed() -> Iterator[Task]:
            for t in tasks:
                kind = self.plan.draw(t.round, t.cid) if t.kind == "train" else None
                drawn.append((t, kind))
                if kind in (None, "straggler"):
                    yield t

        ran = iter(self.inner.map(feed()))
        out: list[Any] = []
        for t, kind in drawn:
            if kind in ("exception", "timeout"):
                out.append(injected_failure(kind, t.round, t.cid))
                continue
            r = next(ran, None)
            if r is None:  # the inner executor was cut short (a stop request)
                break
            out.append(injected_failure(kind, t.round, t.cid) if kind == "straggler" and
                       not isinstance(r, ClientFailure) else r)
        return out
