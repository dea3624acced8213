"""The `fedforge` command-line tool: run, partition, list, report."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, add_config_options, config_from_args, load_yaml, parse_assignments
from .errors import FedforgeError

log = logging.getLogger("fedforge")

# ------------------------------------------------------------------------------------------ options
# ----------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from . import algorithms  # noqa: F401
    from .core.simulation import Simulation

    resume = getattr(args, "resume", None)
    if _no_options(args):
        from .quickstart import run_quickstart

        run_quickstart(progress=not args.no_progress)
        return 0
    if resume:
        from .core.simulation import resume_config

        names = {f.name for f in dataclasses.fields(RunConfig)}
        cfg = resume_config(resume, load_yaml(args.config) if getattr(args, "config", None) else None,
                            {k: v for k, v in vars(args).items() if k in names}, parse_assignments(getattr(args, "set", [])))
    else:
        cfg = config_from_args(args)
    sim = Simulation(cfg, run_dir=cfg.out or None, progress=not args.no_progress, resume=resume,
                     hooks=getattr(args, "hooks", None))
    log.info("%s", sim.describe())
    log.info("run directory: %s", sim.run_dir.path if sim.run_dir else "-")
    res = sim.run()
    s = res.summary

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    print(f"finished {cfg.rounds} rounds in {s['wall_seconds']:.1f}s ({s['seconds_per_round']:.2f}s/round)")
    for label in ("best", "last", "mean_last5"):
        print(f"  {label:<10} global_acc={fmt(s[label].get('global_acc'))}  personalized_acc={fmt(s[label].get('personalized_acc'))}")
    if s.get("new_clients"):  # --new-clients: the unseen clients, before and after fine-tuning the global model
        nc = s["new_clients"]
        print(f"  new clients {', '.join(map(str, nc['clients']))}: acc before={fmt(nc['before'])}  after "
              f"{nc['fine_tune_epochs']} fine-tuning epoch(s)={fmt(nc['after'])}")
    print(f"results: {res.path}")
    return 0


def _no_options(args: argparse.Namespace) -> bool:
    """`fedforge run` alone (at most --no-progress): the quick start."""
    from .options import values_from_args

    return not (values_from_args(args, RunConfig) or getattr(args, "config", None) or getattr(args, "set", None)
                or getattr(args, "resume", None))


def cmd_partition(args: argparse.Namespace) -> int:
    from .core.simulation import build_partition
    from .data import load_dataset
    from .data.partition import plot_heatmap
    from .results.rundir import atomic_write_text, dumps

    cfg = config_from_args(args)
    export_dir = getattr(args, "export_pfllib", None)
    if export_dir:
        from .data.export import check_export_dir

        check_export_dir(export_dir)  # refuse before any work is done
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.class_subset)
    part = build_partition(cfg, ds)
    if part.domains:  # feature shift: the exported images are those of each client's domain
        from .data.domains import apply_domains

        ds = apply_domains(ds, part)
    stats = part.stats(ds.y, ds.num_classes)
    out = Path(cfg.out) if cfg.out else Path("partitions") / (
        f"{ds.name.replace(':', '-').replace('/', '_')}_{part.scheme}_{part.num_clients}c_s{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    part.save(out / "partition.npz")
    atomic_write_text(out / "partition_stats.json", dumps(stats) + "\n")
    params = ", ".join(f"{k} {v}" for k, v in part.params.items())
    plot_heatmap(stats, out / "partition.png", title=f"{ds.name}: {part.scheme} partition ({params}), samples per "
                 f"client and class")
    tr, te = stats["train_counts"], stats["test_counts"]
    print(f"{ds.name}: {part.scheme} partition of {stats['samples']:,} samples over {part.num_clients} clients "
          f"({ds.num_classes} classes), seed {cfg.seed}")
    print(f"{'client':>6} {'train':>7} {'test':>6} {'classes':>7}  largest classes (class:count)")
    for i in range(part.num_clients):
        tot = [a + b for a, b in zip(tr[i], te[i])]
        top = sorted(((n, c) for c, n in enumerate(tot) if n), reverse=True)[:5]
        print(f"{i:>6} {sum(tr[i]):>7} {sum(te[i]):>6} {sum(1 for n in tot if n):>7}  " + " ".join(f"{c}:{n}" for n, c in top))
    sp = stats["samples_per_client"]
    print(f"samples per client: min {sp['min']}, max {sp['max']}, mean {sp['mean']:.1f}, std {sp['std']:.1f}")
    print(f"written: {out / 'partition.npz'}, {out / 'partition_stats.json'}, {out / 'partition.png'}")
    if export_dir:
        from .data.export import export_pfllib

        print(f"written in PFLlib's layout: {export_pfllib(ds, part, export_dir, batch_size=cfg.batch_size)}")
    return 0


def _listing() -> dict[str, Callable[[], list[tuple[str, str]]]]:
    def algorithms_():
        from .algorithms import ALGORITHMS

        return [(e.name, e.summary) for e in ALGORITHMS.entries()]

    def datasets_():
        from .data import SOURCES, data_root

        root = data_root()
        out = []
        for e in SOURCES.entries():
            need = e.meta.get("needs_file")
            where = "" if not need else (" [cached]" if (root / need).is_file() else f" [not in {root}]")
            out.append((e.name, e.summary + where))
        return out

    def models_():
        from .models import GROUPS, MODELS

        return [(e.name, e.summary) for e in MODELS.entries()] + [
            (e.name, "group: " + ", ".join(e.obj)) for e in GROUPS.entries()]

    def partitioners_():
        from .data import PARTITIONERS

        return [(e.name, e.summary) for e in PARTITIONERS.entries()]

    def executors_():
        from .core import EXECUTORS

        return [(e.name, e.summary) for e in EXECUTORS.entries()]

    out = {"algorithms": algorithms_, "datasets": datasets_, "models": models_, "partitioners": partitioners_,
           "executors": executors_}
    try:
        from .generative import GENERATORS

        out["generators"] = lambda: [(e.name, e.summary) for e in GENERATORS.entries()]
    except ImportError:
        pass
    return out


def cmd_list(args: argparse.Namespace) -> int:
    import fnmatch

    from .errors import ConfigError, suggest

    listing = _listing()
    kinds = list(listing) if args.what in (None, "all") else [args.what]
    for k in kinds:
        if k not in listing:
            raise ConfigError(f"cannot list '{k}'{suggest(k, listing)}; choose one of {', '.join(listing)}.")
    for k in kinds:
        if k == "algorithms":
            _list_algorithms(args.pattern)
        else:
            rows = [(n, s) for n, s in listing[k]() if not args.pattern or fnmatch.fnmatch(n, args.pattern)]
            print(f"{k}:")
            width = max((len(n) for n, _ in rows), default=0)
            for n, s in rows:
                print(f"  {n.ljust(width)}  {s}")
        if len(kinds) > 1:
            print()
    return 0


def _list_algorithms(pattern: str | None) -> None:
    """The algorithms grouped by family, each with what it does and its paper."""
    from .algorithms import ALGORITHMS
    from .core.algorithm import FAMILIES, family_of

    print("algorithms:")
    entries = list(ALGORITHMS.entries(pattern))
    width = max((len(e.name) for e in entries), default=0)
    for key, title in FAMILIES:
        rows = [e for e in entries if family_of(e.obj) == key]
        if not rows:
            continue
        print(f"  {title}:")
        for e in rows:
            print(f"    {e.name.ljust(width)}  {e.summary}")
            if getattr(e.obj, "paper", ""):
                print(f"    {' ' * width}  paper: {e.obj.paper}")


def cmd_report(args: argparse.Namespace) -> int:
    from .results.report import find_runs, format_csv, format_text, group_runs, group_table, rows_for, write_report

    runs, skipped = find_runs(args.runs)
    for path, status in skipped:
        log.warning("skipped %s: not finished (status: %s)", path, status)
    if not runs:
        from .errors import ConfigError

        raise ConfigError(f"no finished run in {', '.join(args.runs)}; a run is finished when it has a summary.json.")
    if not args.group_by_seed:  # one row per run
        rows, columns = rows_for([str(p) for p in runs]), None
    else:
        from .sweep import resolved_params

        groups = group_runs(runs, resolve_params=resolved_params)
        columns, rows = group_table(groups)
    if args.format == "csv":
        sys.stdout.write(format_csv(rows, columns))
    else:
        print(format_text(rows, columns))
    if args.csv:
        Path(args.csv).write_text(format_csv(rows, columns))
        print(f"written: {args.csv}")
    if args.group_by_seed and (args.markdown or args.plot):
        for path in write_report(groups, markdown=args.markdown, plot=args.plot):
            print(f"written: {path}")
    elif args.plot:
        from .results.plots import plot_comparison
        from .results.rundir import RunDir

        plot_comparison({p.name: RunDir(p).read_metrics() for p in runs}, args.plot)
        print(f"written: {args.plot}")
    if args.markdown and not args.group_by_seed:
        from .results.report import format_markdown, write_markdown

        write_markdown(args.markdown, "# Report\n\n" + format_markdown(rows, columns) + "\n")
        print(f"written: {args.markdown}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import main_from_args

    return main_from_args(args)


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="fedforge", description="Federated learning research: personalized, heterogeneous, generator-assisted.")
    p.add_argument("--version", action="version", version=f"fedforge {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run one experiment (no options: FedAvg on digits, offline)")
    add_config_options(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run from its last checkpoint "
                   "(options given must match the run's own, except those that do not change results)")
    r.set_defaults(func=cmd_run)

    pa = sub.add_parser("partition", help="partition a dataset, print its statistics, write a heat-map")
    add_config_options(pa)
    pa.add_argument("--export-pfllib", metavar="DIR", help="also write the split in PFLlib's layout (config.json, "
                    "train/<i>.npz, test/<i>.npz) into DIR, a new or empty directory or an earlier export")
    pa.set_defaults(func=cmd_partition)

    li = sub.add_parser("list", help="list algorithms, datasets, models, partitioners, executors")
    li.add_argument("what", nargs="?", default="all", help="what to list (default: all)")
    li.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'fed*'")
    li.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="compare finished runs: one row per group of seeds, mean ± std (text, CSV, "
                         "Markdown, plot)")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders that hold them (one level "
                     "down, e.g. a sweep's --out-dir; unfinished runs there are skipped)")
    rep.add_argument("--format", choices=("text", "csv"), default="text")
    rep.add_argument("--group-by-seed", action=argparse.BooleanOptionalAction, default=True,
                     help="one row per group of runs that differ only in their seed, with mean ± std over the seeds "
                          "(default); --no-group-by-seed: one row per run")
    rep.add_argument("--csv", help="also write the table to this CSV file")
    rep.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown (text below "
                     "<!-- notes --> in an existing FILE is kept)")
    rep.add_argument("--plot", help="also write a PNG of accuracy per round: one curve per group (mean, ±std band), "
                     "a panel per view (global, personalized); with --no-group-by-seed one curve per run")
    rep.set_defaults(func=cmd_report)

    sw = sub.add_parser("sweep", help="run a grid of runs (seeds × hyper-parameters × run options), resumable, "
                        "then report mean ± std over seeds", formatter_class=argparse.RawDescriptionHelpFormatter)
    from .sweep import add_arguments as add_sweep_arguments

    add_sweep_arguments(sw)
    sw.set_defaults(func=cmd_sweep)

    from .commands import COMMANDS

    for e in COMMANDS.entries():
        sp = sub.add_parser(e.name, help=e.obj.help)
        e.obj.add_arguments(sp)
        sp.set_defaults(func=e.obj.run)
    return p


def main(argv: list[str] | None = None, hooks: Any = None) -> int:
    """The command-line tool. ``hooks`` (a :class:`fedforge.core.simulation.SessionHooks`) wraps parts of a run
    from outside, e.g. fault injection in tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.hooks = hooks
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="fedforge: %(message)s", stream=sys.stderr)
    if args.command is None:  # `fedforge` alone shows help; `fedforge run` runs the default experiment
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except FedforgeError as e:
        from .core.faults import AlreadyComplete, RunInterrupted

        if isinstance(e, (AlreadyComplete, RunInterrupted)):  # not errors: say what happened and how to go on
            print(f"fedforge: {e}", file=sys.stderr)
            return e.exit_code
        print(f"fedforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fedforge: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
