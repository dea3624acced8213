"""`fedforge report`: a comparison table of several runs, as text, CSV and Markdown.

Two views of the same runs:

* one row per run (:func:`rows_for`, ``--no-group-by-seed``);
* one row per group of runs that differ only in their seed (:func:`group_runs`, :func:`group_table`): mean ± sample
  standard deviation (ddof=1) over the seeds of the best, last and mean-of-last-5 global and personalized accuracy,
  with ``n``, the seeds, and the config fields and hyper-parameters that differ between the groups.

This is a utility layer: it reads run directories and knows nothing of algorithms. A caller that can resolve an
algorithm's hyper-parameters to their full values (defaults filled in) passes ``resolve_params`` so that a run that
set a hyper-parameter to its default groups with one that left it unset.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConfigError, FedforgeError
from .rundir import STATUS_FILE, atomic_write_text, load_run

COLUMNS = [
    ("run", "run"), ("algorithm", "algorithm"), ("dataset", "dataset"), ("model", "model"), ("rounds", "rounds"),
    ("best_global", "best global"), ("best_pers", "best pers."), ("last_global", "last global"), ("last_pers", "last pers."),
    ("mean5_global", "mean5 global"), ("mean5_pers", "mean5 pers."), ("s_per_round", "s/round"),
    ("up_per_round", "MB up/round"), ("down_per_round", "MB down/round"),
    ("params_up_per_round", "M params up/round"), ("params_down_per_round", "M params down/round"),
    ("up_per_client", "kB up/client"), ("down_per_client", "kB down/client"),
]
# accuracy columns (% of the clients' pooled test samples): key → (summary entry, metric)
ACCURACY = {
    "best_global": ("best", "global_acc"), "best_pers": ("best", "personalized_acc"),
    "last_global": ("last", "global_acc"), "last_pers": ("last", "personalized_acc"),
    "mean5_global": ("mean_last5", "global_acc"), "mean5_pers": ("mean_last5", "personalized_acc"),
}
# RunConfig fields that RunConfig.identity() keeps but that do not change a run's numbers: where its split is read
# from (the split itself is a function of the scenario and the seed), how the local updates are executed, on which
# device, and the evaluation batch size. Runs that differ only in these (and in the seed) are one group.
RESULT_NEUTRAL = ("partition_file", "executor", "device", "eval_batch_size")
NOTES_MARK = "<!-- notes -->"

ResolveParams = Callable[[str, dict], dict]


def _pct(v):
    return None if v is None else round(100.0 * v, 2)


# --------------------------------------------------------------------------------------------- per run
def rows_for(paths: list[str]) -> list[dict]:
    return [_row(p, *load_run(p)) for p in paths]


def _row(path: str | os.PathLike, cfg: dict, s: dict, metrics: list[dict]) -> dict:
    r = max(1, s.get("rounds") or 1)
    return {
        "run": Path(path).name, "algorithm": cfg.get("algorithm"), "dataset": cfg.get("dataset"), "model": cfg.get("model"),
        "rounds": s.get("rounds"),
        "best_global": _pct(s["best"].get("global_acc")), "best_pers": _pct(s["best"].get("personalized_acc")),
        "last_global": _pct(s["last"].get("global_acc")), "last_pers": _pct(s["last"].get("personalized_acc")),
        "mean5_global": _pct(s["mean_last5"].get("global_acc")), "mean5_pers": _pct(s["mean_last5"].get("personalized_acc")),
        "s_per_round": round(s.get("seconds_per_round") or 0.0, 2),
        "up_per_round": round((s.get("bytes_up_total") or 0) / r / 1e6, 4),
        "down_per_round": round((s.get("bytes_down_total") or 0) / r / 1e6, 4),
        **_communication(metrics, r),
    }


def _communication(metrics: list[dict], rounds: int) -> dict:
    """Parameters per round (run totals / rounds) and kB per participating client (mean over the logged rounds)."""
    last = metrics[-1] if metrics else {}
    logged = [m for m in metrics if m.get("round", 0) >= 1 and m.get("stage", "train") == "train"]

    def mean(key: str):
        vals = [m[key] for m in logged if m.get(key) is not None]
        return round(sum(vals) / len(vals) / 1e3, 3) if vals else None

    return {"params_up_per_round": round((last.get("params_up_total") or 0) / rounds / 1e6, 4),
            "params_down_per_round": round((last.get("params_down_total") or 0) / rounds / 1e6, 4),
            "up_per_client": mean("bytes_up_per_client"), "down_per_client": mean("bytes_down_per_client")}


# ---------------------------------------------------------------------------------------- finding runs
def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("config.yaml", "summary.json", STATUS_FILE))


def _folder_order(folder: Path) -> dict[str, int]:
    """The order of the points of a sweep folder (its sweep.json), name → position; {} for other folders."""
    try:
        points = json.loads((folder / "sweep.json").read_text()).get("points") or []
        return {str(q["name"]): i for i, q in enumerate(points)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def find_runs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The finished runs named by ``paths``: a run directory stands for itself (it must have finished), a folder
    that is not one stands for the run directories directly inside it (in the grid's order for a sweep folder, else
    by name; unfinished ones are skipped). Returns (runs, [(skipped run, why), ...])."""
    runs: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{p} is not a directory; give run directories or folders that hold them.")
        if is_run_dir(p):
            runs.append(p)  # load_run says why, if it did not finish
            continue
        order = _folder_order(p)
        inside = sorted((c for c in p.iterdir() if is_run_dir(c)), key=lambda c: (order.get(c.name, len(order)), c.name))
        if not inside:
            raise ConfigError(f"{p} is not a run directory and holds none (a run directory has a config.yaml).")
        for c in inside:
            if (c / "summary.json").is_file():
                runs.append(c)
            else:
                skipped.append((c, _status(c)))
    return runs, skipped


def _status(path: Path) -> str:
    try:
        return json.loads((path / STATUS_FILE).read_text()).get("status") or "unknown"
    except (OSError, ValueError, AttributeError):
        return "unknown"


# -------------------------------------------------------------------------------------------- grouping
def comparable(cfg: dict, resolve_params: ResolveParams | None = None, drop: Iterable[str] = ()) -> dict:
    """A run's config (as in its config.yaml) reduced to what determines its numbers: ``RunConfig.identity()``
    minus :data:`RESULT_NEUTRAL` and ``drop``, with the hyper-parameters resolved where ``resolve_params`` is given.
    JSON values (tuples become lists), so that two of them compare with ``==``."""
    from ..config import RunConfig, build_config

    names = {f.name for f in fields(RunConfig)}
    known = {k: v for k, v in (cfg or {}).items() if k in names}
    try:
        ident = build_config(known).identity()
    except FedforgeError:  # a config.yaml of an older version with a value this one rejects: compare it as written
        keep = RunConfig().identity()
        ident = {k: known.get(k, v) for k, v in keep.items()}
    for k in (*RESULT_NEUTRAL, *drop):
        ident.pop(k, None)
    if "params" in ident:
        params = dict(ident.get("params") or {})
        if resolve_params is not None:
            try:
                params = resolve_params(str(ident.get("algorithm")), params)
            except FedforgeError:  # e.g. an algorithm that no longer exists: keep what the run wrote
                pass
        ident["params"] = params
    return json.loads(json.dumps(ident, default=str))


@dataclass
class RunGroup:
    """Runs that differ only in their seed (or one run, without grouping)."""

    config: dict  # the comparable config of the group (without the seed)
    set_params: set = field(default_factory=set)  # hyper-parameters that some run of the group set explicitly
    runs: list[Path] = field(default_factory=list)
    seeds: list = field(default_factory=list)
    configs: list[dict] = field(default_factory=list)
    summaries: list[dict] = field(default_factory=list)
    metrics: list[list[dict]] = field(default_factory=list)
    label: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)


def group_runs(paths: Iterable[str | os.PathLike], by_seed: bool = True,
               resolve_params: ResolveParams | None = None) -> list[RunGroup]:
    """Group finished runs that differ only in ``seed`` (and in fields that do not change results: out, data_root,
    executor, workers, ...); groups keep the order in which their first run appears, runs within a group are sorted
    by seed. ``by_seed=False``: one group per run."""
    groups: dict[str, RunGroup] = {}
    for i, p in enumerate(paths):
        cfg, summary, metrics = load_run(p)
        key_cfg = comparable(cfg, resolve_params, drop=("seed",))
        key = json.dumps(key_cfg, sort_keys=True) if by_seed else f"{i}"
        g = groups.setdefault(key, RunGroup(config=key_cfg))
        g.runs.append(Path(p))
        g.seeds.append(cfg.get("seed", summary.get("seed")))
        g.configs.append(cfg)
        g.summaries.append(summary)
        g.metrics.append(metrics)
        g.set_params |= set(cfg.get("params") or {})
    out = list(groups.values())
    for g in out:
        order = sorted(range(g.n), key=lambda j: (g.seeds[j] is None, g.seeds[j] if isinstance(g.seeds[j], int) else 0))
        for name in ("runs", "seeds", "configs", "summaries", "metrics"):
            setattr(g, name, [getattr(g, name)[j] for j in order])
    _label(out)
    return out


def _label(groups: list[RunGroup]) -> None:
    """Each group's name: its runs' directory name without the ``_s<seed>`` suffix (one run: its name)."""
    seen: dict[str, int] = {}
    for g in groups:
        stripped = {re.sub(rf"[_-]s{re.escape(str(s))}$", "", p.name) for p, s in zip(g.runs, g.seeds)}
        if g.n == 1:
            label = g.runs[0].name
        elif len(stripped) == 1 and next(iter(stripped)):
            label = next(iter(stripped))
        else:
            label = g.runs[0].name + f" (+{g.n - 1})"
        seen[label] = seen.get(label, 0) + 1
        g.label = label if seen[label] == 1 else f"{label} #{seen[label]}"


def _varying(groups: list[RunGroup], shown: Iterable[str]) -> list[tuple[str, str, Callable[[RunGroup], Any]]]:
    """(key, heading, value of a group) for every config field and hyper-parameter whose value differs between the
    groups (fields already in ``shown`` are left out). A hyper-parameter is named by its key, or ``params.<key>``
    where a config field has the same name; the algorithms that do not have it show '-'."""
    from ..config import RunConfig

    if len(groups) < 2:
        return []
    shown = set(shown)
    cfg_names = [f.name for f in fields(RunConfig)]
    out = []
    for k in cfg_names:
        if k in ("params", "seed") or k in shown:
            continue
        vals = [g.config.get(k) for g in groups]
        if any(v != vals[0] for v in vals):
            out.append((k, k, lambda g, k=k: g.config.get(k)))
    hp_keys: list[str] = []
    for g in groups:
        for k in sorted(g.set_params):
            if k not in hp_keys:
                hp_keys.append(k)
    for k in hp_keys:
        vals = [(g.config.get("params") or {}).get(k) for g in groups]
        if any(v != vals[0] for v in vals):
            name = f"params.{k}" if (k in cfg_names or k in shown or k in _METRIC_KEYS) else k
            out.append((name, name, lambda g, k=k: (g.config.get("params") or {}).get(k)))
    return out


_METRIC_KEYS = {k for k, _ in COLUMNS} | {"n", "seeds"}
COMPACT = ["best_global", "last_global", "mean5_global", "best_pers", "last_pers", "mean5_pers",
           "s_per_round", "up_per_round", "down_per_round"]
COMPACT_HEADINGS = {"best_global": "global best", "last_global": "global last", "mean5_global": "global mean5",
                    "best_pers": "pers. best", "last_pers": "pers. last", "mean5_pers": "pers. mean5"}


_DECIMALS = {"s_per_round": 2, "up_per_client": 3, "down_per_client": 3}  # as in the per-run rows


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def group_table(groups: list[RunGroup], compact: bool = False) -> tuple[list[tuple[str, str]], list[dict]]:
    """(columns, rows) with one row per group. Accuracy columns (in %) hold the mean over the group's runs and,
    under ``<key>_std``, the sample standard deviation (ddof=1; None for one run); other numeric columns hold the
    mean. ``compact``: the accuracies, seconds and megabytes per round only (for Markdown); otherwise every column
    of the per-run report."""
    fixed = ["run", "algorithm"] if compact else ["run", "algorithm", "dataset", "model", "rounds"]
    varying = _varying(groups, fixed)
    metric_keys = COMPACT if compact else [k for k, _ in COLUMNS if k not in fixed]
    heads = dict(COLUMNS) | (COMPACT_HEADINGS if compact else {})
    columns = [(k, heads[k]) for k in fixed] + [(k, h) for k, h, _ in varying] + [("n", "n"), ("seeds", "seeds")]
    columns += [(k, heads[k]) for k in metric_keys]
    rows = []
    for g in groups:
        per_run = [_row(p, c, s, m) for p, c, s, m in zip(g.runs, g.configs, g.summaries, g.metrics)]
        row: dict[str, Any] = {"run": g.label, "algorithm": g.config.get("algorithm"), "dataset": per_run[0]["dataset"],
                               "model": per_run[0]["model"], "rounds": per_run[0]["rounds"], "n": g.n,
                               "seeds": ",".join(str(s) for s in g.seeds)}
        for k, _, value in varying:
            row[k] = value(g)
        for k in metric_keys:
            if k in ACCURACY:
                part, metric = ACCURACY[k]
                mean, std = _mean_std([None if s[part].get(metric) is None else 100.0 * s[part][metric]
                                       for s in g.summaries])
                row[k] = None if mean is None else round(mean, 2)
                row[f"{k}_std"] = None if std is None else round(std, 2)
            else:
                mean, _ = _mean_std([r[k] for r in per_run])
                row[k] = None if mean is None else round(mean, _DECIMALS.get(k, 4))
        rows.append(row)
    return columns, rows


# ------------------------------------------------------------------------------------------ formatting
def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    return str(v)


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if key in ACCURACY and f"{key}_std" in row:  # a grouped row: mean ± std, or the value alone for one run
        if v is None:
            return "-"
        std = row.get(f"{key}_std")
        return f"{v:.2f}" if std is None else f"{v:.2f} ± {std:.2f}"
    return "-" if v is None else (str(v) if not isinstance(v, (bool, list, tuple, dict)) else _value(v))


def format_text(rows: list[dict], columns: list[tuple[str, str]] | None = None) -> str:
    columns = columns or COLUMNS
    heads = [h for _, h in columns]
    table = [[_cell(row, k) for k, _ in columns] for row in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


def format_csv(rows: list[dict], columns: list[tuple[str, str]] | None = None) -> str:
    """CSV with one column per key; a grouped row's accuracy columns are followed by their ``<key>_std``."""
    keys = []
    for k, _ in columns or COLUMNS:
        keys.append(k)
        if k in ACCURACY and any(f"{k}_std" in r for r in rows):
            keys.append(f"{k}_std")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows([{k: (_value(r.get(k)) if isinstance(r.get(k), (bool, list, tuple, dict)) else r.get(k)) for k in keys}
                 for r in rows])
    return buf.getvalue()


def markdown_table(heads: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table."""
    return ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + ["| " + " | ".join(r) + " |" for r in rows]


def format_markdown(rows: list[dict], columns: list[tuple[str, str]] | None = None) -> str:
    columns = columns or COLUMNS
    return "\n".join(markdown_table([h for _, h in columns], [[_cell(r, k) for k, _ in columns] for r in rows]))


# ---------------------------------------------------------------------------------- Markdown with notes
def read_notes(path: str | os.PathLike) -> str:
    """The text below the line ``<!-- notes -->`` of an existing Markdown file ('' if none)."""
    path = Path(path)
    if not path.is_file():
        return ""
    text = path.read_text()
    return text.split(NOTES_MARK, 1)[1].lstrip("\n") if NOTES_MARK in text else ""


def with_notes(markdown: str, notes: str) -> str:
    """``markdown`` followed by the notes marker and ``notes`` (which a rebuild of the file keeps)."""
    lines = [markdown.rstrip("\n"), "", NOTES_MARK]
    if notes:
        lines.append(notes.rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_markdown(path: str | os.PathLike, markdown: str) -> Path:
    """Write ``markdown`` to ``path``, keeping the notes below ``<!-- notes -->`` of the file it replaces."""
    path = Path(path)
    notes = read_notes(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, with_notes(markdown, notes))


# ------------------------------------------------------------------------------------------ the report
GROUPED_NOTE = ("Accuracy in % on the clients' test splits, pooled over all clients: *global* judges each client with "
                "the global model, *pers.* with its own model; best, last and mean of the last 5 evaluations of each "
                "run, then mean ± sample standard deviation (ddof=1) over the n runs of a row, which differ only in "
                "their seed (one run: its value). s/round: training seconds per round; MB up/down: bytes moved per "
                "round, all clients (means over the runs).")


def markdown_report(groups: list[RunGroup], title: str = "Report", command: str | None = None,
                    plot: str | None = None) -> str:
    columns, rows = group_table(groups, compact=True)
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [GROUPED_NOTE, "", format_markdown(rows, columns)]
    if plot:
        lines += ["", f"![accuracy per round, mean ± std over seeds]({plot})"]
    return "\n".join(lines) + "\n"


def write_report(groups: list[RunGroup], *, markdown: str | os.PathLike | None = None,
                 csv_path: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
                 title: str = "Report", command: str | None = None) -> list[Path]:
    """Write the grouped report: Markdown (notes below ``<!-- notes -->`` kept), CSV (every column, means and
    stds), and the plot (one curve per group, mean ± std band). Returns the paths written."""
    from .plots import plot_groups

    written = []
    if plot:
        written.append(plot_groups({g.label: g.metrics for g in groups}, plot, title=title))
    if markdown:
        rel = None
        if plot:
            rel = os.path.relpath(Path(plot).resolve(), Path(markdown).resolve().parent)
        written.append(write_markdown(markdown, markdown_report(groups, title, command, rel)))
    if csv_path:
        columns, rows = group_table(groups)
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        written.append(atomic_write_text(csv_path, format_csv(rows, columns)))
    return written
