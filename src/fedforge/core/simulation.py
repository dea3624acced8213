"""The round loop, written once: sample → broadcast → local update → aggregate → evaluate (on a schedule)."""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import RunConfig, dump_yaml
from ..data import Dataset, Partition, from_client_split, load_dataset, make_partition
from ..data.partition import PARTITIONERS, default_min_samples, plot_heatmap
from ..errors import ConfigError, PartitionError
from ..models import resolve_architectures
from ..results import RunDir, summarize
from ..results.rundir import STATUS_FILE, atomic_write_text, dumps
from ..results.plots import plot_curves
from .algorithm import ALGORITHMS, Algorithm, EvalResult, Update
from .checkpoint import CHECKPOINT_DIR, Checkpoint, CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from .context import Context, derive_seed
from .executors import EXECUTORS, Executor, make_executor
from .faults import (AlreadyComplete, ClientFailure, DivergenceError, FaultPlan, RunInterrupted, RunStopped, StopSignals,
                     TooManyFailures, first_nonfinite, nonfinite_number, set_stop_probe, signal_name, test_point)
from .messages import nbytes, numel
from .runtime import Task, WorkerSpec
from .store import MemoryStore, StateStore, open_store
from .training import EvalCounts

log = logging.getLogger("fedforge")


# ------------------------------------------------------------------------------------------- set-up
def build_partition(cfg: RunConfig, ds: Dataset) -> Partition:
    """The run's partition: the dataset's own client split, a saved partition, or a fresh one."""
    if ds.client_split is not None:
        part = from_client_split(ds.client_split, ds.y, scheme=ds.name.split(":")[0])
        if cfg.clients != part.num_clients:
            log.info("%s ships its own split of %d clients; using it (clients=%d ignored)", ds.name, part.num_clients, cfg.clients)
        return part
    if cfg.partition_file:
        part = Partition.load(cfg.partition_file)
        part.check(ds.y)
        return part
    fn = PARTITIONERS.get(cfg.partition)
    accepted = set(inspect.signature(fn).parameters)
    min_samples = cfg.min_samples or default_min_samples(len(ds.y), cfg.clients, cfg.batch_size, cfg.train_ratio)
    candidates = {"alpha": cfg.alpha, "classes_per_client": cfg.classes_per_client, "balance": cfg.balance,
                  "shards_per_client": cfg.shards_per_client, "min_samples": min_samples, "shots": cfg.shots}
    kwargs = {k: v for k, v in candidates.items() if k in accepted}
    if cfg.clients > len(ds.y):
        raise PartitionError(f"{cfg.clients} clients cannot share the {len(ds.y)} samples of {ds.name}; use at most {len(ds.y)} clients.")
    return make_partition(ds.y, ds.num_classes, cfg.partition, cfg.clients, cfg.seed, train_ratio=cfg.train_ratio, **kwargs)


def build_algorithm(cfg: RunConfig, ds: Dataset, part: Partition) -> Algorithm:
    cls = ALGORITHMS.get(cfg.algorithm)
    archs = resolve_architectures(cfg.model, part.num_clients, getattr(cfg, "model_assignment", None))
    ctx = Context(
        num_clients=part.num_clients, num_classes=ds.num_classes, input_shape=ds.input_shape, archs=tuple(archs),
        seed=cfg.seed, rounds=cfg.rounds, lr=cfg.lr, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
        train_sizes=tuple(len(a) for a in part.train), test_sizes=tuple(len(a) for a in part.test),
        device=cfg.device, precision=cfg.precision, eval_batch_size=cfg.eval_batch_size,
        generator=cfg.generator, trust_generator_pickle=cfg.trust_generator_pickle)
    return cls.create(cfg.params, ctx)


def default_run_dir(cfg: RunConfig) -> Path:
    ds = cfg.dataset.replace(":", "-").replace("/", "_").replace("\\", "_").strip("._-")[-40:]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{ds}_{cfg.algorithm}_s{cfg.seed}_{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


# --------------------------------------------------------------------------------------------- result
@dataclass
class RunResult:
    summary: dict
    records: list[dict]
    path: Path | None
    server: dict = field(default_factory=dict, repr=False)
    store: StateStore | None = field(default=None, repr=False)


def _summ_counts(results: list[EvalResult], key: str) -> dict[str, float] | None:
    counts = [(r.cid, r.counts[key]) for r in results if key in r.counts]
    if not counts:
        return None
    correct = sum(c.correct for _, c in counts)
    total = sum(c.total for _, c in counts)
    accs = np.array([c.acc for _, c in counts if c.total > 0], dtype=np.float64)
    own_total = sum(c.own_total for _, c in counts)
    return {
        "offclass": sum(c.off_class for _, c in counts) / own_total if own_total else None,
        "ownclass_acc": sum(c.own_correct for _, c in counts) / own_total if own_total else None,
        "acc": correct / total if total else float("nan"),
        "loss": sum(c.loss_sum for _, c in counts) / total if total else float("nan"),
        "std": float(accs.std()) if len(accs) else float("nan"),
        "min": float(accs.min()) if len(accs) else float("nan"),
        "max": float(accs.max()) if len(accs) else float("nan"),
    }


@dataclass
class _Progress:
    """Everything that carries from one round to the next: exactly what a checkpoint holds."""

    round: int  # the last completed round (0: none yet)
    server: dict
    store: StateStore
    records: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=lambda: {"bytes_up_total": 0, "bytes_down_total": 0, "params_up_total": 0,
                                                  "params_down_total": 0})
    train_seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    round_info: dict = field(default_factory=lambda: {"loss": None, "bytes_up": 0, "bytes_down": 0, "params_up": 0,
                                                      "params_down": 0, "clients": 0})
    finetuned: bool = False


class Simulation:
    """Runs one configured experiment in this process (client work goes through an executor).

    ``resume=RUN_DIR`` continues that run from its last checkpoint (or from the start when it has none); the
    config must match the one the run was started with (``RunConfig.identity()``), except for fields that do not
    change results (checkpoint_every, max_fail_fraction, on_nan, workers, threads, ...).
    """

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path | None | bool = None, progress: bool = True,
                 dataset: Dataset | None = None, executor: Executor | None = None,
                 on_record: Callable[[dict], None] | None = None, resume: str | Path | None = None):
        self.cfg = cfg.validate()
        self.progress = progress
        self.on_record = on_record
        self.resuming = resume is not None
        _check_device(self.cfg.device)
        saved: RunConfig | None = None
        if resume is not None:
            saved = saved_config(resume)
            self.cfg.out = str(resume)
        self.ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.class_subset)
        if resume is not None and (Path(resume) / "partition.npz").is_file():
            self.partition = Partition.load(Path(resume) / "partition.npz")
            self.partition.check(self.ds.y)
        else:
            self.partition = build_partition(self.cfg, self.ds)
        self.cfg.clients = self.partition.num_clients
        if saved is not None:
            check_same_config(saved, self.cfg, resume)
        self.algo = build_algorithm(self.cfg, self.ds, self.partition)
        self.ctx = self.algo.ctx
        empty = [i for i, a in enumerate(self.partition.train) if len(a) == 0]
        if empty:
            raise PartitionError(f"client {empty[0]} has no training samples; lower --clients or raise --min-samples.")
        self._executor = executor
        self.run_dir: RunDir | None = None
        self.checkpoint: Checkpoint | None = None
        self._lock: _RunLock | None = None
        if resume is not None:
            self.run_dir = RunDir(resume)
            self._lock = _RunLock(self.run_dir.path)  # before reading anything another process may be writing
            try:
                self.checkpoint = load_checkpoint(resume)
                ident = self.checkpoint.info.get("identity") if self.checkpoint is not None else None
                if ident is not None and ident != _jsonable(self.cfg.identity()):
                    raise CheckpointError(f"the checkpoint in {resume} was written by a run with another configuration; "
                                          f"delete {Path(resume) / CHECKPOINT_DIR} to restart this run from round 0.")
                self._restored = _restored_fields(self.checkpoint, self.cfg.rounds) if self.checkpoint is not None else {}
            except BaseException:
                self._lock.release()
                raise
        elif run_dir is not False:
            self.run_dir = RunDir.create(run_dir if run_dir not in (None, True) else (cfg.out or default_run_dir(cfg)))
        self._stop: int | None = None  # the signal that asked the run to stop
        self._saved_at: tuple[int, bool] | None = None  # (round, finetuned) of the checkpoint on disk
        if self.checkpoint is not None:
            self._saved_at = (self.checkpoint.round, bool(self.checkpoint.info.get("finetuned")))

    # ------------------------------------------------------------------------------------------ public
    def describe(self) -> str:
        model = self.ctx.build_model(self.ctx.archs[0])
        archs = self.ctx.arch_set
        arch = archs[0] if len(archs) == 1 else f"{len(archs)} architectures ({', '.join(archs)})"
        return (f"{self.algo.name} on {self.ds.name} ({len(self.ds.y):,} samples, {self.ds.num_classes} classes), "
                f"{self.ctx.num_clients} clients, model {arch}: {model.num_parameters():,} parameters")

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask the run to stop after the current client: it writes a checkpoint and raises :class:`RunInterrupted`."""
        if self._stop is None:
            self._stop = int(signum)

    def _on_signal(self, signum: int) -> None:
        if self._stop is None:
            log.warning("%s received: finishing the current client, then writing a checkpoint "
                        "(send it again to stop at once)", signal_name(signum))
        self.request_stop(signum)

    def run(self) -> RunResult:
        if self._lock is None and self.run_dir is not None:
            self._lock = _RunLock(self.run_dir.path)
        try:
            return self._run()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _run(self) -> RunResult:
        cfg = self.cfg
        rd = self.run_dir
        if rd is not None:
            if self.resuming:
                self._write_resume_setup(rd)
            else:
                self._write_setup(rd)
        executor = self._executor or make_executor(cfg)
        prog: _Progress | None = None
        set_stop_probe(lambda: self._stop is not None)
        t_start = time.perf_counter()
        try:
            with StopSignals(self._on_signal):
                executor.start(WorkerSpec(self.ds, self.partition, self.algo, cfg.augment, cfg.threads,
                                          faults=FaultPlan(cfg.seed, cfg.fail_rate)))
                prog = self._start(executor)
                t_start -= float(self.checkpoint.info.get("elapsed", 0.0)) if self.checkpoint is not None else 0.0
                self._t_start = t_start
                bar = self._bar(prog.round)
                if prog.round == 0 and not prog.records and self._due(0):
                    prog.records.append(self._record(0, executor, prog))
                    self._emit(prog.records, rd)
                for rnd in range(prog.round + 1, cfg.rounds + 1):
                    self._check_stop(prog)
                    test_point("round")
                    t0 = time.perf_counter()
                    server, info, failures = self._round(rnd, executor, prog)
                    prog.server, prog.round, prog.round_info = server, rnd, info
                    prog.failures.extend(f.to_json() for f in failures)
                    for k in ("bytes_up", "bytes_down", "params_up", "params_down"):
                        prog.totals[f"{k}_total"] += info[k]
                    prog.train_seconds += time.perf_counter() - t0
                    if self._due(rnd):
                        prog.records.append(self._record(rnd, executor, prog))
                        self._emit(prog.records, rd)
                    if rnd == cfg.rounds or (cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0):
                        self._save(prog)
                    if bar is not None:
                        bar.update(1)
                        last = prog.records[-1] if prog.records else {}
                        post = {k[:4]: f"{last[k]:.3f}" for k in ("global_acc", "personalized_acc") if last.get(k) is not None}
                        bar.set_postfix(post, refresh=False)
                if bar is not None:
                    bar.close()
                self._check_stop(prog)
                if self.algo.has_finetune and not prog.finetuned:
                    self._finetune(executor, prog)
                if self._saved_at != (prog.round, prog.finetuned):
                    self._save(prog)
        except (RunInterrupted, RunStopped) as e:
            if rd is not None:
                if isinstance(e, RunInterrupted):
                    rd.set_status("interrupted", error=str(e), checkpoint_round=self._saved_round)
                else:
                    rd.set_status("failed", error=str(e), checkpoint_round=self._saved_round, resumable=True)
            raise
        except BaseException as e:
            if rd is not None:
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                rd.set_status(status, error=f"{type(e).__name__}: {e}", checkpoint_round=self._saved_round,
                              resumable=self._saved_at is not None)
            raise
        finally:
            set_stop_probe(lambda: False)
            executor.close()
        wall = time.perf_counter() - t_start
        records = prog.records
        summary = summarize(records, rounds=cfg.rounds, wall_seconds=wall,
                            extra={"algorithm": cfg.algorithm, "dataset": self.ds.name, "model": cfg.model,
                                   "clients": self.ctx.num_clients, "seed": cfg.seed, "train_seconds": prog.train_seconds,
                                   "failed_updates": len(prog.failures)})
        if rd is not None:
            rd.write_json("summary.json", summary)
            try:
                server_keys = [k for k in self.algo.server_metrics(prog.server) if "seconds" not in k]
                plot_curves(records, rd.file("curves.png"), title=f"{cfg.algorithm} · {self.ds.name}",
                            server_keys=server_keys)
            except Exception as e:  # a plot must never lose a finished run
                log.warning("could not draw curves.png (%s)", e)
            rd.set_status("complete", wall_seconds=wall)
        return RunResult(summary, records, rd.path if rd else None, prog.server, prog.store)

    # ------------------------------------------------------------------------------- start and resume
    def _new_store(self) -> StateStore:
        """An empty state store for this run (a resumed run refills it from its checkpoint)."""
        rd = self.run_dir.path if self.run_dir is not None else None
        return open_store(self.cfg.state_store, self.cfg.state_dir, rd, fresh=not self.resuming, clear=self.resuming)

    def _start(self, executor: Executor) -> _Progress:
        self._seed_server(0, "init")
        server = self.algo.init_server()
        store = self._new_store()
        ck = self.checkpoint
        if ck is None:
            return _Progress(0, server, store)
        for cid, state in ck.client_states():
            store.put(cid, state)
        restore_rng(ck.rng.get("meta", {}), ck.rng.get("tensors", {}))
        prog = _Progress(ck.round, dict(ck.server), store, **self._restored)
        log.info("resuming from the checkpoint of round %d of %d", ck.round, self.cfg.rounds)
        return prog

    @property
    def _saved_round(self) -> int | None:
        return self._saved_at[0] if self._saved_at else None

    def _save(self, prog: _Progress) -> None:
        """Write the checkpoint of ``prog`` (the state at the end of round ``prog.round``)."""
        if self.run_dir is None:
            return
        info = {"identity": _jsonable(self.cfg.identity()), "records": prog.records, "totals": prog.totals,
                "train_seconds": prog.train_seconds, "elapsed": time.perf_counter() - self._t_start,
                "failures": prog.failures, "round_info": prog.round_info, "finetuned": prog.finetuned,
                "rounds": self.cfg.rounds}
        save_checkpoint(self.run_dir.path, prog.round, prog.server, prog.store.items, _jsonable(info),
                        final=prog.finetuned)
        self._saved_at = (prog.round, prog.finetuned)

    def _check_stop(self, prog: _Progress) -> None:
        """At a round boundary: if a stop was requested, write a checkpoint and raise :class:`RunInterrupted`."""
        if self._stop is None:
            return
        if self._saved_at != (prog.round, prog.finetuned):
            self._save(prog)
        raise self._interrupted(prog)

    def _interrupted(self, prog: _Progress) -> RunInterrupted:
        name = signal_name(self._stop or signal.SIGINT)
        if self.run_dir is None:
            return RunInterrupted(f"stopped by {name} after round {prog.round} of {self.cfg.rounds}; this run keeps no "
                                  f"run directory, so it cannot be resumed.", self._stop or signal.SIGINT)
        return RunInterrupted(f"stopped by {name} after round {prog.round} of {self.cfg.rounds}; checkpoint of round "
                              f"{self._saved_round} written; resume with: fedforge run --resume {self.run_dir.path}",
                              self._stop or signal.SIGINT)

    def _stop_for_failures(self, prog: _Progress, message: str, cls: type[RunStopped]) -> RunStopped:
        """Save the state at the end of the last completed round (still untouched) and build the error to raise."""
        if self.run_dir is None:
            return cls(message)
        if self._saved_at != (prog.round, prog.finetuned):
            self._save(prog)
        return cls(f"{message}; the checkpoint of round {self._saved_round} is kept: resume with "
                   f"`fedforge run --resume {self.run_dir.path}` (options that do not change results, such as "
                   f"--max-fail-fraction or --on-nan, may be changed).")

    def _seed_server(self, rnd: int, phase: str, cid: int = -1) -> None:
        """Server-side hooks draw from streams derived from (seed, round, phase[, client]), never from leftovers of
        earlier work, so results do not depend on the executor or on whether the run was resumed."""
        s = derive_seed(self.cfg.seed, rnd, "server", phase, cid)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (2**32))

    # ------------------------------------------------------------------------------------------- steps
    def select_clients(self, rnd: int) -> tuple[list[int], list[int]]:
        """(clients that train and report, clients that drop out after receiving the model) for round ``rnd``."""
        cfg, n = self.cfg, self.ctx.num_clients
        rng = np.random.default_rng(derive_seed(cfg.seed, rnd, "select"))
        k = max(1, int(cfg.join_ratio * n + 1e-9))
        if cfg.random_join and k < n:
            k = int(rng.integers(k, n + 1))
        chosen = sorted(int(c) for c in rng.choice(n, size=k, replace=False)) if k < n else list(range(n))
        if cfg.drop_rate > 0:
            drop = rng.random(len(chosen)) < cfg.drop_rate
            return [c for c, d in zip(chosen, drop) if not d], [c for c, d in zip(chosen, drop) if d]
        return chosen, []

    def _dispatch(self, tasks: list[Task]) -> Iterator[Task]:
        """Hand tasks to the executor one by one; stop handing them out once a stop was requested."""
        for t in tasks:
            if self._stop is not None:
                return
            test_point("client")
            if self._stop is not None:
                return
            yield t

    def _round(self, rnd: int, executor: Executor, prog: _Progress) -> tuple[dict, dict, list[ClientFailure]]:
        """One round. Nothing in ``prog`` changes until every client's result is in and has passed the checks."""
        cfg = self.cfg
        active, dropped = self.select_clients(rnd)
        self._seed_server(rnd, "broadcast")
        msgs = {cid: self.algo.broadcast(prog.server, cid, rnd) for cid in active + dropped}
        info: dict[str, Any] = {"bytes_down": sum(nbytes(m) for m in msgs.values()),
                                "params_down": sum(numel(m) for m in msgs.values())}
        tasks = [Task("train", cid, rnd, msgs[cid], prog.store.get(cid)) for cid in active]
        try:
            results = executor.map(self._dispatch(tasks))
        except Exception:
            if self._stop is not None:  # e.g. Ctrl-C reached pool workers too: the round is abandoned, redone on resume
                self._check_stop(prog)
            raise
        if len(results) < len(tasks):  # a stop request cut the round short: it is abandoned, redone on resume
            self._check_stop(prog)
            raise RuntimeError(f"the {executor.name or 'executor'} executor returned {len(results)} results for {len(tasks)} tasks")
        updates: list[Update] = []
        failures: list[ClientFailure] = []
        for r in results:
            if isinstance(r, ClientFailure):
                failures.append(r)
                continue
            bad = _nonfinite_update(r)
            if bad is not None:
                what = f"round {rnd}, client {r.cid}: {bad}"
                failures.append(ClientFailure(r.cid, rnd, "nonfinite", what))
                if cfg.on_nan == "stop":
                    self._log_failures(failures)
                    raise self._stop_for_failures(prog, f"the run diverged: {what} (lower --lr, or pass --on-nan skip "
                                                  f"to leave such clients out)", DivergenceError)
                continue
            updates.append(r)
        self._log_failures(failures)
        if active and len(failures) > cfg.max_fail_fraction * len(active):
            first = failures[0]
            cause = first.exc if first.exc is not None and not first.injected else None
            err = self._stop_for_failures(
                prog, f"round {rnd}: {len(failures)} of {len(active)} clients failed, more than --max-fail-fraction "
                      f"{cfg.max_fail_fraction:g} allows (first: client {first.cid}, {first.error})"
                      + (f"; see {self.run_dir.file(FAILURES_FILE)}" if self.run_dir is not None else ""), TooManyFailures)
            raise err from cause
        if failures:
            log.warning("round %d: %d of %d clients left out (%s)", rnd, len(failures), len(active),
                        ", ".join(f"client {f.cid}: {f.kind}" for f in failures))
        for u in updates:
            if u.state is not None:
                prog.store.put(u.cid, u.state)
        info["bytes_up"] = sum(nbytes(u.upload) for u in updates)
        info["params_up"] = sum(numel(u.upload) for u in updates)
        samples = sum(u.metrics.get("samples", 0) for u in updates)
        info["loss"] = (sum(u.metrics.get("loss", 0.0) * u.metrics.get("samples", 0) for u in updates) / samples) if samples else None
        info["clients"] = len(updates)
        # communication per participating client: downloads over the clients that received a message, uploads
        # over the clients that reported (the per-round figures above are sums over them)
        for k, n in (("bytes_down", len(msgs)), ("params_down", len(msgs)), ("bytes_up", len(updates)),
                     ("params_up", len(updates))):
            info[f"{k}_per_client"] = info[k] / n if n else 0.0
        info["dropped"] = len(dropped)
        info["failed"] = len(failures)
        self._seed_server(rnd, "aggregate")
        server = self.algo.aggregate(prog.server, updates, rnd)
        bad_server = first_nonfinite(server)
        if bad_server is not None:
            name, kind = bad_server
            raise DivergenceError(
                f"the run diverged: round {rnd}: the aggregated server state tensor '{name}' holds {kind}; "
                f"the last good checkpoint (round {self._saved_round if self._saved_round is not None else 'none'}) "
                f"is kept (lower --lr and start again).")
        return server, info, failures

    def _log_failures(self, failures: list[ClientFailure]) -> None:
        if self.run_dir is None or not failures:
            return
        with open(self.run_dir.file(FAILURES_FILE), "a") as f:
            for x in failures:
                f.write(dumps(x.to_json(), indent=None) + "\n")

    def _finetune(self, executor: Executor, prog: _Progress) -> None:
        cfg = self.cfg
        tasks = (Task("finetune", cid, cfg.rounds + 1, self._eval_message(prog.server, cid, cfg.rounds + 1, "finetune"),
                      prog.store.get(cid))
                 for cid in range(self.ctx.num_clients))  # lazily: a disk store never holds every state at once
        for cid, state in zip(range(self.ctx.num_clients), executor.imap(tasks)):
            prog.store.put(cid, state)
        rec = self._record(cfg.rounds, executor, prog, {**prog.round_info, "bytes_up": 0, "bytes_down": 0,
                                                        "params_up": 0, "params_down": 0})
        rec["stage"] = "finetune"
        prog.records.append(rec)
        prog.finetuned = True
        self._emit(prog.records, self.run_dir)

    def evaluate(self, executor: Executor, server: dict, store: StateStore, rnd: int) -> list[EvalResult]:
        tasks = (Task("eval", cid, rnd, self._eval_message(server, cid, rnd, "eval"), store.get(cid))
                 for cid in range(self.ctx.num_clients))
        return list(executor.imap(tasks))  # lazily: a disk store never holds every state at once

    def _eval_message(self, server: dict, cid: int, rnd: int, phase: str):
        # tasks are made lazily, between other clients' work (which reseeds this process's streams in the
        # sequential executor): seed per client so that the message never depends on what ran before
        self._seed_server(rnd, phase, cid)
        return self.algo.eval_message(server, cid)

    def _record(self, rnd: int, executor: Executor, prog: _Progress, info: dict | None = None) -> dict:
        info = prog.round_info if info is None else info
        t0 = time.perf_counter()
        results = self.evaluate(executor, prog.server, prog.store, rnd)
        g = _summ_counts(results, "global")
        p = _summ_counts(results, "personalized")
        rec: dict[str, Any] = {
            "round": rnd,
            "global_acc": g["acc"] if g else None,
            "personalized_acc": p["acc"] if p else None,
            "loss": info.get("loss"),
            "global_loss": g["loss"] if g else None,
            "personalized_loss": p["loss"] if p else None,
        }
        for name, s in (("global", g), ("personalized", p)):
            if s:
                rec[f"{name}_acc_std"] = s["std"]
                rec[f"{name}_acc_min"] = s["min"]
                rec[f"{name}_acc_max"] = s["max"]
        extra_views = sorted({k for r in results for k in r.counts} - {"global", "personalized"})
        summaries = {"global": g, "personalized": p}
        for view in extra_views:
            summaries[view] = s = _summ_counts(results, view)
            rec[f"{view}_acc"] = s["acc"] if s else None
        # label-skew diagnostics of every view: share of predictions naming a class the client holds no training
        # sample of, and the accuracy with those classes masked out (see EvalCounts)
        for view, s in summaries.items():
            if s and s["offclass"] is not None:
                rec[f"{view}_offclass"] = s["offclass"]
                rec[f"{view}_ownclass_acc"] = s["ownclass_acc"]
        rec |= {"bytes_up": info.get("bytes_up", 0), "bytes_down": info.get("bytes_down", 0),
                "params_up": info.get("params_up", 0), "params_down": info.get("params_down", 0),
                "clients": info.get("clients", 0)}
        rec |= {f"{k}_per_client": info.get(f"{k}_per_client", 0.0)
                for k in ("bytes_up", "bytes_down", "params_up", "params_down")}
        if info.get("failed"):
            rec["failed"] = info["failed"]
        rec |= prog.totals
        self._seed_server(rnd, "metrics")
        rec |= self.algo.server_metrics(prog.server)
        self._write_artifacts(rnd, prog.server)
        rec["eval_seconds"] = time.perf_counter() - t0
        rec["train_seconds"] = prog.train_seconds
        rec["seconds"] = time.perf_counter() - self._t_start
        for k in ("global_acc", "personalized_acc"):
            v = rec.get(k)
            if v is not None and not math.isfinite(v):
                rec[k] = None
        return rec

    def _write_artifacts(self, rnd: int, server: dict) -> None:
        """Images an algorithm wants kept (``Algorithm.artifacts``), as ``artifacts/<name>_round<r>.png``."""
        if self.run_dir is None:
            return
        for name, image in self.algo.artifacts(server).items():
            from PIL import Image

            path = self.run_dir.file("artifacts") / f"{name}_round{rnd:04d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(np.asarray(image).squeeze()).save(path)

    def _due(self, rnd: int) -> bool:
        return rnd == 0 or rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds

    def _emit(self, records: list[dict], rd: RunDir | None) -> None:
        if rd is not None:
            rd.write_metrics(records)
        if self.on_record is not None:
            self.on_record(records[-1])

    def _bar(self, start: int = 0):
        if not self.progress or self.cfg.rounds == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.rounds, initial=start, desc=f"{self.cfg.algorithm}", unit="round",
                    dynamic_ncols=True, leave=True)

    def _write_setup(self, rd: RunDir) -> None:
        from ..provenance import provenance

        rd.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.write_text("config.yaml", dump_yaml(self.cfg))
        rd.write_json("provenance.json", provenance())
        self.partition.save(rd.file("partition.npz"))
        stats = self.partition.stats(self.ds.y, self.ds.num_classes)
        rd.write_json("partition_stats.json", stats)
        try:
            plot_heatmap(stats, rd.file("partition.png"))
        except Exception as e:
            log.warning("could not draw partition.png (%s)", e)

    def _write_resume_setup(self, rd: RunDir) -> None:
        """Bring a run directory back to the state of its checkpoint (or of a fresh start when it has none)."""
        from ..provenance import provenance

        ck = self.checkpoint
        status = {}
        if rd.file(STATUS_FILE).exists():
            try:
                status = rd.read_json(STATUS_FILE)
            except (OSError, ValueError):
                status = {}
        for k in ("error", "wall_seconds", "checkpoint_round", "resumable"):
            status.pop(k, None)
        status["resumes"] = int(status.get("resumes", 0) or 0) + 1
        status["resumed_from_round"] = ck.round if ck is not None else 0
        rd.write_json(STATUS_FILE, status)
        rd.set_status("running", resumed=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.write_text("config.yaml", dump_yaml(self.cfg))
        try:
            prov = rd.read_json("provenance.json")
            if not isinstance(prov, dict):
                raise ValueError
        except (OSError, ValueError):
            prov = provenance()
        else:
            prov.setdefault("resumes", []).append(provenance())
        rd.write_json("provenance.json", prov)
        if not rd.file("partition.npz").is_file():
            self.partition.save(rd.file("partition.npz"))
        if not rd.file("partition_stats.json").is_file():
            rd.write_json("partition_stats.json", self.partition.stats(self.ds.y, self.ds.num_classes))
        # what was logged after the checkpoint is redone: drop it so that nothing is counted twice
        rd.write_metrics(ck.info.get("records", []) if ck is not None else [])
        failures = ck.info.get("failures", []) if ck is not None else []
        atomic_write_text(rd.file(FAILURES_FILE), "".join(dumps(f, indent=None) + "\n" for f in failures))
        for stale in ("summary.json", "curves.png"):
            if rd.file(stale).exists():
                rd.file(stale).unlink()


FAILURES_FILE = "failures.jsonl"


def _restored_fields(ck: Checkpoint, rounds: int) -> dict[str, Any]:
    """The JSON part of a checkpoint as _Progress fields, checked (a hand-edited or foreign file is refused)."""
    info = ck.info
    fix = f"delete {ck.path.parent if ck.path else CHECKPOINT_DIR} to restart the run from round 0"
    try:
        out = {"records": list(info.get("records", [])), "totals": dict(info["totals"]),
               "train_seconds": float(info.get("train_seconds", 0.0)), "failures": list(info.get("failures", [])),
               "round_info": dict(info.get("round_info") or _Progress(0, {}, MemoryStore()).round_info),
               "finetuned": bool(info.get("finetuned"))}
        if not all(isinstance(r, dict) for r in out["records"]) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in out["totals"].values()):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {ck.path} has malformed metadata; {fix}.") from None
    if not 0 <= ck.round <= rounds:
        raise CheckpointError(f"checkpoint {ck.path} is of round {ck.round}, outside this run's 0..{rounds}; {fix}.")
    return out


class _RunLock:
    """An exclusive lock on a run directory while a process works in it (released by the OS if the process dies),
    so that a run is never resumed twice at once."""

    NAME = ".lock"

    def __init__(self, path: Path):
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        self.fd = os.open(path / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise ConfigError(f"run directory {path} is in use by fedforge process {holder}; wait for it to finish or "
                              f"stop it before resuming.") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()


def _check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asks for a CUDA GPU, but torch finds none on this machine; use --device cpu.")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device} names GPU {index}, but this machine has {torch.cuda.device_count()} "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")


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


def _jsonable(obj: Any) -> Any:
    """JSON-ready copy: tuples become lists, NaN/Inf become null (as in metrics.jsonl)."""
    return json.loads(dumps(obj, indent=None))


# ---------------------------------------------------------------------------------------------- resume
def saved_config(run_dir: str | Path) -> RunConfig:
    """The config a run directory was started with (its config.yaml), validated."""
    from ..config import build_config, load_yaml

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"cannot resume {path}: no such run directory.")
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"cannot resume {path}: it has no config.yaml, so it is not a fedforge run directory "
                          f"(or the run was killed before it started; start it again with --out).")
    rd = RunDir(path)
    if rd.status == "complete" and rd.file("summary.json").is_file():
        raise AlreadyComplete(f"run {path} is already complete (see {path / 'summary.json'}); nothing to resume. "
                              f"Start a new run with another --out to run it again.")
    try:
        return build_config(load_yaml(path / "config.yaml"))
    except ConfigError as e:
        raise ConfigError(f"cannot resume {path}: its config.yaml is not valid ({e})") from None


def resume_config(run_dir: str | Path, base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                  params: dict[str, Any] | None = None) -> RunConfig:
    """The config to resume ``run_dir`` with: ``base`` (a YAML mapping; default: the run's own config.yaml),
    then ``overrides`` and ``params`` on top. :class:`Simulation` checks it against the run's config."""
    from ..config import build_config, load_yaml

    saved_config(run_dir)  # refuses a missing, foreign or finished run directory first
    if base is None:
        base = load_yaml(Path(run_dir) / "config.yaml")
    return build_config(base, overrides, params)


def check_same_config(saved: RunConfig, given: RunConfig, run_dir: str | Path) -> None:
    a, b = _jsonable(saved.identity()), _jsonable(given.identity())
    diffs = [f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} given" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ConfigError(f"cannot resume {run_dir} with a different configuration ({shown}); resume it with its own "
                          f"options (`fedforge run --resume {run_dir}` alone), or start a new run with another --out.")


def run(cfg: RunConfig | None = None, *, progress: bool = False, run_dir: str | Path | None | bool = None,
        resume: str | Path | None = None, **options: Any) -> RunResult:
    """Python API: ``fedforge.run(algorithm="fedavg", dataset="digits", rounds=5)``.

    Keyword options are config fields; ``params={...}`` gives algorithm hyper-parameters. ``run_dir=False``
    keeps everything in memory. ``resume=RUN_DIR`` continues that run from its last checkpoint (keyword options
    may then change only fields that do not affect results, such as ``max_fail_fraction``).
    """
    from ..config import build_config

    if cfg is None:
        cfg = resume_config(resume, overrides=options) if resume is not None else build_config(overrides=options)
    elif options:
        raise ConfigError("pass either a RunConfig or keyword options, not both.")
    return Simulation(cfg, run_dir=run_dir, progress=progress, resume=resume).run()
