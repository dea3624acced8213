"""The privacy–accuracy curve: FedAvg's global accuracy under client-level DP-SGD at several ε (and, as a second
curve, under user-level DP-FedAvg on the server at several noise multipliers), mean ± std over seeds.

Scenario: the quick start's (src/fedforge/quickstart.py): scikit-learn's handwritten digits (built in), model mlp,
10 clients, Dirichlet α 0.5, batch 10, lr 0.05, one local epoch, full participation, evaluated every round.
Client-level DP: ``dp_epsilon`` ε with δ = 1e-5, C = 1 (σ per client from Opacus's RDP accountant over the whole
run). User-level DP: ``server_dp_noise`` z with the default fixed clip S = 1, δ = 1e-5. Every setting runs for
every seed (the seed also draws the Dirichlet split, so seeds differ in split, initialisation and noise). Runs go to
``bench-runs/dp-accuracy/<setting>_s<seed>`` (git-ignored); a run whose summary.json exists is kept, an
unfinished one is started again. Writes docs/benchmarks/dp-accuracy.md (table) and dp-accuracy.png (plot).

    # the benchmark
    scripts/cpu-slot .venv/bin/python benchmarks/dp_accuracy.py --data-root /work/shared/data
    # smallest size (the check that it works)
    .venv/bin/python benchmarks/dp_accuracy.py --seeds 0 --rounds 2 --epsilons none,1 --server-noise "" \\
        --out-dir /tmp/dp-acc-smoke --doc /tmp/dp-acc-smoke/dp-accuracy.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SCENARIO = dict(algorithm="fedavg", dataset="digits", model="mlp", clients=10, partition="dirichlet", alpha=0.5,
                batch_size=10, lr=0.05, local_epochs=1, join_ratio=1.0, eval_every=1, threads=1)
DELTA, CLIP = 1e-5, 1.0


def _values(text: str) -> list[float | None]:
    out: list[float | None] = []
    for t in text.split(","):
        t = t.strip().lower()
        if t:
            out.append(None if t in ("none", "inf") else float(t))
    return out


def settings(epsilons: list[float | None], noises: list[float | None]) -> list[dict]:
    """One dict per setting: its name, its kind (none / client / server), its parameter and its run options."""
    out = []
    if None in epsilons or None in noises:
        out.append({"name": "nodp", "kind": "none", "value": None, "options": {}})
    for e in epsilons:
        if e is not None:
            out.append({"name": f"eps{e:g}", "kind": "client", "value": e,
                        "options": {"dp_epsilon": e, "dp_delta": DELTA, "dp_max_grad_norm": CLIP}})
    for z in noises:
        if z is not None:
            out.append({"name": f"z{z:g}", "kind": "server", "value": z,
                        "options": {"server_dp_noise": z, "server_dp_clip": CLIP, "dp_delta": DELTA}})
    return out


def run_one(run: Path, options: dict, seed: int, rounds: int, data_root: str | None) -> None:
    import fedforge

    if (run / "summary.json").is_file():
        return
    if run.exists():  # killed before it finished: start it again (a run takes about a minute)
        shutil.rmtree(run)
    print(f"run {run.name}", flush=True)
    t = time.perf_counter()
    fedforge.run(**SCENARIO, **options, rounds=rounds, seed=seed, data_root=data_root, run_dir=run)
    print(f"  done in {time.perf_counter() - t:.1f} s", flush=True)


def collect(run: Path, setting: dict, rounds: int, batch_size: int) -> dict:
    """What the table needs from one finished run: best and last global accuracy, s/round, the privacy spent."""
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if not r.get("stage")][-1]
    out = {"best": summary["best"]["global_acc"], "last": summary["last"]["global_acc"],
           "s_round": summary["seconds_per_round"], "wall": summary["wall_seconds"], "eps": None, "sigma": None}
    if setting["kind"] == "client":
        from fedforge.core.dp import client_dp
        from fedforge.data.partition import Partition

        out["eps"] = last["dp_epsilon"]
        cache = run / "dp-sigmas.json"  # the run does not write its σ; computing them again takes minutes at ε = 8
        if cache.is_file():
            sigmas = json.loads(cache.read_text())
        else:
            sizes = [len(t) for t in Partition.load(run / "partition.npz").train]
            sigmas = list(client_dp(setting["value"], DELTA, CLIP, sizes, batch_size, rounds, 1).sigmas)  # the run's own
            cache.write_text(json.dumps(sigmas))
        out["sigma"] = (min(sigmas), max(sigmas))
    elif setting["kind"] == "server":
        out["eps"] = last["server_dp_epsilon"]
    return out


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _range(xs: list[float], fmt: str = "{:.3g}") -> str:
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("FEDFORGE_DATA"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epsilons", default="none,8,4,2,1,0.5", help="client-level DP-SGD settings: none and ε values")
    ap.add_argument("--server-noise", default="0.5,1,2", help="user-level DP-FedAvg noise multipliers ('' for none)")
    ap.add_argument("--out-dir", default=str(REPO / "bench-runs" / "dp-accuracy"))
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks" / "dp-accuracy.md"))
    args = ap.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    grid = settings(_values(args.epsilons), _values(args.server_noise))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seed by seed: an interrupted benchmark already has one comparable run per setting
        for s in grid:
            run_one(out / f"{s['name']}_s{seed}", s["options"], seed, args.rounds, args.data_root)

    rows = []
    for s in grid:
        res = [collect(out / f"{s['name']}_s{seed}", s, args.rounds, SCENARIO["batch_size"]) for seed in seeds]
        rows.append({**s, "runs": res})
        b, l = _ms([r["best"] for r in res]), _ms([r["last"] for r in res])
        print(f"{s['name']}: best {b[0]:.4f} ± {b[1]:.4f}, last {l[0]:.4f} ± {l[1]:.4f}", flush=True)
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    fig = doc.with_suffix(".png")
    _figure(rows, fig, args.rounds, seeds)
    doc.write_text(_markdown(rows, args, seeds, fig.name))
    print(f"written: {doc}, {fig}")
    return 0


def _setting_label(s: dict) -> str:
    if s["kind"] == "none":
        return "no DP"
    if s["kind"] == "client":
        return f"client DP-SGD, target ε = {s['value']:g}"
    return f"server DP-FedAvg, z = {s['value']:g}, S = {CLIP:g}"


def _markdown(rows: list[dict], args: argparse.Namespace, seeds: list[int], fig: str) -> str:
    cmd = (f"scripts/cpu-slot .venv/bin/python benchmarks/dp_accuracy.py --data-root $FEDFORGE_DATA --seeds "
           f"{','.join(map(str, seeds))} --rounds {args.rounds} --epsilons {args.epsilons} --server-noise "
           f"'{args.server_noise}'")
    lines = [
        "# Privacy and accuracy: FedAvg under client-level and user-level DP",
        "",
        f"Command: `{cmd}`",
        "",
        f"Scenario (the quick start's): FedAvg, model `mlp`, `digits` (scikit-learn's handwritten digits, built in), "
        f"{SCENARIO['clients']} clients, Dirichlet α = {SCENARIO['alpha']:g} (the split drawn with each seed), batch "
        f"{SCENARIO['batch_size']}, lr {SCENARIO['lr']:g}, {SCENARIO['local_epochs']} local epoch, every client every "
        f"round, {args.rounds} rounds, evaluated after every round; seeds {', '.join(map(str, seeds))}.",
        "",
        f"* **client DP-SGD** (`--dp-epsilon ε --dp-delta {DELTA:g} --dp-max-grad-norm {CLIP:g}`): per-sample "
        f"clipping to C = {CLIP:g} and Gaussian noise in every local step; σ calibrated per client (its own sampling "
        f"rate B/n_i and steps over all {args.rounds} rounds) with Opacus's RDP accountant so that each client spends at "
        f"most ε over the whole run (record-level DP of its data).",
        f"* **server DP-FedAvg** (`--server-dp-noise z --server-dp-clip {CLIP:g}`): each client's model update clipped "
        f"to S = {CLIP:g}, unweighted average, Gaussian noise z·S/m (m = {SCENARIO['clients']}); ε is user-level "
        f"(a whole client's data), from the RDP accountant over {args.rounds} rounds at sampling rate 1, δ = {DELTA:g}.",
        "",
        "Accuracy: the global model on every client's own test data (pooled), mean ± sample std over the seeds; "
        f"*best* is the highest of the run's {args.rounds + 1} evaluations (round 0 included; a maximum over noisy "
        "evaluations, so biased upwards, most where the curve is noise), *last* the one after the last round. "
        "*ε spent*: the last "
        "record's `dp_epsilon` (the client that spent the most) or `server_dp_epsilon`, range over the seeds. *σ*: "
        "the clients' DP-SGD noise multipliers (range over clients and seeds, recomputed with the run's own "
        "calibration, `fedforge.core.dp.client_dp`). s/round: the runs' `seconds_per_round` (one torch thread in a "
        "shared `scripts/cpu-slot`, training and evaluation; not a speed measurement).",
        "",
        "| setting | ε spent | σ | best global acc | last global acc | s/round |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = r["runs"]
        b, l = _ms([x["best"] for x in res]), _ms([x["last"] for x in res])
        eps = "–" if r["kind"] == "none" else _range([x["eps"] for x in res])
        sig = "–" if r["kind"] != "client" else _range([x["sigma"][0] for x in res] + [x["sigma"][1] for x in res])
        sr = statistics.mean(x["s_round"] for x in res)
        lines.append(f"| {_setting_label(r)} | {eps} | {sig} | {100 * b[0]:.2f} ± {100 * b[1]:.2f} % | "
                     f"{100 * l[0]:.2f} ± {100 * l[1]:.2f} % | {sr:.2f} |")
    lines += ["", "Per seed (last global accuracy, %): " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{100 * x['last']:.1f}" for x in r["runs"]) for r in rows),
        "", f"The runs' wall time (`wall_seconds` of their summary.json, summed): "
        f"{sum(x['wall'] for r in rows for x in r['runs']) / 60:.1f} min, on a machine shared with other jobs.", "",
        f"![accuracy against ε]({fig})", ""]
    return "\n".join(lines)


def _figure(rows: list[dict], path: Path, rounds: int, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, ax = plt.subplots(figsize=(6.8, 5.0))
    for kind, label, marker in (("client", "client-level DP-SGD (ε per client, record level)", "o"),
                                ("server", "server DP-FedAvg (ε user level, S = 1)", "s")):
        pts = sorted((statistics.mean(x["eps"] for x in r["runs"]), _ms([x["last"] for x in r["runs"]]))
                     for r in rows if r["kind"] == kind)
        if pts:
            ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts], yerr=[100 * p[1][1] for p in pts],
                        marker=marker, capsize=3, label=label)
    base = [r for r in rows if r["kind"] == "none"]
    if base:
        m, s = _ms([x["last"] for x in base[0]["runs"]])
        ax.axhline(100 * m, color="k", linestyle="--", linewidth=1, label=f"no DP ({100 * m:.1f} %)")
        ax.axhspan(100 * (m - s), 100 * (m + s), color="k", alpha=0.08)
    ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance (10 classes)")
    ax.set_xscale("log")
    xs = sorted({statistics.mean(x["eps"] for x in r["runs"]) for r in rows if r["kind"] != "none"})
    if xs:
        ax.set_xticks([x for x in (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256) if xs[0] / 1.5 <= x <= xs[-1] * 1.5])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ε spent (δ = 1e-5)")
    ax.set_ylabel("global accuracy after the last round (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"FedAvg, mlp on digits, 10 clients, Dir(0.5), {rounds} rounds; mean ± std over {len(seeds)} seed(s)",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
