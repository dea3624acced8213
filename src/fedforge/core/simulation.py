"""The round loop, written once: sample → broadcast → local update → aggregate → evaluate (on a schedule)."""
from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import RunConfig, dump_yaml
from ..data import Dataset, Partition, from_client_split, load_dataset, make_partition
from ..data.partition import PARTITIONERS, default_min_samples, plot_heatmap
from ..errors import ConfigError, PartitionError
from ..models import resolve_architectures
from ..results import RunDir, summarize
from ..results.plots import plot_curves
from .algorithm import ALGORITHMS, Algorithm, EvalResult, Update
from .context import Context, derive_seed
from .executors import EXECUTORS, Executor
from .messages import nbytes, numel
from .runtime import Task, WorkerSpec
from .store import MemoryStore, StateStore
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
                  "shards_per_client": cfg.shards_per_client, "min_samples": min_samples}
    kwargs = {k: v for k, v in candidates.items() if k in accepted}
    if cfg.clients > len(ds.y):
        raise PartitionError(f"{cfg.clients} clients cannot share the {len(ds.y)} samples of {ds.name}; use at most {len(ds.y)} clients.")
    return make_partition(ds.y, ds.num_classes, cfg.partition, cfg.clients, cfg.seed, train_ratio=cfg.train_ratio, **kwargs)


def build_algorithm(cfg: RunConfig, ds: Dataset, part: Partition) -> Algorithm:
    cls = ALGORITHMS.get(cfg.algorithm)
    archs = resolve_architectures(cfg.model, part.num_clients)
    ctx = Context(
        num_clients=part.num_clients, num_classes=ds.num_classes, input_shape=ds.input_shape, archs=tuple(archs),
        seed=cfg.seed, rounds=cfg.rounds, lr=cfg.lr, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
        train_sizes=tuple(len(a) for a in part.train), test_sizes=tuple(len(a) for a in part.test),
        device=cfg.device, precision=cfg.precision, eval_batch_size=cfg.eval_batch_size)
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
    return {
        "acc": correct / total if total else float("nan"),
        "loss": sum(c.loss_sum for _, c in counts) / total if total else float("nan"),
        "std": float(accs.std()) if len(accs) else float("nan"),
        "min": float(accs.min()) if len(accs) else float("nan"),
        "max": float(accs.max()) if len(accs) else float("nan"),
    }


class Simulation:
    """Runs one configured experiment in this process (client work goes through an executor)."""

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path | None | bool = None, progress: bool = True,
                 dataset: Dataset | None = None, executor: Executor | None = None,
                 on_record: Callable[[dict], None] | None = None):
        self.cfg = cfg.validate()
        self.progress = progress
        self.on_record = on_record
        self.ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.class_subset)
        self.partition = build_partition(self.cfg, self.ds)
        self.cfg.clients = self.partition.num_clients
        self.algo = build_algorithm(self.cfg, self.ds, self.partition)
        self.ctx = self.algo.ctx
        empty = [i for i, a in enumerate(self.partition.train) if len(a) == 0]
        if empty:
            raise PartitionError(f"client {empty[0]} has no training samples; lower --clients or raise --min-samples.")
        self._executor = executor
        self.run_dir: RunDir | None = None
        if run_dir is not False:
            self.run_dir = RunDir.create(run_dir if run_dir not in (None, True) else (cfg.out or default_run_dir(cfg)))

    # ------------------------------------------------------------------------------------------ public
    def describe(self) -> str:
        model = self.ctx.build_model(self.ctx.archs[0])
        archs = self.ctx.arch_set
        arch = archs[0] if len(archs) == 1 else f"{len(archs)} architectures ({', '.join(archs)})"
        return (f"{self.algo.name} on {self.ds.name} ({len(self.ds.y):,} samples, {self.ds.num_classes} classes), "
                f"{self.ctx.num_clients} clients, model {arch}: {model.num_parameters():,} parameters")

    def run(self) -> RunResult:
        cfg = self.cfg
        rd = self.run_dir
        if rd is not None:
            self._write_setup(rd)
        executor = self._executor or EXECUTORS.get(cfg.executor)(workers=cfg.workers, threads=cfg.threads)
        t_start = time.perf_counter()
        records: list[dict] = []
        try:
            executor.start(WorkerSpec(self.ds, self.partition, self.algo, cfg.augment, cfg.threads))
            server = self.algo.init_server()
            store: StateStore = MemoryStore()
            totals = {"bytes_up_total": 0, "bytes_down_total": 0, "params_up_total": 0, "params_down_total": 0}
            train_seconds = 0.0
            bar = self._bar()
            round_info: dict[str, Any] = {"loss": None, "bytes_up": 0, "bytes_down": 0, "params_up": 0, "params_down": 0, "clients": 0}
            if self._due(0):
                records.append(self._record(0, executor, server, store, round_info, totals, t_start, train_seconds))
                self._emit(records, rd)
            for rnd in range(1, cfg.rounds + 1):
                t0 = time.perf_counter()
                server, round_info = self._round(rnd, executor, server, store)
                for k in ("bytes_up", "bytes_down", "params_up", "params_down"):
                    totals[f"{k}_total"] += round_info[k]
                train_seconds += time.perf_counter() - t0
                if self._due(rnd):
                    records.append(self._record(rnd, executor, server, store, round_info, totals, t_start, train_seconds))
                    self._emit(records, rd)
                if bar is not None:
                    bar.update(1)
                    last = records[-1] if records else {}
                    post = {k[:4]: f"{last[k]:.3f}" for k in ("global_acc", "personalized_acc") if last.get(k) is not None}
                    bar.set_postfix(post, refresh=False)
            if self.algo.has_finetune:
                tasks = [Task("finetune", cid, cfg.rounds + 1, self.algo.eval_message(server, cid), store.get(cid))
                         for cid in range(self.ctx.num_clients)]
                for cid, state in zip(range(self.ctx.num_clients), executor.map(tasks)):
                    store.put(cid, state)
                rec = self._record(cfg.rounds, executor, server, store, {**round_info, "bytes_up": 0, "bytes_down": 0,
                                   "params_up": 0, "params_down": 0}, totals, t_start, train_seconds)
                rec["stage"] = "finetune"
                records.append(rec)
                self._emit(records, rd)
            if bar is not None:
                bar.close()
        except BaseException as e:
            if rd is not None:
                rd.set_status("failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                              error=f"{type(e).__name__}: {e}")
            raise
        finally:
            executor.close()
        wall = time.perf_counter() - t_start
        summary = summarize(records, rounds=cfg.rounds, wall_seconds=wall,
                            extra={"algorithm": cfg.algorithm, "dataset": self.ds.name, "model": cfg.model,
                                   "clients": self.ctx.num_clients, "seed": cfg.seed, "train_seconds": train_seconds})
        if rd is not None:
            rd.write_json("summary.json", summary)
            try:
                plot_curves(records, rd.file("curves.png"), title=f"{cfg.algorithm} · {self.ds.name}")
            except Exception as e:  # a plot must never lose a finished run
                log.warning("could not draw curves.png (%s)", e)
            rd.set_status("complete", wall_seconds=wall)
        return RunResult(summary, records, rd.path if rd else None, server, store)

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

    def _round(self, rnd: int, executor: Executor, server: dict, store: StateStore) -> tuple[dict, dict]:
        active, dropped = self.select_clients(rnd)
        msgs = {cid: self.algo.broadcast(server, cid, rnd) for cid in active + dropped}
        info = {"bytes_down": sum(nbytes(m) for m in msgs.values()), "params_down": sum(numel(m) for m in msgs.values())}
        tasks = [Task("train", cid, rnd, msgs[cid], store.get(cid)) for cid in active]
        updates: list[Update] = executor.map(tasks)
        for u in updates:
            if u.state is not None:
                store.put(u.cid, u.state)
        info["bytes_up"] = sum(nbytes(u.upload) for u in updates)
        info["params_up"] = sum(numel(u.upload) for u in updates)
        samples = sum(u.metrics.get("samples", 0) for u in updates)
        info["loss"] = (sum(u.metrics.get("loss", 0.0) * u.metrics.get("samples", 0) for u in updates) / samples) if samples else None
        info["clients"] = len(updates)
        info["dropped"] = len(dropped)
        server = self.algo.aggregate(server, updates, rnd)
        return server, info

    def evaluate(self, executor: Executor, server: dict, store: StateStore, rnd: int) -> list[EvalResult]:
        tasks = [Task("eval", cid, rnd, self.algo.eval_message(server, cid), store.get(cid)) for cid in range(self.ctx.num_clients)]
        return executor.map(tasks)

    def _record(self, rnd: int, executor: Executor, server: dict, store: StateStore, info: dict, totals: dict,
                t_start: float, train_seconds: float) -> dict:
        t0 = time.perf_counter()
        results = self.evaluate(executor, server, store, rnd)
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
        for view in extra_views:
            s = _summ_counts(results, view)
            rec[f"{view}_acc"] = s["acc"] if s else None
        rec |= {"bytes_up": info.get("bytes_up", 0), "bytes_down": info.get("bytes_down", 0),
                "params_up": info.get("params_up", 0), "params_down": info.get("params_down", 0),
                "clients": info.get("clients", 0)}
        rec |= totals
        rec |= self.algo.server_metrics(server)
        rec["eval_seconds"] = time.perf_counter() - t0
        rec["train_seconds"] = train_seconds
        rec["seconds"] = time.perf_counter() - t_start
        for k in ("global_acc", "personalized_acc"):
            v = rec.get(k)
            if v is not None and not math.isfinite(v):
                rec[k] = None
        return rec

    def _due(self, rnd: int) -> bool:
        return rnd == 0 or rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds

    def _emit(self, records: list[dict], rd: RunDir | None) -> None:
        if rd is not None:
            rd.write_metrics(records)
        if self.on_record is not None:
            self.on_record(records[-1])

    def _bar(self):
        if not self.progress or self.cfg.rounds == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.rounds, desc=f"{self.cfg.algorithm}", unit="round", dynamic_ncols=True, leave=True)

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


def run(cfg: RunConfig | None = None, *, progress: bool = False, run_dir: str | Path | None | bool = None, **options: Any) -> RunResult:
    """Python API: ``fedforge.run(algorithm="fedavg", dataset="digits", rounds=5)``.

    Keyword options are config fields; ``params={...}`` gives algorithm hyper-parameters. ``run_dir=False``
    keeps everything in memory.
    """
    from ..config import build_config

    if cfg is None:
        cfg = build_config(overrides=options)
    elif options:
        raise ConfigError("pass either a RunConfig or keyword options, not both.")
    return Simulation(cfg, run_dir=run_dir, progress=progress).run()
