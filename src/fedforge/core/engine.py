"""The round engine: the federated round loop, written once, read as the algorithm's pseudo-code::

    server ← init_server()
    for r = 1 … R:
        S_r, D_r ← sample the round's clients (D_r: those that drop out after receiving the model)
        m_i      ← broadcast(server, i)                 for i ∈ S_r ∪ D_r      (bytes down are counted)
        u_i      ← local_update(i, m_i, state_i)        for i ∈ S_r            (through the executor)
        drop failed and non-finite updates; stop when more than max_fail_fraction failed
        server   ← aggregate(server, {u_i})                                    (bytes up are counted)
        every eval_every rounds: every client evaluates → one record
    finetune every client (methods with has_finetune), then a last record
    new clients (kept out of every round) fine-tune the global model: one record of them (core/unseen.py)

The engine emits events (:class:`EngineListener`): round started, updates received, aggregated, evaluated, record
written. Everything around the loop — the run directory, resume, checkpoints, status, signals, progress bar,
plots, trackers — belongs to the run session (:mod:`fedforge.core.simulation`), which subscribes to those events.

Devices: server hooks run on the server's device (the run's device); messages and client states travel and are
stored on the CPU; the worker hands client hooks their tensors on its device (:func:`to_device`).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import numpy as np
import torch

from .algorithm import Algorithm, EvalResult, Update
from .context import derive_seed
from .executors import Executor
from .faults import ClientFailure, DivergenceError, RunStopped, TooManyFailures, first_nonfinite, nonfinite_number
from .messages import State, nbytes, numel, to_device
from .privacy import Privacy
from .runtime import Task
from .server_opt import ServerOptimizer, algorithm_view
from .store import StateStore
from .training import summarize_counts, summarize_groups
from .unseen import STAGE as NEW_CLIENTS
from .unseen import TASK as NEW_CLIENT_TASK
from .unseen import NewClients, new_client_record
from .unseen import message as new_client_message

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Schedule:
    """The round engine's settings (a subset of the run config)."""

    seed: int
    rounds: int
    join_ratio: float = 1.0
    random_join: bool = False
    drop_rate: float = 0.0
    eval_every: int = 1
    on_nan: str = "stop"
    max_fail_fraction: float = 0.5


@dataclass
class Progress:
    """Everything that carries from one round to the next: exactly what a checkpoint holds."""

    round: int  # the last completed round (0: none yet)
    server: State
    store: StateStore
    records: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=lambda: {"bytes_up_total": 0, "bytes_down_total": 0,
                                                            "params_up_total": 0, "params_down_total": 0})
    train_seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    round_info: dict[str, Any] = field(default_factory=lambda: {"loss": None, "bytes_up": 0, "bytes_down": 0,
                                                                "params_up": 0, "params_down": 0, "clients": 0})
    finetuned: bool = False


class EngineListener(Protocol):
    """What the engine tells its subscribers; every method is optional (see :class:`Listeners`)."""

    def round_started(self, rnd: int, active: list[int], dropped: list[int]) -> None: ...
    def updates_received(self, rnd: int, updates: list[Update], failures: list[ClientFailure]) -> None: ...
    def aggregated(self, rnd: int, progress: Progress) -> None: ...
    def evaluated(self, rnd: int, results: list[EvalResult], progress: Progress) -> None: ...
    def record_written(self, record: dict[str, Any], progress: Progress) -> None: ...


class Listeners:
    """Calls an event on every subscriber that has it."""

    def __init__(self, listeners: Iterable[Any] = ()):
        self.items = list(listeners)

    def emit(self, event: str, *args: Any) -> None:
        for listener in self.items:
            fn = getattr(listener, event, None)
            if fn is not None:
                fn(*args)


class StopRequested(Exception):
    """Raised at a client or round boundary once the session asked the engine to stop."""


class FailureStop(Exception):
    """The round cannot go on (too many failures, divergence); ``keep`` says whether ``progress`` (untouched since the
    last completed round) should be checkpointed before the error is raised to the user."""

    def __init__(self, error: RunStopped, keep: bool):
        super().__init__(str(error))
        self.error, self.keep = error, keep


class RoundEngine:
    def __init__(self, algo: Algorithm, schedule: Schedule, executor: Executor, *, listeners: Iterable[Any] = (),
                 should_stop: Callable[[], bool] = lambda: False, clock: Callable[[], float] = time.perf_counter,
                 server_opt: ServerOptimizer | None = None, groups: Mapping[str, list[int]] | None = None,
                 new_clients: NewClients | None = None, privacy: Privacy | None = None):
        self.algo, self.s, self.executor = algo, schedule, executor
        self.groups = groups or {}  # name → clients, e.g. the domains: each record gets <view>_acc_domain/<name>
        self.unseen = new_clients  # clients kept out of training, evaluated after the last round (new_clients)
        self.server_opt = server_opt  # a server-side update rule composed with the algorithm's aggregate
        self.privacy = privacy  # DP around the aggregate (user level) and the ε spent in each record (core/privacy.py)
        self._opt_names: set[str] = set()
        self.events = Listeners(listeners)
        self.should_stop = should_stop
        self.clock = clock  # seconds since the run started (a resumed run continues its count)
        self.device = torch.device(algo.ctx.device)
        self.num_clients = algo.ctx.num_clients

    # ------------------------------------------------------------------------------------------- loop
    def start(self) -> State:
        self.seed_server(0, "init")
        server = to_device(self.algo.init_server(), self.device)
        if self.server_opt is not None:
            params = {n for n, _ in self.algo.ctx.build_model().named_parameters()}
            self._opt_names = self.server_opt.check(server, params)
        return server

    def view(self, server: State) -> State:
        """The server state as the algorithm's hooks see it (the server optimiser's state kept apart)."""
        return algorithm_view(server) if (self.server_opt is not None or self.privacy is not None) else server

    def run(self, prog: Progress) -> Progress:
        if prog.round == 0 and not prog.records and self.due(0):
            self.record(0, prog)
        for rnd in range(prog.round + 1, self.s.rounds + 1):
            self.check_stop()
            t0 = time.perf_counter()
            self.round(rnd, prog)
            prog.train_seconds += time.perf_counter() - t0
            if self.due(rnd):
                self.record(rnd, prog)
            self.events.emit("round_finished", rnd, prog)
        self.check_stop()
        if self.algo.has_finetune and not prog.finetuned:
            self.finetune(prog)
        self.new_clients(prog)
        return prog

    def due(self, rnd: int) -> bool:
        return rnd == 0 or rnd % self.s.eval_every == 0 or rnd == self.s.rounds

    def check_stop(self) -> None:
        if self.should_stop():
            raise StopRequested

    def seed_server(self, rnd: int, phase: str, cid: int = -1) -> None:
        """Server-side hooks draw from streams derived from (seed, round, phase[, client]), never from leftovers of
        earlier work, so results do not depend on the executor or on whether the run was resumed."""
        s = derive_seed(self.s.seed, rnd, "server", phase, cid)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (2**32))

    def select_clients(self, rnd: int) -> tuple[list[int], list[int]]:
        return select_clients(self.s, self.num_clients, rnd)

    # ------------------------------------------------------------------------------------------ round
    def round(self, rnd: int, prog: Progress) -> None:
        """One round. Nothing in ``prog`` changes until every client's result is in and has passed the checks."""
        active, dropped = self.select_clients(rnd)
        self.events.emit("round_started", rnd, active, dropped)
        self.seed_server(rnd, "broadcast")
        server = self.view(prog.server)
        msgs = {cid: to_device(self.algo.broadcast(server, cid, rnd), CPU) for cid in active + dropped}
        info: dict[str, Any] = {"bytes_down": sum(nbytes(m) for m in msgs.values()),
                                "params_down": sum(numel(m) for m in msgs.values())}
        tasks = [Task("train", cid, rnd, msgs[cid], prog.store.get(cid)) for cid in active]
        try:
            results = self.executor.map(self._dispatch(tasks))
        except Exception:
            self.check_stop()  # e.g. Ctrl-C reached pool workers too: the round is abandoned, redone on resume
            raise
        if len(results) < len(tasks):  # a stop request cut the round short: it is abandoned, redone on resume
            self.check_stop()
            raise RuntimeError(f"the {self.executor.name or 'executor'} executor returned {len(results)} results for "
                               f"{len(tasks)} tasks")
        updates, failures = self._screen(rnd, results)
        self.events.emit("updates_received", rnd, updates, failures)
        if active and len(failures) > self.s.max_fail_fraction * len(active):
            first = failures[0]
            err = TooManyFailures(f"round {rnd}: {len(failures)} of {len(active)} clients failed, more than "
                                  f"--max-fail-fraction {self.s.max_fail_fraction:g} allows (first: client {first.cid}, "
                                  f"{first.error})")
            err.__cause__ = first.exc if first.exc is not None and not first.injected else None
            raise FailureStop(err, keep=True)
        for u in updates:
            if u.state is not None:
                prog.store.put(u.cid, u.state)
        info |= _uploads(updates)
        for k, n in (("bytes_down", len(msgs)), ("params_down", len(msgs)), ("bytes_up", len(updates)),
                     ("params_up", len(updates))):
            info[f"{k}_per_client"] = info[k] / n if n else 0.0  # per participating client
        info["dropped"], info["failed"] = len(dropped), len(failures)
        self.seed_server(rnd, "aggregate")
        for u in updates:
            u.upload = to_device(u.upload, self.device)
        if self.privacy is not None:  # user-level DP: clipped uploads in, noise out (core/privacy.py)
            server = self.privacy.aggregate(self.algo.aggregate, prog.server, server, updates, rnd)
        else:
            server = self.algo.aggregate(server, updates, rnd)
        if self.server_opt is not None:
            server = self.server_opt.step(prog.server, server, self._opt_names)
        bad = first_nonfinite(server)
        if bad is not None:
            raise FailureStop(DivergenceError(f"the run diverged: round {rnd}: the aggregated server state tensor "
                                              f"'{bad[0]}' holds {bad[1]}"), keep=False)
        prog.server, prog.round, prog.round_info = server, rnd, info
        prog.failures.extend(f.to_json() for f in failures)
        for k in ("bytes_up", "bytes_down", "params_up", "params_down"):
            prog.totals[f"{k}_total"] += info[k]
        self.events.emit("aggregated", rnd, prog)

    def _dispatch(self, tasks: list[Task]) -> Iterator[Task]:
        """Hand tasks to the executor one by one; stop handing them out once a stop was requested."""
        for t in tasks:
            if self.should_stop():
                return
            yield t

    def _screen(self, rnd: int, results: list[Any]) -> tuple[list[Update], list[ClientFailure]]:
        """The round's usable updates, and the failures (crashed clients, non-finite losses or tensors)."""
        updates: list[Update] = []
        failures: list[ClientFailure] = []
        for r in results:
            if isinstance(r, ClientFailure):
                failures.append(r)
                continue
            bad = _nonfinite_update(r)
            if bad is None:
                updates.append(r)
                continue
            what = f"round {rnd}, client {r.cid}: {bad}"
            failures.append(ClientFailure(r.cid, rnd, "nonfinite", what))
            if self.s.on_nan == "stop":
                self.events.emit("updates_received", rnd, updates, failures)
                raise FailureStop(DivergenceError(f"the run diverged: {what} (lower --lr, or pass --on-nan skip to "
                                                  f"leave such clients out)"), keep=True)
        return updates, failures

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, prog: Progress, rnd: int, phase: str = "eval") -> list[EvalResult]:
        tasks = (Task(phase, cid, rnd, self._eval_message(prog.server, cid, rnd, phase), prog.store.get(cid))
                 for cid in range(self.num_clients))
        return list(self.executor.imap(tasks))  # lazily: a disk store never holds every state at once

    def _eval_message(self, server: State, cid: int, rnd: int, phase: str) -> State:
        # tasks are made lazily, between other clients' work (which reseeds this process's streams in the
        # sequential executor): seed per client so that the message never depends on what ran before
        self.seed_server(rnd, phase, cid)
        return to_device(self.algo.eval_message(self.view(server), cid), CPU)

    def record(self, rnd: int, prog: Progress, info: Mapping[str, Any] | None = None,
               stage: str | None = None) -> dict[str, Any]:
        """Evaluate every client and append one metrics record to ``prog.records`` (``stage``: e.g. finetune)."""
        info = prog.round_info if info is None else info
        t0 = time.perf_counter()
        results = self.evaluate(prog, rnd)
        self.events.emit("evaluated", rnd, results, prog)
        views = summarize_counts(results)
        rec: dict[str, Any] = {"round": rnd, "global_acc": views.pop("global_acc", None),
                               "personalized_acc": views.pop("personalized_acc", None), "loss": info.get("loss"), **views}
        rec |= summarize_groups(results, self.groups)
        rec |= {k: info.get(k, 0) for k in ("bytes_up", "bytes_down", "params_up", "params_down", "clients")}
        rec |= {f"{k}_per_client": info.get(f"{k}_per_client", 0.0)
                for k in ("bytes_up", "bytes_down", "params_up", "params_down")}
        if info.get("failed"):
            rec["failed"] = info["failed"]
        rec |= prog.totals
        self.seed_server(rnd, "metrics")
        rec |= self.algo.server_metrics(self.view(prog.server))
        if self.privacy is not None:
            rec |= self.privacy.metrics(prog.server, rnd)
        rec["eval_seconds"] = time.perf_counter() - t0
        rec["train_seconds"] = prog.train_seconds
        rec["seconds"] = self.clock()
        for k in ("global_acc", "personalized_acc"):
            v = rec.get(k)
            if v is not None and not math.isfinite(v):
                rec[k] = None
        if stage is not None:
            rec["stage"] = stage
        prog.records.append(rec)
        self.events.emit("record_written", rec, prog)
        return rec

    def finetune(self, prog: Progress) -> None:
        """After the last round: every client adapts its model (``Algorithm.finetune``); one more record."""
        rnd = self.s.rounds + 1
        tasks = (Task("finetune", cid, rnd, self._eval_message(prog.server, cid, rnd, "finetune"), prog.store.get(cid))
                 for cid in range(self.num_clients))  # lazily: a disk store never holds every state at once
        for cid, state in zip(range(self.num_clients), self.executor.imap(tasks)):
            prog.store.put(cid, state)
        prog.finetuned = True
        self.record(self.s.rounds, prog, {**prog.round_info, "bytes_up": 0, "bytes_down": 0, "params_up": 0,
                                          "params_down": 0}, stage="finetune")

    def new_clients(self, prog: Progress) -> None:
        """After the last round (and the finetune stage): the clients kept out of training receive the global model,
        fine-tune it on their own data and are evaluated before and after (:mod:`fedforge.core.unseen`); one more
        record, ``"stage": "new_clients"``, emitted as ``record_written``. Their states never enter the store; a
        resumed run whose records lack that stage runs it."""
        if self.unseen is None or any(r.get("stage") == NEW_CLIENTS for r in prog.records):
            return
        self.check_stop()
        rnd, t0 = self.s.rounds + 1, time.perf_counter()
        tasks = (Task(NEW_CLIENT_TASK, cid, rnd, new_client_message(
                    self.algo, self._eval_message(prog.server, cid, rnd, NEW_CLIENT_TASK), self.unseen.epochs), None)
                 for cid in self.unseen.cids)
        rec = new_client_record(self.executor.imap(tasks), self.s.rounds, self.unseen.epochs, self.groups)
        rec |= {"eval_seconds": time.perf_counter() - t0, "seconds": self.clock()}
        prog.records.append(rec)
        self.events.emit("record_written", rec, prog)


def select_clients(s: Schedule, n: int, rnd: int) -> tuple[list[int], list[int]]:
    """(clients that train and report, clients that drop out after receiving the model) for round ``rnd`` of ``n``
    clients: a function of (seed, round) alone."""
    rng = np.random.default_rng(derive_seed(s.seed, rnd, "select"))
    k = max(1, int(s.join_ratio * n + 1e-9))
    if s.random_join and k < n:
        k = int(rng.integers(k, n + 1))
    chosen = sorted(int(c) for c in rng.choice(n, size=k, replace=False)) if k < n else list(range(n))
    if s.drop_rate > 0:
        drop = rng.random(len(chosen)) < s.drop_rate
        return [c for c, d in zip(chosen, drop) if not d], [c for c, d in zip(chosen, drop) if d]
    return chosen, []


def _uploads(updates: list[Update]) -> dict[str, Any]:
    """Bytes and scalars uploaded, the sample-weighted mean training loss, and the number of clients that reported."""
    samples = sum(u.metrics.get("samples", 0) for u in updates)
    loss = sum(u.metrics.get("loss", 0.0) * u.metrics.get("samples", 0) for u in updates) / samples if samples else None
    return {"bytes_up": sum(nbytes(u.upload) for u in updates), "params_up": sum(numel(u.upload) for u in updates),
            "loss": loss, "clients": len(updates)}


def _nonfinite_update(u: Update) -> str | None:
    """What is non-finite in a client's result (its loss, an uploaded tensor, a state tensor), or None."""
    loss = u.metrics.get("loss") if isinstance(u.metrics, dict) else None
    if nonfinite_number(loss):
        return f"the training loss is {'NaN' if loss != loss else 'Inf'}"
    bad = first_nonfinite(u.upload)
    if bad is not None:
        return f"uploaded tensor '{bad[0]}' holds {bad[1]}"
    bad = first_nonfinite(u.state)
    if bad is not None:
        return f"client state tensor '{bad[0]}' holds {bad[1]}"
    return None
