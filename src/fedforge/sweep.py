"""`fedforge sweep`: a grid of runs (seeds × hyper-parameters × run options), run one after another, resumable,
then a report with mean ± std over the seeds.

    fedforge sweep --seeds 0,1,2 --set mu=0.01,0.1 --grid lr=0.01,0.005 --out-dir sweeps/prox -- \\
        --algorithm fedprox --dataset fmnist --partition dirichlet --alpha 0.1 --clients 20 --rounds 50

* ``--seeds 0,1,2``: the seeds (default: the ``--seed`` of the run options).
* ``--set KEY=V1,V2,...`` (repeatable): values of an algorithm hyper-parameter; ``--set ALGO.KEY=...`` applies to
  the runs of algorithm ALGO only (e.g. ``--grid algorithm=fedavg,fedprox --set fedprox.mu=0.01,0.1``).
* ``--grid OPTION=V1,V2,...`` (repeatable): values of a run option (any option of ``fedforge run``, e.g.
  ``algorithm=fedavg,ditto``, ``lr=0.01,0.005``, ``local_epochs=1,5``).
  Values are read as in ``fedforge run --set`` (:func:`fedforge.config.parse_value`); commas inside ``[...]`` do
  not split (``model_assignment=[0,1],[1,0]``).
* Everything after ``--`` is ordinary ``fedforge run`` options, shared by every run.

Every point of the grid is one run directory under ``--out-dir``, named by its values:
``<algorithm>_<key><value>..._s<seed>`` (e.g. ``fedprox_lr0.01_mu0.1_s0``). The grid runs seed by seed (a first pass
over every setting with the first seed, then the next seed). The sweep is resumable: a complete run (status
complete and summary.json) is kept, an interrupted or failed one is resumed from its checkpoint, a missing one is
started; a run directory that holds a run of another configuration stops the sweep before anything runs. Runs of
one scenario and seed share one partition (``OUT_DIR/partitions/``). Ctrl-C stops the current run cleanly (it
writes a checkpoint); the same command continues the sweep. A run that stops on its own (divergence, too many
failed clients) is marked failed and the sweep goes on; bad input stops it with one sentence (exit code 2).

``OUT_DIR/sweep.json`` records the command, the grid and the status of each point; at the end the sweep writes
``report.md`` (notes below ``<!-- notes -->`` are kept), ``report.csv`` and ``curves.png`` (see
``fedforge report``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import (
    RunConfig,
    add_config_options,
    build_config,
    config_from_args,
    load_yaml,
    parse_assignments,
    parse_value,
)
from .errors import ConfigError, FedforgeError, suggest

SWEEP_FILE = "sweep.json"
PARTITIONS = "partitions"
_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_OPTIONS = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("flag", True)}
# the fields a partition depends on (batch_size through the default min_samples); runs that agree on them share it
PARTITION_FIELDS = ("dataset", "class_subset", "partition", "alpha", "classes_per_client", "shards_per_client", "balance",
                    "min_samples", "train_ratio", "clients", "shots", "batch_size", "seed", "domains",
                    "clients_per_domain", "domain_label_skew")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


# ------------------------------------------------------------------------------------------ the grid
def split_values(text: str) -> list[str]:
    """Comma-separated values, stripped; commas inside ``[...]`` or ``{...}`` do not split."""
    out, cur, depth = [], [], 0
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_seeds(text: str) -> list[int]:
    items = split_values(text or "")
    if not any(items):
        raise ConfigError("--seeds needs at least one seed, e.g. --seeds 0,1,2.")
    seeds: list[int] = []
    for t in items:
        if not t.isdigit():
            raise ConfigError(f"--seeds takes comma-separated non-negative integers such as 0,1,2, got "
                              f"{repr(t) if t else 'an empty item'} in '{text}'.")
        if int(t) in seeds:
            raise ConfigError(f"--seeds lists seed {int(t)} twice.")
        seeds.append(int(t))
    return seeds


@dataclass(frozen=True)
class Axis:
    """One swept key: a run option (``--grid``) or a hyper-parameter (``--set``), with its values."""

    key: str
    values: tuple
    param: bool = False
    scope: str | None = None  # --set ALGO.KEY: only the runs of that algorithm


def parse_axis(item: str, flag: str) -> Axis:
    """``KEY=V1,V2,...`` of ``--set`` (hyper-parameters; ``ALGO.KEY`` scoped) or ``--grid`` (run options)."""
    example = "mu=0.01,0.1" if flag == "--set" else "lr=0.01,0.005"
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} expects KEY=V1,V2,... (e.g. {flag} {example}), got '{item}'.")
    texts = split_values(text)
    if not text.strip() or not all(texts):
        raise ConfigError(f"{flag} {key} has {'no value' if not text.strip() else 'an empty value'}; give one or more "
                          f"comma-separated values, e.g. {flag} {example}.")
    values = [parse_value(t) for t in texts]
    seen = set()
    for t, v in zip(texts, values):
        j = json.dumps(v, sort_keys=True, default=str)
        if j in seen:
            raise ConfigError(f"{flag} {key} lists the value {t} twice.")
        seen.add(j)
    if flag == "--set":
        algo, dot, name = key.partition(".")
        if dot and (not algo or not name):
            raise ConfigError(f"--set expects KEY=V1,V2 or ALGO.KEY=V1,V2 (e.g. --set fedprox.mu=0.01,0.1), got '{item}'.")
        return Axis(name if dot else key, tuple(values), param=True, scope=algo if dot else None)
    key = key.replace("-", "_")
    if key == "seed":
        raise ConfigError("give the seeds with --seeds 0,1,2, not --grid seed=...")
    if key == "out":
        raise ConfigError("--grid out is not possible: the sweep names each run's directory under --out-dir.")
    if key == "params":
        raise ConfigError("sweep hyper-parameters with --set KEY=V1,V2, not --grid params=...")
    if key not in _OPTIONS:
        raise ConfigError(f"unknown run option '{key}' in --grid{suggest(key, _OPTIONS)}; see `fedforge run --help`.")
    return Axis(key, tuple(values))


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "-".join(_text(x) for x in v)
    if isinstance(v, dict):
        return "-".join(f"{k}-{_text(x)}" for k, x in v.items())
    return "none" if v is None else str(v)


def _token(key: str, value: Any) -> str:
    """``lr0.01``, ``mu-1``, ``model-cnn`` (a dash before a value that starts with a letter)."""
    t = _UNSAFE.sub("-", _text(value))
    return f"{key}-{t}" if t[:1].isalpha() else f"{key}{t}"


@dataclass(frozen=True)
class Point:
    """One run of the grid: its directory name, seed, swept run options and swept hyper-parameters."""

    name: str
    seed: int
    options: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


def make_points(algorithm: str, seeds: list[int], grid: list[Axis], sets: list[Axis]) -> list[Point]:
    """The grid, seed by seed: every combination of the ``grid`` values, and for each the combinations of the
    ``sets`` that apply to its algorithm (``algorithm``, unless the grid sweeps it)."""
    keys = [a.key for a in grid]
    for k in keys:
        if keys.count(k) > 1:
            raise ConfigError(f"--grid {k} is given twice; list all its values in one --grid {k}=V1,V2.")
    pkeys = [(a.scope, a.key) for a in sets]
    for s, k in pkeys:
        if pkeys.count((s, k)) > 1:
            raise ConfigError(f"--set {f'{s}.' if s else ''}{k} is given twice; list all its values in one --set.")
    combos = []
    used: set[str] = set()
    for values in itertools.product(*(a.values for a in grid)):
        options = {"algorithm": algorithm, **dict(zip(keys, values))}  # each point names its algorithm
        algo = str(options["algorithm"])
        used.add(algo)
        axes = [a for a in sets if a.scope in (None, algo)]
        names = [a.key for a in axes]
        for k in names:
            if names.count(k) > 1:
                raise ConfigError(f"--set {k} and --set {algo}.{k} both set {k} for {algo}; keep one.")
        head = [_UNSAFE.sub("-", algo)] + [_token(a.key, options[a.key]) for a in grid if a.key != "algorithm"]
        for pvalues in itertools.product(*(a.values for a in axes)):
            params = dict(zip(names, pvalues))
            combos.append((head + [_token(a.key, v) for a, v in zip(axes, pvalues)], options, params))
    for a in sets:
        if a.scope is not None and a.scope not in used:
            raise ConfigError(f"--set {a.scope}.{a.key} names {a.scope}, which no run of the sweep uses "
                              f"(algorithms: {', '.join(sorted(used))}).")
    points = [Point("_".join(tokens + [f"s{seed}"]), seed, options, params)
              for seed in seeds for tokens, options, params in combos]
    names_seen: dict[str, Point] = {}
    for p in points:
        if p.name in names_seen:
            raise ConfigError(f"two points of the grid would share the run directory {p.name} "
                              f"({names_seen[p.name].options | names_seen[p.name].params} and {p.options | p.params}); "
                              f"give values that differ as text.")
        names_seen[p.name] = p
    return points


# ------------------------------------------------------------------------------------ configurations
def resolved_params(algorithm: str, params: dict | None) -> dict[str, Any]:
    """An algorithm's hyper-parameters with the paper defaults filled in (rejects unknown keys and bad values)."""
    from . import algorithms as _registered  # noqa: F401
    from .core.algorithm import ALGORITHMS

    return ALGORITHMS.get(algorithm).Params.from_dict(params, owner=algorithm).to_dict()


def _flat(d: dict) -> dict:
    out = {k: v for k, v in d.items() if k != "params"}
    out.update({f"params.{k}": v for k, v in (d.get("params") or {}).items()})
    return out


def config_diff(old: dict, new: dict, defaults: dict | None = None) -> str:
    """``k=a there, b here, ...`` for every key of ``new`` whose value differs in ``old`` ('' if none);
    hyper-parameters appear as ``params.KEY``. A key that ``old`` lacks counts as its value in ``defaults``."""
    norm = lambda d: json.loads(json.dumps(_flat(d or {}), default=str))  # noqa: E731
    old, new, defaults = norm(old), norm(new), norm(defaults)
    old = {**{k: defaults.get(k) for k in new}, **{k: v for k, v in old.items() if k in new}}
    return ", ".join(f"{k}={old.get(k)} there, {new.get(k)} here" for k in sorted(new) if old.get(k) != new.get(k))


def _ships_split(dataset: str) -> bool:
    """Datasets that come with their own client split (the run's `clients` is then the split's)."""
    return str(dataset).split(":", 1)[0] == "pfllib"


def check_existing(path: Path, cfg: RunConfig, finished: bool) -> None:
    """A run directory may be kept or resumed only if it holds a run of ``cfg`` (up to fields that do not change
    results, such as where it is written, the executor or the partition file's path)."""
    import yaml

    from .results.report import comparable

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} has an unreadable config.yaml ({e}); move it away or use another --out-dir.") from None
    a, b = comparable(saved, resolved_params), comparable(cfg.to_dict(), resolved_params)
    if _ships_split(cfg.dataset):
        a.pop("clients", None)
        b.pop("clients", None)
    diff = config_diff(a, b)
    if diff:
        what = "a finished run" if finished else "an unfinished run"
        raise ConfigError(f"{path} holds {what} of another configuration ({diff}); delete it to run it again with "
                          f"these options, or use another --out-dir.")


def run_state(path: Path) -> str:
    """'fresh' (no run yet), 'stale' (a run killed before it wrote its config), 'complete' (status complete and
    summary.json) or 'resume' (started, not complete)."""
    from .results.rundir import RunDir

    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "fresh"
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run directory; move it away or use another --out-dir.")
    if not (path / "config.yaml").is_file():
        if {c.name for c in path.iterdir()} <= {".lock", "run.json", "provenance.json"}:
            return "stale"
        raise ConfigError(f"{path} is not a fedforge run directory (it has no config.yaml); move it away or use "
                          f"another --out-dir.")
    if RunDir(path).status == "complete" and (path / "summary.json").is_file():
        return "complete"
    return "resume"


# ---------------------------------------------------------------------------------------------- runner
def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


@dataclass
class PointResult:
    point: Point
    path: Path
    status: str  # complete | failed | interrupted | pending
    ran: bool = False  # this call ran (or resumed) it
    error: str | None = None
    exit_code: int = 0
    exception: BaseException | None = field(default=None, repr=False)  # why a failed run stopped


@dataclass
class Sweep:
    """Runs ``points`` under ``out_dir``: each point's config is ``base`` (a YAML mapping) < ``overrides`` (shared run
    options) < the point's options and seed, with hyper-parameters ``params`` < the point's params. Used by
    ``fedforge sweep`` and by ``benchmarks/compare.py``."""

    out_dir: Path
    points: list[Point]
    base: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    progress: bool = False  # each run's own progress bar
    bar: bool = True  # a progress bar over the grid
    share_partitions: bool = True  # runs of one scenario and seed share OUT_DIR/partitions/<...>.npz
    record: dict | None = None  # written to OUT_DIR/sweep.json with each point's status (None: no sweep.json)
    say: Callable[[str], None] = _say
    hooks: Any = None  # passed to every run's Simulation (e.g. the tests' fault injection), when given
    _ds: Any = field(default=None, repr=False)
    _ds_key: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def config(self, p: Point) -> RunConfig:
        cfg = build_config(self.base, {**self.overrides, **p.options, "seed": p.seed, "out": str(self.out_dir / p.name)},
                           {**self.params, **p.params})
        return cfg

    def path(self, p: Point) -> Path:
        return self.out_dir / p.name

    # ------------------------------------------------------------------------------------------ run
    def run(self, on_finish: Callable[[PointResult], None] | None = None) -> list[PointResult]:
        """Run every point that has no complete run; returns one result per point. Raises ``RunInterrupted`` when
        a run was stopped by a signal (its checkpoint is written; the same call continues), and the first bad-input
        error (ConfigError, DataError, ...) as it comes; a run that stops on its own (``RunStopped``) is recorded as
        failed and the sweep goes on."""
        from .core.faults import RunInterrupted, RunStopped

        checked: dict[str, Any] = {}
        cfgs = []
        for p in self.points:  # every point's options and hyper-parameters are checked before anything runs
            cfg = self.config(p)
            key = json.dumps([cfg.algorithm, cfg.params], sort_keys=True, default=str)
            if key not in checked:
                checked[key] = resolved_params(cfg.algorithm, cfg.params)
            cfgs.append(cfg)
        states = {}
        for p, cfg in zip(self.points, cfgs):
            states[p.name] = state = run_state(self.path(p))
            if state in ("complete", "resume"):
                check_existing(self.path(p), cfg, finished=state == "complete")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results = {p.name: PointResult(p, self.path(p), "complete" if states[p.name] == "complete" else
                                       (_dir_status(self.path(p)) if states[p.name] == "resume" else "pending"))
                   for p in self.points}
        self._write_record(results)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self.points), desc="sweep", unit="run", dynamic_ncols=True, disable=not self.bar,
                   file=sys.stderr, position=0, leave=True)
        n = len(self.points)
        try:
            for i, (p, cfg) in enumerate(zip(self.points, cfgs), 1):
                res, tag = results[p.name], f"[{i}/{n}] {p.name}"
                path = self.path(p)
                state = run_state(path)
                if state == "complete":
                    self.say(f"{tag}: finished earlier, kept ({path})")
                    bar.update(1)
                    continue
                res.status = "running"
                self._write_record(results)
                self.say(f"{tag}: {'resuming' if state == 'resume' else 'running'} -> {path}")
                t0 = time.perf_counter()
                try:
                    summary = self._run_one(cfg, path, state)
                except RunInterrupted as e:
                    res.status, res.error, res.exit_code, res.ran = "interrupted", str(e), e.exit_code, True
                    self._write_record(results)
                    what = str(e).split("; resume with")[0]
                    raise RunInterrupted(f"sweep stopped in run {i} of {n} ({p.name}): {what}; run the same command "
                                         f"again to continue the sweep.", e.signum) from None
                except RunStopped as e:
                    res.status, res.error, res.exit_code, res.ran = "failed", str(e), e.exit_code, True
                    res.exception = e
                    self._write_record(results)
                    self.say(f"{tag}: failed: {e}")
                    bar.update(1)
                    continue
                except BaseException as e:
                    res.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                    res.error = f"{type(e).__name__}: {e}" if not isinstance(e, FedforgeError) else str(e)
                    self._write_record(results)
                    raise
                res.status, res.error, res.exit_code, res.ran = "complete", None, 0, True
                self._write_record(results)
                best = summary["best"]
                pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
                self.say(f"{tag}: done in {time.perf_counter() - t0:.0f}s (best global {pct(best.get('global_acc'))}, "
                         f"best personalized {pct(best.get('personalized_acc'))})")
                bar.update(1)
                if on_finish is not None:
                    on_finish(res)
        finally:
            bar.close()
        return list(results.values())

    def _run_one(self, cfg: RunConfig, path: Path, state: str) -> dict:
        import yaml

        from .core.simulation import Simulation

        cfg = dataclasses.replace(cfg)
        if state == "resume":
            saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
            cfg.partition_file = saved.get("partition_file")  # the run keeps its own partition.npz
            sim = Simulation(cfg, resume=path, dataset=self.dataset(cfg), progress=self.progress, **self._hooks())
        else:
            if state == "stale":  # killed before it wrote its config: nothing to resume
                for c in path.iterdir():
                    c.unlink()
            ds = self.dataset(cfg)
            if self.share_partitions and not cfg.partition_file:
                cfg.partition_file = str(self.shared_partition(cfg, ds))
            sim = Simulation(cfg, run_dir=path, dataset=ds, progress=self.progress, **self._hooks())
        return sim.run().summary

    def _hooks(self) -> dict:
        return {"hooks": self.hooks} if self.hooks is not None else {}

    def dataset(self, cfg: RunConfig):
        """``cfg``'s dataset, loaded once for the runs that use it (one dataset in memory at a time)."""
        from .data import load_dataset

        key = (cfg.dataset, cfg.data_root, cfg.download, cfg.class_subset)
        if key != self._ds_key:
            self._ds, self._ds_key = None, None
            self._ds = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.class_subset)
            self._ds_key = key
        return self._ds

    def shared_partition(self, cfg: RunConfig, ds) -> Path:
        """OUT_DIR/partitions/<dataset>_<partition>_<clients>c_s<seed>_<hash>.npz: made by the first run of its
        scenario and seed, read by the others (the partition is a function of both)."""
        from .core.simulation import build_partition

        spec = {k: getattr(cfg, k) for k in PARTITION_FIELDS}
        digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:8]
        ds_name = _UNSAFE.sub("-", str(cfg.dataset)).strip("-.")[-40:]
        path = self.out_dir / PARTITIONS / f"{ds_name}_{cfg.partition}_{cfg.clients}c_s{cfg.seed}_{digest}.npz"
        if not path.is_file():
            build_partition(cfg, ds).save(path)
        return path

    def _write_record(self, results: dict[str, PointResult]) -> None:
        if self.record is None:
            return
        from .results.rundir import atomic_write_text, dumps

        points = [{"name": r.point.name, "seed": r.point.seed, "options": r.point.options, "params": r.point.params,
                   "status": r.status, **({"error": r.error} if r.error else {})} for r in results.values()]
        counts: dict[str, int] = {}
        for r in results.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        data = {**self.record, "out_dir": str(self.out_dir), "counts": counts, "points": points,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(self.out_dir / SWEEP_FILE, dumps(data) + "\n")

    # --------------------------------------------------------------------------------------- report
    def finished(self) -> list[Path]:
        return [self.path(p) for p in self.points if run_state(self.path(p)) == "complete"]

    def report(self, title: str | None = None, command: str | None = None):
        """report.md, report.csv and curves.png of the grid's finished runs, grouped over seeds; returns the groups."""
        from .results.report import group_runs, write_report

        runs = self.finished()
        if not runs:
            return []
        groups = group_runs(runs, resolve_params=resolved_params)
        write_report(groups, markdown=self.out_dir / "report.md", csv_path=self.out_dir / "report.csv",
                     plot=self.out_dir / "curves.png", title=title or f"Sweep {self.out_dir.name}", command=command)
        return groups


def _dir_status(path: Path) -> str:
    from .results.rundir import RunDir

    return RunDir(path).status or "pending"


# ------------------------------------------------------------------------------------------ command line
class _RunOptionParser(argparse.ArgumentParser):
    """The options after ``--``: those of ``fedforge run``; errors are one sentence (ConfigError, exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            extra = message.split(":", 1)[1].split()
            flag = next((t for t in extra if t.startswith("-")), extra[0] if extra else "")
            flags = [s for a in self._actions for s in a.option_strings]
            raise ConfigError(f"unknown run option '{flag}' after --{suggest(flag, flags)}; see `fedforge run --help`.")
        raise ConfigError(f"bad run option after --: {message}; see `fedforge run --help`.")


def parse_run_options(argv: list[str]) -> argparse.Namespace:
    """The run options after ``--``, parsed exactly like those of ``fedforge run`` (``config.add_config_options``)."""

    p = _RunOptionParser(prog="fedforge sweep ... --", add_help=False)
    add_config_options(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fedforge sweep`` (errors in them: one sentence and exit code 2)."""
    p.description = __doc__
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the run options' --seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="values of an algorithm hyper-parameter to sweep, repeatable; ALGO.KEY=... applies to the runs "
                        "of that algorithm only (e.g. --set fedprox.mu=0.01,0.1)")
    p.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2",
                   help="values of a run option to sweep, repeatable (e.g. --grid algorithm=fedavg,ditto --grid lr=0.01,0.005)")
    p.add_argument("--out-dir", required=True, help="folder of the sweep: one run directory per point, sweep.json, report")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar for each run (the bar over the grid stays; `fedforge -q` hides it too)")
    p.add_argument("run_options", nargs="*", metavar="-- RUN_OPTIONS",
                   help="after --: options of `fedforge run` shared by every run (e.g. -- --dataset fmnist --rounds 50)")

    def error(message: str):
        p.exit(2, f"fedforge sweep: error: {message}; see `fedforge sweep --help`.\n")

    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = parse_known(args, namespace)
        if extra:
            error(f"unknown sweep option {extra[0]} (run options go after --, e.g. fedforge sweep --seeds 0,1 "
                  f"--out-dir DIR -- {extra[0]} ...)")
        return ns, extra

    p.error = error  # type: ignore[method-assign]
    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def command_line(args: argparse.Namespace) -> str:
    parts = ["fedforge", "sweep"]
    if args.seeds is not None:
        parts += ["--seeds", args.seeds]
    for s in args.set:
        parts += ["--set", s]
    for g in args.grid:
        parts += ["--grid", g]
    parts += ["--out-dir", str(args.out_dir)]
    if args.no_progress:
        parts.append("--no-progress")
    return shlex.join(parts + ["--", *args.run_options])


def from_args(args: argparse.Namespace) -> Sweep:
    """The sweep that ``fedforge sweep`` options describe (every bad input raises a ConfigError here)."""

    run_opts = parse_run_options(list(args.run_options))
    shared = config_from_args(run_opts)  # the shared options alone must make a valid config
    base = load_yaml(run_opts.config) if run_opts.config else {}
    overrides = {k: v for k, v in vars(run_opts).items() if k in _FIELDS}
    params = parse_assignments(run_opts.set)
    if "out" in overrides:
        raise ConfigError("the sweep names each run's directory under --out-dir; drop --out from the run options.")
    base.pop("out", None)
    if args.seeds is not None:
        if "seed" in overrides:
            raise ConfigError("give the seeds with --seeds only; drop --seed from the run options after --.")
        seeds = parse_seeds(args.seeds)
    else:
        seeds = [shared.seed]
    grid = [parse_axis(g, "--grid") for g in args.grid]
    sets = [parse_axis(s, "--set") for s in args.set]
    for a in grid:
        if a.key in overrides:
            raise ConfigError(f"{a.key} is both swept (--grid) and fixed after -- (--{a.key.replace('_', '-')}); keep one.")
    for a in sets:
        if a.key in params:
            raise ConfigError(f"hyper-parameter {a.key} is both swept (--set before --) and fixed after -- (--set "
                              f"{a.key}=...); keep one.")
    points = make_points(shared.algorithm, seeds, grid, sets)
    record = {"command": command_line(args), "seeds": seeds,
              "grid": {a.key: list(a.values) for a in grid},
              "set": {(f"{a.scope}." if a.scope else "") + a.key: list(a.values) for a in sets},
              "run_options": list(args.run_options)}
    quiet = bool(getattr(args, "quiet", False))
    return Sweep(Path(args.out_dir), points, base=base, overrides=overrides, params=params,
                 progress=not args.no_progress, bar=not quiet, record=record,
                 say=(lambda msg: None) if quiet else _say, hooks=getattr(args, "hooks", None))


def main_from_args(args: argparse.Namespace) -> int:
    """``fedforge sweep``: run the grid, then write the report; the exit code of the first failed run (0: all done)."""
    from .results.report import format_text, group_table

    sweep = from_args(args)
    results = sweep.run()
    groups = sweep.report(command=sweep.record["command"] if sweep.record else None)
    if groups:
        columns, rows = group_table(groups, compact=True)
        print(format_text(rows, columns))
        print(f"written: {sweep.out_dir / 'report.md'}, {sweep.out_dir / 'report.csv'}, {sweep.out_dir / 'curves.png'}")
    failed = [r for r in results if r.status == "failed"]
    ran = sum(r.ran and r.status == "complete" for r in results)
    kept = sum(not r.ran and r.status == "complete" for r in results)
    print(f"sweep: {len(results)} runs: {ran} run now, {kept} kept from earlier"
          + (f", {len(failed)} failed" if failed else ""), file=sys.stderr)
    for r in failed:
        print(f"  {r.point.name}: {r.error}", file=sys.stderr)
    return failed[0].exit_code if failed else 0

