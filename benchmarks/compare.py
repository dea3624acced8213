"""Compare algorithms on one scenario (same data, partition and seed): a markdown table and one plot of curves.

Usage (the issue-3 scenario):

    scripts/cpu-slot .venv/bin/python benchmarks/compare.py \\
        --algorithms fedavg,local,fedprox,scaffold --dataset fmnist --partition dirichlet --alpha 0.1 \\
        --clients 20 --model cnn --batch-size 10 --local-epochs 1 --lr 0.005 --rounds 20 --seed 0 \\
        --out-dir bench-runs/fmnist-dir0.1 --table docs/benchmarks/fmnist-dir0.1.md

Every run option of `fedforge run` is accepted (``--dataset --model --partition --alpha --clients --rounds ...``)
and applies to all algorithms; ``--set ALGO.KEY=VALUE`` sets one algorithm's hyper-parameter (paper defaults
otherwise). The out-dir holds one run directory per algorithm, the shared ``partition.npz`` (made once, so every
method sees the same split) and ``scenario.json``. The script is resumable: a finished run (``summary.json``
present) is skipped, an unfinished one is resumed from its last checkpoint, and the table and plot are rebuilt
after every run from *all* finished runs in the out-dir, so a later call with a longer ``--algorithms`` list only
runs the missing ones. A call whose scenario differs from the out-dir's stops with an error instead of mixing
scenarios. The runs go through :class:`fedforge.sweep.Sweep` (a grid over the algorithms, one seed) and the table
uses :mod:`fedforge.results.report`; `fedforge sweep` is the general tool (seeds, hyper-parameter grids, mean ± std).

Table columns: best, last and mean of the last 5 evaluations of the global and the personalized accuracy (%),
training seconds per round (evaluation excluded), and megabytes uploaded/downloaded per round (all clients).
``--extra-columns KEY,...`` adds a column of `fedforge report` (e.g. ``up_per_client``) or the last recorded value
of any metric (e.g. ``server_loss``, ``global_acc_std``).
Text below the line ``<!-- notes -->`` of an existing table file is kept when the table is rebuilt.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from fedforge.config import RunConfig, build_config, parse_value
from fedforge.errors import ConfigError, FedforgeError
from fedforge.results.report import RESULT_NEUTRAL, markdown_table, write_markdown
from fedforge.sweep import config_diff, resolved_params

# RunConfig fields that are set per algorithm or that do not change results: not part of the scenario
NOT_SCENARIO = ("algorithm", "params", *RESULT_NEUTRAL)
SUMMARY_COLUMNS = [  # (key of fedforge.results.report.rows_for, heading, format)
    ("best_global", "global best", ".2f"), ("last_global", "global last", ".2f"), ("mean5_global", "global mean5", ".2f"),
    ("best_pers", "pers. best", ".2f"), ("last_pers", "pers. last", ".2f"), ("mean5_pers", "pers. mean5", ".2f"),
    ("s_per_round", "s/round", ".2f"), ("up_per_round", "MB up/round", ".3f"), ("down_per_round", "MB down/round", ".3f"),
]


# ------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--algorithms", required=True, help="comma-separated algorithm names, run in this order")
    p.add_argument("--set", action="append", default=[], metavar="ALGO.KEY=VALUE",
                   help="a hyper-parameter of one algorithm, repeatable (e.g. --set fedprox.mu=0.1)")
    p.add_argument("--out-dir", default="bench-runs/compare", help="folder of the run directories (default: %(default)s)")
    p.add_argument("--table", help="markdown file to write (default: OUT_DIR/comparison.md)")
    p.add_argument("--plot", help="PNG of the accuracy curves (default: the table's path with .png)")
    p.add_argument("--title", help="heading of the table and the plot (default: a description of the scenario)")
    p.add_argument("--extra-columns", default="", help="comma-separated metric names to add as columns (last value)")
    p.add_argument("--no-run", action="store_true", help="only rebuild the table and plot from the finished runs")
    p.add_argument("--progress", action="store_true", help="show a progress bar per run")
    g = p.add_argument_group("run options (as for `fedforge run`; shared by every algorithm)")
    for f in dataclasses.fields(RunConfig):
        if f.name in ("algorithm", "out", "params") or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "bool" in str(f.type):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} (default: {default})")
        else:
            g.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                           help=f"{f.metadata.get('help', '')} (default: {default})")
    return p


def parse_sets(items: list[str], algorithms: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        algo, dot, name = key.strip().partition(".")
        if not sep or not dot or not algo or not name:
            raise ConfigError(f"--set expects ALGO.KEY=VALUE (e.g. fedprox.mu=0.1), got '{item}'.")
        if algo not in algorithms:
            raise ConfigError(f"--set {item} names '{algo}', which is not in --algorithms ({', '.join(algorithms)}).")
        out.setdefault(algo, {})[name] = parse_value(value.strip())
    return out


def scenario_of(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.identity().items() if k not in NOT_SCENARIO}


def scenario_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Differences between a stored scenario and this one ('' if none). A key the stored one lacks (a config
    field added since) counts as its default value; a key this one lacks (a field removed since) is ignored."""
    return config_diff(old, new, defaults=scenario_of(RunConfig()))


# -------------------------------------------------------------------------------------------- runs
def run_all(args: argparse.Namespace, base: dict[str, Any], algorithms: list[str], sets: dict[str, dict],
            out_dir: Path, on_finish) -> int:
    """Run the algorithms that have no finished run in ``out_dir``; returns how many ran."""
    from fedforge.core.simulation import build_partition
    from fedforge.sweep import Point, Sweep

    for a in algorithms:  # fail on a bad name or hyper-parameter before any run starts
        resolved_params(a, sets.get(a))
    probe = build_config(overrides={**base, "algorithm": algorithms[0]})
    scenario = scenario_of(probe)
    scen_file = out_dir / "scenario.json"
    if scen_file.exists():
        diff = scenario_diff(json.loads(scen_file.read_text()), scenario)
        if diff:
            raise ConfigError(f"{out_dir} holds runs of another scenario ({diff}); use another --out-dir or delete it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    scen_file.write_text(json.dumps(scenario, indent=2, sort_keys=True) + "\n")

    part_file = Path(probe.partition_file) if probe.partition_file else out_dir / "partition.npz"
    points = [Point(a, probe.seed, {"algorithm": a}, sets.get(a, {})) for a in algorithms]
    sweep = Sweep(out_dir, points, overrides={**base, "partition_file": str(part_file)}, progress=args.progress,
                  bar=False, share_partitions=False, say=lambda msg: print(msg, file=sys.stderr))
    if not part_file.exists() and not probe.partition_file:
        build_partition(probe, sweep.dataset(probe)).save(part_file)
    results = sweep.run(on_finish=lambda r: on_finish())
    failed = [r for r in results if r.status == "failed"]
    if failed:  # a run that stopped on its own (divergence, too many failed clients); the others went on
        on_finish()
        raise failed[0].exception
    return sum(r.ran for r in results)


# ------------------------------------------------------------------------------------------- table
def finished_runs(out_dir: Path, order: list[str]) -> list[Path]:
    found = {p.name: p for p in sorted(out_dir.iterdir()) if p.is_dir() and (p / "summary.json").exists()} if out_dir.is_dir() else {}
    first = [found.pop(a) for a in order if a in found]
    return first + list(found.values())


def _last_value(records: list[dict], summary: dict, key: str) -> Any:
    for r in reversed(records):
        if r.get(key) is not None:
            return r[key]
    return summary.get(key)


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if spec and isinstance(v, (int, float)) and math.isfinite(v):
        return format(v, spec)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def build_table(out_dir: Path, order: list[str], extra: list[str], title: str, command: str,
                plot: Path | None) -> tuple[str, dict[str, list[dict]]]:
    """The Markdown page (without the notes, which :func:`write_markdown` keeps) and each run's metrics."""
    from fedforge import algorithms as _registered  # noqa: F401
    from fedforge.core.algorithm import ALGORITHMS
    from fedforge.results.report import rows_for
    from fedforge.results.rundir import load_run

    runs = finished_runs(out_dir, order)
    rows = rows_for([str(p) for p in runs]) if runs else []
    curves: dict[str, list[dict]] = {}
    heads = ["method", "kind"] + [h for _, h, _ in SUMMARY_COLUMNS] + extra
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    scen_file = out_dir / "scenario.json"
    if scen_file.exists():
        s = json.loads(scen_file.read_text())
        lines += ["Scenario: " + ", ".join(f"{k} {s[k]}" for k in ("dataset", "partition", "alpha", "clients", "model",
                  "batch_size", "local_epochs", "lr", "rounds", "join_ratio", "eval_every", "seed", "precision") if k in s)
                  + "; every method uses the same partition (`partition.npz` of the out-dir).", ""]
    lines += ["Accuracy in % on the clients' test splits, pooled over all clients: *global* judges each client with "
              "the global model, *pers.* with its own model; best, last and mean of the last 5 evaluations "
              "(FedBABU's last evaluation is after fine-tuning). s/round: training seconds per round, evaluation "
              "excluded, on the machine and threads of the run. MB up/down: bytes moved per round, all clients.", ""]
    table: list[list[str]] = []
    hparams: list[str] = []
    for path, row in zip(runs, rows):
        cfg, summary, records = load_run(path)
        algo = cfg.get("algorithm") or path.name
        curves[path.name] = records
        try:
            cls = ALGORITHMS.get(algo)
            kind = "pFL" if cls.personalized else "tFL"
            hp = resolved_params(algo, cfg.get("params"))
        except FedforgeError:
            kind, hp = "?", cfg.get("params") or {}
        cells = [path.name, kind] + [_fmt(row[k], spec) for k, _, spec in SUMMARY_COLUMNS]
        cells += [_fmt(row[key] if key in row else _last_value(records, summary, key)) for key in extra]
        table.append(cells)
        if hp:
            hparams.append(f"- {path.name}: " + ", ".join(f"{k}={v}" for k, v in hp.items()))
    lines += markdown_table(heads, table)
    if not runs:
        lines.append("| (no finished run yet) |" + " |" * (len(heads) - 1))
    if hparams:
        lines += ["", "Hyper-parameters (paper defaults unless set with `--set`):", ""] + hparams
    if plot is not None and curves:
        lines += ["", f"![accuracy per round]({plot.name})"]
    return "\n".join(lines) + "\n", curves


def write_outputs(args: argparse.Namespace, out_dir: Path, algorithms: list[str], extra: list[str], command: str) -> None:
    from fedforge.results.plots import plot_comparison

    table = Path(args.table) if args.table else out_dir / "comparison.md"
    plot = Path(args.plot) if args.plot else table.with_suffix(".png")
    title = args.title or default_title(out_dir)
    md, curves = build_table(out_dir, algorithms, extra, title, command, plot)
    write_markdown(table, md)  # text below the line <!-- notes --> of the file it replaces is kept
    if curves:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_comparison(curves, plot, title=title)
    print(f"table: {table}" + (f", plot: {plot}" if curves else ""), file=sys.stderr)


def default_title(out_dir: Path) -> str:
    f = out_dir / "scenario.json"
    if not f.exists():
        return f"Comparison ({out_dir.name})"
    s = json.loads(f.read_text())
    return (f"{s.get('dataset')}, {s.get('partition')} {s.get('alpha') if s.get('partition') in ('dirichlet', 'exdir') else ''}"
            f", {s.get('clients')} clients, {s.get('model')}, {s.get('rounds')} rounds").replace("  ", " ")


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "benchmarks/compare.py", *argv])
    try:
        algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        if not algorithms:
            raise ConfigError("--algorithms needs at least one algorithm name (see `fedforge list algorithms`).")
        if len(set(algorithms)) != len(algorithms):
            raise ConfigError("--algorithms lists an algorithm twice; each gets one run directory.")
        extra = [c.strip() for c in args.extra_columns.split(",") if c.strip()]
        sets = parse_sets(args.set, algorithms)
        names = {f.name for f in dataclasses.fields(RunConfig)}
        base = {k: v for k, v in vars(args).items() if k in names}
        out_dir = Path(args.out_dir)
        finish = lambda: write_outputs(args, out_dir, algorithms, extra, command)  # noqa: E731
        ran = 0 if args.no_run else run_all(args, base, algorithms, sets, out_dir, finish)
        if not ran:
            finish()
    except FedforgeError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("compare: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
