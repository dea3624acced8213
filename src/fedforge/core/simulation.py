"""The run session: everything around the round loop (:mod:`fedforge.core.engine`) for one experiment.

Set-up (dataset, partition, algorithm), the run directory (config, partition and its statistics, metrics, failures,
artifacts, summary, plots), checkpoints and exact resume with identity checks, run status, signals, the run lock,
the progress bar and trackers. The session subscribes to the engine's events; it never runs a round itself.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._io import atomic_write_text
from ..config import RunConfig, dump_yaml
from ..data import Dataset, Partition, from_client_split, load_dataset, make_partition
from ..data.domains import apply_domains, domain_groups, make_domain_partition
from ..data.federation import check_augment
from ..data.partition import PARTITIONERS, default_min_samples, plot_heatmap
from ..errors import ConfigError, PartitionError
from ..models import resolve_architectures
from ..results import RunDir, summarize
from ..results.plots import plot_curves
from ..results.rundir import STATUS_FILE, dumps
from .algorithm import ALGORITHMS, Algorithm, Update
from .checkpoint import CHECKPOINT_DIR, Checkpoint, CheckpointError, CheckpointWriter, load_checkpoint, restore_rng
from .context import Context
from .engine import FailureStop, Progress, RoundEngine, Schedule, StopRequested, select_clients
from .executors import Executor, deterministic, make_executor
from .faults import (
    AlreadyComplete,
    ClientFailure,
    FaultPlan,
    RunInterrupted,
    RunStopped,
    StopSignals,
    TooManyFailures,
    signal_name,
)
from .injection import FaultInjector
from .memory import peak_gpu_memory_mb, start_run
from .messages import State, to_device
from .privacy import make_privacy, with_client_dp
from .runtime import WorkerSpec
from .server_opt import ServerOptimizer, algorithm_view
from .store import MemoryStore, StateStore, open_store
from .tracking import open_trackers
from .unseen import check_new_clients, participants

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
    if cfg.partition == "domains":  # feature shift: a domain per client, any partitioner within each domain
        return make_domain_partition(ds, cfg.domains, cfg.clients, cfg.seed, clients_per_domain=cfg.clients_per_domain,
                                     within=cfg.domain_label_skew, train_ratio=cfg.train_ratio, batch_size=cfg.batch_size,
                                     **{**candidates, "min_samples": cfg.min_samples})
    return make_partition(ds.y, ds.num_classes, cfg.partition, cfg.clients, cfg.seed, train_ratio=cfg.train_ratio, **kwargs)


def build_algorithm(cfg: RunConfig, ds: Dataset, part: Partition) -> Algorithm:
    cls = ALGORITHMS.get(cfg.algorithm)
    archs = resolve_architectures(cfg.model, part.num_clients, getattr(cfg, "model_assignment", None))
    n = participants(part.num_clients, cfg.new_clients)  # the last --new-clients ids never train (core/unseen.py)
    ctx = Context(
        num_clients=n, num_classes=ds.num_classes, input_shape=ds.input_shape, archs=tuple(archs),
        seed=cfg.seed, rounds=cfg.rounds, lr=cfg.lr, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
        train_sizes=tuple(len(a) for a in part.train[:n]), test_sizes=tuple(len(a) for a in part.test[:n]),
        device=cfg.device, precision=cfg.precision, eval_batch_size=cfg.eval_batch_size, optimizer=cfg.optimizer,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, lr_decay=cfg.lr_decay,
        generator=cfg.generator, trust_generator_pickle=cfg.trust_generator_pickle, vocab_size=ds.vocab_size)
    ctx = with_client_dp(cfg, ctx)  # --dp-epsilon: models checked, σ calibrated per client (core/privacy.py)
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
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    path: Path | None
    server: State = field(default_factory=dict, repr=False)
    store: StateStore | None = field(default=None, repr=False)


@dataclass
class SessionHooks:
    """Ways to wrap parts of a run from outside, without test points inside them: fault injection in tests,
    instrumentation. ``wrap_executor(executor, session)`` returns the executor the engine uses; ``checkpoint_writer``
    replaces the plain :class:`CheckpointWriter`; ``listeners`` receive the engine's events too."""

    wrap_executor: Callable[[Executor, Simulation], Executor] | None = None
    checkpoint_writer: CheckpointWriter | None = None
    listeners: list[Any] = field(default_factory=list)


class Simulation:
    """The run session of one configured experiment: it sets the experiment up (dataset, partition, algorithm),
    owns its run directory (config, partition, metrics, checkpoints, status, summary, plots, trackers), resume,
    signals and the progress bar, and subscribes to the events of the :class:`~fedforge.core.engine.RoundEngine`,
    which runs the rounds (client work goes through an executor).

    ``resume=RUN_DIR`` continues that run from its last checkpoint (or from the start when it has none); the
    config must match the one the run was started with (``RunConfig.identity()``), except for fields that do not
    change results (checkpoint_every, max_fail_fraction, on_nan, workers, threads, trackers, ...).
    """

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path | None | bool = None, progress: bool = True,
                 dataset: Dataset | None = None, executor: Executor | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None, resume: str | Path | None = None,
                 hooks: SessionHooks | None = None):
        self.cfg = cfg.validate()
        self.progress = progress
        self.on_record = on_record
        self.hooks = hooks or SessionHooks()
        self.resuming = resume is not None
        _check_device(self.cfg.device)
        saved: RunConfig | None = None
        if resume is not None:
            saved = saved_config(resume)
            self.cfg.out = str(resume)
        self.ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.class_subset)
        check_augment(self.ds, self.cfg.augment)
        if resume is not None and (Path(resume) / "partition.npz").is_file():
            self.partition = Partition.load(Path(resume) / "partition.npz")
            self.partition.check(self.ds.y)
        else:
            self.partition = build_partition(self.cfg, self.ds)
        self.cfg.clients = self.partition.num_clients
        self.ds = apply_domains(self.ds, self.partition)  # feature shift: each client's samples in its domain, once
        if saved is not None:
            assert resume is not None  # saved is read from the run being resumed
            check_same_config(saved, self.cfg, resume)
        self.algo = build_algorithm(self.cfg, self.ds, self.partition)
        self.ctx = self.algo.ctx
        self.privacy = make_privacy(self.cfg, self.algo)  # DP around aggregation and ε in the records (or None)
        self.new_clients = check_new_clients(self.algo, self.partition.num_clients, self.cfg.new_clients,
                                             self.cfg.fine_tune_epochs)
        empty = [i for i, a in enumerate(self.partition.train) if len(a) == 0]
        if empty:
            raise PartitionError(f"client {empty[0]} has no training samples; lower --clients or raise --min-samples.")
        self.trackers = open_trackers(self.cfg.tracker)
        if self.trackers and run_dir is False:
            raise ConfigError("trackers log a run directory's records and plots; give the run a directory (--out), "
                              "or leave --tracker out.")
        self._executor = executor
        self.writer = self.hooks.checkpoint_writer or CheckpointWriter()
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
            # (True is the only bool that gets here: the isinstance test changes nothing but tells mypy so)
            self.run_dir = RunDir.create(run_dir if run_dir not in (None, True) and not isinstance(run_dir, bool)
                                         else (cfg.out or default_run_dir(cfg)))
        self._stop: int | None = None  # the signal that asked the run to stop
        self._saved_at: tuple[int, bool] | None = None  # (round, finetuned) of the checkpoint on disk
        if self.checkpoint is not None:
            self._saved_at = (self.checkpoint.round, bool(self.checkpoint.info.get("finetuned")))
        self._bar: Any = None
        self._t_start = time.perf_counter()

    # ------------------------------------------------------------------------------------------ public
    def describe(self) -> str:
        model = self.ctx.build_model(self.ctx.archs[0])
        archs = self.ctx.arch_set
        arch = archs[0] if len(archs) == 1 else f"{len(archs)} architectures ({', '.join(archs)})"
        return (f"{self.algo.name} on {self.ds.name} ({len(self.ds.y):,} samples, {self.ds.num_classes} classes), "
                f"{self.ctx.num_clients} clients, model {arch}: {model.num_parameters():,} parameters")

    @property
    def server_optimizer(self) -> ServerOptimizer | None:
        c = self.cfg
        if c.server_opt is None:
            return None
        return ServerOptimizer(c.server_opt, c.server_lr, c.server_momentum, c.server_beta2, c.server_tau)

    @property
    def schedule(self) -> Schedule:
        c = self.cfg
        return Schedule(c.seed, c.rounds, c.join_ratio, c.random_join, c.drop_rate, c.eval_every, c.on_nan,
                        c.max_fail_fraction)

    def select_clients(self, rnd: int) -> tuple[list[int], list[int]]:
        """(clients that train and report, clients that drop out after receiving the model) for round ``rnd``."""
        return select_clients(self.schedule, self.ctx.num_clients, rnd)

    @property
    def stop_requested(self) -> bool:
        return self._stop is not None

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
            with deterministic(self.cfg.deterministic):  # --deterministic: before the executor or the engine use a GPU
                return self._run()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _run(self) -> RunResult:
        cfg, rd = self.cfg, self.run_dir
        start_run(self.ctx.device)  # peak_gpu_memory_mb counts this run only
        if rd is not None:
            self._write_resume_setup(rd) if self.resuming else self._write_setup(rd)
        executor = self._make_executor()
        if self.checkpoint is not None:
            self._t_start -= float(self.checkpoint.info.get("elapsed", 0.0))
        engine = RoundEngine(self.algo, self.schedule, executor, listeners=[self, *self.hooks.listeners],
                             should_stop=lambda: self._stop is not None,
                             clock=lambda: time.perf_counter() - self._t_start, server_opt=self.server_optimizer,
                             groups=domain_groups(self.partition), new_clients=self.new_clients,
                             privacy=self.privacy)
        prog: Progress | None = None
        try:
            with StopSignals(self._on_signal):
                executor.start(WorkerSpec(self.ds, self.partition, self.algo, cfg.augment, cfg.threads,
                                          deterministic=cfg.deterministic))
                prog = self._start(engine)
                self._track("start", _jsonable(cfg.to_dict()), rd.path if rd else None, self.resuming)
                self._bar = self._progress_bar(prog.round)
                try:
                    engine.run(prog)
                except StopRequested:
                    self._save_if_new(prog)
                    raise self._interrupted(prog) from None
                except FailureStop as e:
                    raise self._failed(prog, e) from e.error.__cause__
                finally:
                    if self._bar is not None:
                        self._bar.close()
                self._save_if_new(prog)
        except (RunInterrupted, RunStopped) as e:
            if rd is not None:
                if isinstance(e, RunInterrupted):
                    rd.set_status("interrupted", error=str(e), checkpoint_round=self._saved_round)
                else:
                    rd.set_status("failed", error=str(e), checkpoint_round=self._saved_round, resumable=True)
            self._track("finish", None, rd.path if rd else None, "interrupted" if isinstance(e, RunInterrupted) else "failed")
            raise
        except BaseException as e:
            if rd is not None:
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                rd.set_status(status, error=f"{type(e).__name__}: {e}", checkpoint_round=self._saved_round,
                              resumable=self._saved_at is not None)
            self._track("finish", None, rd.path if rd else None, "failed")
            raise
        finally:
            executor.close()
        return self._finish(prog)

    def _finish(self, prog: Progress) -> RunResult:
        cfg, rd = self.cfg, self.run_dir
        wall = time.perf_counter() - self._t_start
        summary = summarize(prog.records, rounds=cfg.rounds, wall_seconds=wall,
                            extra={"algorithm": cfg.algorithm, "dataset": self.ds.name, "model": cfg.model,
                                   "clients": self.ctx.num_clients, "seed": cfg.seed, "train_seconds": prog.train_seconds,
                                   "failed_updates": len(prog.failures),
                                   "peak_gpu_memory_mb": peak_gpu_memory_mb(self.ctx.device)})
        if rd is not None:
            rd.write_json("summary.json", summary)
            try:
                server_keys = [k for k in self.algo.server_metrics(algorithm_view(prog.server)) if "seconds" not in k]
                plot_curves(prog.records, rd.file("curves.png"), title=f"{cfg.algorithm} · {self.ds.name}",
                            server_keys=server_keys)
            except Exception as e:  # a plot must never lose a finished run
                log.warning("could not draw curves.png (%s)", e)
            rd.set_status("complete", wall_seconds=wall)
        self._track("finish", summary, rd.path if rd else None, "complete")
        return RunResult(summary, prog.records, rd.path if rd else None, algorithm_view(prog.server), prog.store)

    def _make_executor(self) -> Executor:
        executor = self._executor or make_executor(self.cfg)
        if self.cfg.fail_rate > 0:
            executor = FaultInjector(executor, FaultPlan(self.cfg.seed, self.cfg.fail_rate))
        if self.hooks.wrap_executor is not None:
            executor = self.hooks.wrap_executor(executor, self)
        return executor

    # ---------------------------------------------------------------------------------- engine events
    def updates_received(self, rnd: int, updates: list[Update], failures: list[ClientFailure]) -> None:
        if not failures:
            return
        if self.run_dir is not None:
            with open(self.run_dir.file(FAILURES_FILE), "a") as f:
                for x in failures:
                    f.write(dumps(x.to_json(), indent=None) + "\n")
        log.warning("round %d: %d client(s) left out (%s)", rnd, len(failures),
                    ", ".join(f"client {f.cid}: {f.kind}" for f in failures))

    def record_written(self, rec: dict[str, Any], prog: Progress) -> None:
        self._write_artifacts(rec["round"], prog.server)
        if self.run_dir is not None:
            self.run_dir.write_metrics(prog.records)
        if self.on_record is not None:
            self.on_record(rec)
        self._track("log", rec)

    def round_finished(self, rnd: int, prog: Progress) -> None:
        every = self.cfg.checkpoint_every
        if rnd == self.cfg.rounds or (every and rnd % every == 0):
            self._save(prog)
        if self._bar is not None:
            self._bar.update(1)
            last = prog.records[-1] if prog.records else {}
            post = {k[:4]: f"{last[k]:.3f}" for k in ("global_acc", "personalized_acc") if last.get(k) is not None}
            self._bar.set_postfix(post, refresh=False)

    def _track(self, method: str, *args: Any) -> None:
        """Hand an event to every tracker; a tracker's failure never loses the run (it is logged)."""
        for t in self.trackers:
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001
                log.warning("tracker %s: %s failed (%s: %s)", t.name, method, type(e).__name__, e)

    # ------------------------------------------------------------------------------- start and resume
    def _start(self, engine: RoundEngine) -> Progress:
        server = engine.start()
        rd = self.run_dir.path if self.run_dir is not None else None
        store = open_store(self.cfg.state_store, self.cfg.state_dir, rd, fresh=not self.resuming, clear=self.resuming,
                           num_clients=self.ctx.num_clients)
        ck = self.checkpoint
        if ck is None:
            return Progress(0, server, store)
        for cid, state in ck.client_states():
            store.put(cid, state)
        restore_rng(ck.rng.get("meta", {}), ck.rng.get("tensors", {}))
        log.info("resuming from the checkpoint of round %d of %d", ck.round, self.cfg.rounds)
        return Progress(ck.round, to_device(ck.server, engine.device), store, **self._restored)

    @property
    def _saved_round(self) -> int | None:
        return self._saved_at[0] if self._saved_at else None

    def _save(self, prog: Progress) -> None:
        """Write the checkpoint of ``prog`` (the state at the end of round ``prog.round``)."""
        if self.run_dir is None:
            return
        info = {"identity": _jsonable(self.cfg.identity()), "records": prog.records, "totals": prog.totals,
                "train_seconds": prog.train_seconds, "elapsed": time.perf_counter() - self._t_start,
                "failures": prog.failures, "round_info": prog.round_info, "finetuned": prog.finetuned,
                "rounds": self.cfg.rounds}
        self.writer.save(self.run_dir.path, prog.round, to_device(prog.server, "cpu"), prog.store.items,
                         _jsonable(info), final=prog.finetuned)
        self._saved_at = (prog.round, prog.finetuned)

    def _save_if_new(self, prog: Progress) -> None:
        if self._saved_at != (prog.round, prog.finetuned):
            self._save(prog)

    def _interrupted(self, prog: Progress) -> RunInterrupted:
        signum = self._stop or signal.SIGINT
        name = signal_name(signum)
        if self.run_dir is None:
            return RunInterrupted(f"stopped by {name} after round {prog.round} of {self.cfg.rounds}; this run keeps no "
                                  f"run directory, so it cannot be resumed.", signum)
        return RunInterrupted(f"stopped by {name} after round {prog.round} of {self.cfg.rounds}; checkpoint of round "
                              f"{self._saved_round} written; resume with: fedforge run --resume {self.run_dir.path}",
                              signum)

    def _failed(self, prog: Progress, stop: FailureStop) -> RunStopped:
        """The error to raise for a round that could not go on, after saving the last completed round where that is
        asked (its state is untouched by the failed round)."""
        err, message = stop.error, str(stop.error)
        if not stop.keep:
            kept = self._saved_round if self._saved_round is not None else "none"
            return type(err)(f"{message}; the last good checkpoint (round {kept}) is kept (lower --lr and start again).")
        if self.run_dir is None:
            return err
        if isinstance(err, TooManyFailures):
            message += f"; see {self.run_dir.file(FAILURES_FILE)}"
        self._save_if_new(prog)
        return type(err)(f"{message}; the checkpoint of round {self._saved_round} is kept: resume with "
                         f"`fedforge run --resume {self.run_dir.path}` (options that do not change results, such as "
                         f"--max-fail-fraction or --on-nan, may be changed).")

    def _write_artifacts(self, rnd: int, server: State) -> None:
        """Images an algorithm wants kept (``Algorithm.artifacts``), as ``artifacts/<name>_round<r>.png``."""
        if self.run_dir is None:
            return
        for name, image in self.algo.artifacts(algorithm_view(server)).items():
            from PIL import Image

            path = self.run_dir.file("artifacts") / f"{name}_round{rnd:04d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(np.asarray(image).squeeze()).save(path)

    def _progress_bar(self, start: int = 0) -> Any:
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
    """The JSON part of a checkpoint as Progress fields, checked (a hand-edited or foreign file is refused)."""
    info = ck.info
    fix = f"delete {ck.path.parent if ck.path else CHECKPOINT_DIR} to restart the run from round 0"
    try:
        out: dict[str, Any] = {
            "records": list(info.get("records", [])), "totals": dict(info["totals"]),
            "train_seconds": float(info.get("train_seconds", 0.0)), "failures": list(info.get("failures", [])),
            "round_info": dict(info.get("round_info") or Progress(0, {}, MemoryStore()).round_info),
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
