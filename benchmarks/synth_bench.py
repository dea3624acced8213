"""Benchmark of `fedforge synth`: none / rf / pe / pcevolve on CIFAR-100 classes 50-59 with a built-in generator v2.

Generators (``--generator``), each a class-conditional GAN trained on the fixed generator split
(:mod:`fedforge.generative.split`: 400 of each class's 600 CIFAR-100 images):

* ``builtin`` (classes 0-49, ``assets/builtin-cifar100-0-49``): the private classes 50-59 are new to it;
* ``builtin-c100`` (all 100 classes, ``assets/builtin-cifar100``): it covers the task's classes, and the prompt
  "A photo image of mouse" selects its class ``mouse``;
* ``builtin:DIR`` (a generator folder of your own; not a shipped one, so no provenance check: tests and trials).

Whatever the generator, the private context (10 images per class, a seeded draw per seed) and the test set (the
other 190 per class) come from the 200 held-out images per class of classes 50-59, which no generator v2 saw.

Resumable: a run whose row is in results.jsonl is skipped (one row per generator, selector, ε and seed); an
unfinished run directory is started again. Each finished run appends its numbers to
docs/benchmarks/synth/results.jsonl (with a ``generator`` field; rows without one are the version-1 runs) and copies
its first and last sample grids next to it (seed 0 only); ``--commit`` commits them after each run; ``--write-doc``
writes docs/benchmarks/synth.md from that file.

    scripts/cpu-slot .venv/bin/python benchmarks/synth_bench.py --data-root /work/shared/data --generator builtin --commit
    scripts/cpu-slot .venv/bin/python benchmarks/synth_bench.py --data-root /work/shared/data --generator builtin-c100 --commit
    .venv/bin/python benchmarks/synth_bench.py --write-doc --commit
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks" / "synth"
DOC = REPO / "docs" / "benchmarks" / "synth.md"
TASK_CLASSES = "50-59"
SHIPPED = ("builtin", "builtin-c100")  # the shipped generators v2, in the order of the doc's sections
V1_LABEL = "builtin v1 (GAN, unconditional)"
TITLES = {"builtin": "builtin v2 (class-conditional GAN, CIFAR-100 classes 0-49: the task's classes are new to it)",
          "builtin-c100": "builtin-c100 v2 (class-conditional GAN, all 100 CIFAR-100 classes: it covers the task's classes)"}
SELECTORS = ("none", "rf", "pe", "pcevolve")


# ------------------------------------------------------------------------------------------------ rows and names
def generator_slug(spec: str) -> str:
    """The generator's part of a run's name: ``builtin``, ``builtin-c100``, or ``dir-<folder name>`` for builtin:DIR."""
    if spec in SHIPPED:
        return spec
    kind, _, arg = spec.partition(":")
    if kind != "builtin" or not arg:
        raise SystemExit(f"--generator takes builtin, builtin-c100 or builtin:DIR, not '{spec}'.")
    return "dir-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(arg).expanduser().resolve().name)


def _eps_s(eps: float | None) -> str:
    return "inf" if eps is None or math.isinf(eps) else f"{eps:g}"


def run_name(selector: str, eps: float, seed: int, tag: str, generator: str | None = None) -> str:
    """``<tag>-<generator>-<selector>-eps<ε>-s<seed>`` (version-1 rows: no generator part)."""
    gen = f"{generator_slug(generator)}-" if generator else ""
    return f"{tag}-{gen}{selector}-eps{_eps_s(eps)}-s{seed}"


def read_rows(results: Path) -> list[dict]:
    if not results.is_file():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _done(results: Path) -> dict[str, dict]:
    return {r["name"]: r for r in read_rows(results)}


# ------------------------------------------------------------------------------------------------ the generator
def generator_folder(spec: str) -> Path:
    from fedforge.generative.builtin import C100_ASSET, DEFAULT_ASSET, default_asset_dir

    if spec == "builtin":
        return default_asset_dir(DEFAULT_ASSET)
    if spec == "builtin-c100":
        return default_asset_dir(C100_ASSET)
    generator_slug(spec)  # refuses other specs
    return Path(spec.partition(":")[2]).expanduser()


def shipped_generator(spec: str = "builtin") -> dict:
    """Provenance of the generator ``spec``. A shipped one (builtin, builtin-c100) must be committed as it is and be a
    class-conditional v2; a builtin:DIR folder is taken as it is (recorded as not committed)."""
    from fedforge.generative.builtin import CONFIG, WEIGHTS

    folder = generator_folder(spec)
    files = [folder / WEIGHTS, folder / CONFIG]
    missing = [f for f in files if not f.is_file()]
    if missing:
        how = (f"train and install it with `scripts/cpu-slot .venv/bin/python benchmarks/generator_builtin.py "
               f"--variant {spec} --data-root /work/shared/data --out bench-runs/generator-v2-{spec} --commit`, "
               f"or wait for the shipped weights" if spec in SHIPPED else "pass a folder written by train_cgan")
        raise SystemExit(f"the {spec} generator is not in {folder} ({missing[0].name} is missing); {how}.")
    committed = False
    if spec in SHIPPED:
        rel = [str(f.relative_to(REPO)) for f in files]
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", *rel], cwd=REPO, capture_output=True).returncode == 0
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *rel], cwd=REPO).returncode == 0
        if not (tracked and clean):
            raise SystemExit(f"the {spec} generator in {folder} is not the committed one (tracked={tracked}, "
                             f"unchanged={clean}); wait for the shipped weights.")
        committed = True
    cfg = json.loads(files[1].read_text())
    if cfg.get("architecture") != "cgan":
        raise SystemExit(f"the {spec} generator in {folder} is the unconditional GAN of version 1, not the "
                         f"class-conditional v2 this benchmark compares; wait for the v2 weights.")
    return {"generator": spec, "generator_version": 2, "generator_steps": cfg.get("steps"),
            "generator_classes": [min(cfg["classes"]), max(cfg["classes"])] if cfg.get("classes") else None,
            "generator_committed": committed,
            "generator_sha256": hashlib.sha256(files[0].read_bytes()).hexdigest()[:16]}


def prompt_classes(gen, ds) -> list[int | None]:
    """Per task class, the dataset class id the generator draws for its prompt ("A photo image of <name>"), or None
    where the prompt names none of the generator's classes (each candidate then keeps the class of its own latent).
    Raises SystemExit when a prompt selects a class other than the task's own."""
    import torch

    from fedforge.synth.protocol import Server

    lo = int(ds.meta["class_subset"][0])
    server = Server(gen, ds.num_classes, 1, ds.input_shape, labels=ds.class_names)
    z = gen.sample_prior(4, 0)
    out: list[int | None] = []
    for c in range(ds.num_classes):
        w = gen.class_latents(z, server.prompt(c))
        if torch.equal(w, z):
            out.append(None)
            continue
        hits = [k for k in gen.classes if torch.equal(gen.class_latents(z, k), w)]
        if hits != [lo + c]:
            raise SystemExit(f"the prompt '{server.prompt(c)}' selects the generator's class {hits} instead of "
                             f"dataset class {lo + c}; check the generator's class names.")
        out.append(hits[0])
    return out


# ------------------------------------------------------------------------------------------------ the data
def held_out_task(data_root: str | None, classes: str = TASK_CLASSES):
    """CIFAR-100 classes A-B restricted to the images held out from every generator v2 (200 per class), relabelled
    0..B-A; returns the dataset and the images' positions in the full cache."""
    from fedforge.data import load_dataset
    from fedforge.data.sources import select_classes
    from fedforge.generative.split import HELD_OUT_PER_CLASS, held_out_positions

    full = load_dataset("cifar100", data_root)
    held = held_out_positions(full.y)
    a, b = (int(v) for v in classes.split("-"))
    pos = held[(full.y[held] >= a) & (full.y[held] <= b)]
    ds = select_classes(dataclasses.replace(full, x=full.x[pos], y=full.y[pos]), classes)
    counts = np.bincount(ds.y, minlength=ds.num_classes)
    if not (counts == HELD_OUT_PER_CLASS).all():
        raise SystemExit(f"the held-out split gives {counts.tolist()} images per class, not {HELD_OUT_PER_CLASS}.")
    ds = dataclasses.replace(ds, name=f"cifar100[{a}-{b}] held-out", meta={**ds.meta, "generator_split": "held-out"})
    return ds, pos


# ------------------------------------------------------------------------------------------------ runs
def run_all(args) -> None:
    from fedforge.generative import load_generator
    from fedforge.synth import SynthConfig, load_encoder, run_synth

    results_dir = Path(args.results_dir)
    results = results_dir / "results.jsonl"
    spec = args.generator
    slug = generator_slug(spec)
    prov = shipped_generator(spec)
    print(f"generator {spec}: {prov}", flush=True)
    stale = sorted({r.get("generator_sha256") for r in read_rows(results)
                    if r.get("generator") == spec and r.get("generator_sha256") != prov["generator_sha256"]})
    if stale:
        raise SystemExit(f"{results} holds {spec} rows of other weights (SHA-256 {', '.join(map(str, stale))}, now "
                         f"{prov['generator_sha256']}); move those rows out of it before resuming with the new weights.")
    ds, _ = held_out_task(args.data_root)
    enc = load_encoder("builtin")
    gen = load_generator(spec)
    prompted = prompt_classes(gen, ds)
    print(f"prompts select generator classes {prompted} (None: the prompt names no class of the generator)", flush=True)
    runs_dir = Path(args.runs)
    grid_dir = results_dir / slug
    grid_dir.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        plan = [(s, e, seed, args.tag or "sweep") for e in (1.0, 5.0, 20.0, 100.0, math.inf) for s in ("pe", "pcevolve")
                for seed in args.seeds]
    else:
        plan = [(s, e, seed, args.tag or "main") for e in args.epsilons for s in args.selectors for seed in args.seeds]
    for selector, eps, seed, tag in plan:
        name = run_name(selector, eps, seed, tag, spec)
        if name in _done(results):
            print(f"skip {name} (in {results})", flush=True)
            continue
        out = runs_dir / name
        if out.exists():
            shutil.rmtree(out)  # an unfinished run: start it again
        cfg = SynthConfig(private="cifar100", class_subset=TASK_CLASSES, shots=args.shots, selector=selector,
                          epsilon=eps, iterations=args.iterations, per_class=args.per_class, generator=spec, seed=seed,
                          out=str(out), eval_every=args.eval_every, eval_modes=("syn", "mix"), data_root=args.data_root,
                          strength=args.strength, strength_step=args.strength_step, strength_min=args.strength_min)
        t0 = time.perf_counter()
        res = run_synth(cfg, dataset=ds, generator=gen, encoder=enc)
        s = res.summary
        run_cfg = json.loads((out / "config.json").read_text())
        row = {"name": name, "tag": tag, **prov, "selector": selector, "epsilon": None if math.isinf(eps) else eps,
               "seed": seed, "iterations": s["iterations"], "per_class": args.per_class,
               "strength": [args.strength, args.strength_step, args.strength_min],
               "data": "held-out", "private_images": run_cfg["private_images"], "test_images": run_cfg["test_images"],
               "prompt_classes": prompted,
               "syn_acc": s["final"]["syn"]["acc"], "syn_f1": s["final"]["syn"]["macro_f1"],
               "mix_acc": s["final"]["mix"]["acc"], "mix_f1": s["final"]["mix"]["macro_f1"],
               "real_acc": s["final"]["real"]["acc"], "real_f1": s["final"]["real"]["macro_f1"],
               "seconds_per_iteration": s["seconds_per_iteration"], "wall_seconds": time.perf_counter() - t0,
               "epsilon_total": s["privacy"]["epsilon_total"], "delta_total": s["privacy"]["delta_total"],
               "pe_sigma": s["pe_sigma"],
               "curve": [{k: r.get(k) for k in ("iteration", "kept", "syn_acc", "mix_acc", "seconds")}
                         for r in res.records if r.get("syn_acc") is not None]}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if seed == args.seeds[0]:
            grids = sorted((out / "grids").glob("iteration-*.png"))
            for g in {grids[0], grids[-1]}:
                shutil.copy(g, grid_dir / f"{tag}-{selector}-eps{_eps_s(eps)}-{g.name}")
        if args.commit:
            _commit(f"benchmarks: synth run {name} (syn {row['syn_acc']:.4f}, mix {row['mix_acc']:.4f})", results_dir)
        print(f"{name}: syn {row['syn_acc']:.4f} mix {row['mix_acc']:.4f} real {row['real_acc']:.4f} "
              f"{row['seconds_per_iteration'] or 0:.2f}s/it, {row['wall_seconds']:.0f}s", flush=True)


def _commit(message: str, results_dir: Path, extra: list[str] | None = None) -> None:
    paths = [str(results_dir), *(extra or [])]
    r = None
    for _ in range(20):
        subprocess.run(["git", "add", *paths], cwd=REPO, capture_output=True)
        r = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=REPO, capture_output=True, text=True)
        if r.returncode == 0 or "nothing to commit" in (r.stdout + r.stderr):
            return
        time.sleep(5)  # the index is locked by another helper's commit
    print(f"could not commit: {r.stderr.strip() if r else ''}", flush=True)


# ------------------------------------------------------------------------------------------------ tables and doc
def _ms(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float) * 100
    return f"{a.mean():.2f} ± {a.std(ddof=0):.2f}" if len(a) else "-"


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def table(rows: list[dict]) -> str:
    """The markdown table of one group of runs (one generator, one tag)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["selector"], r["epsilon"]), []).append(r)
    order = {s: i for i, s in enumerate(SELECTORS)}
    lines = ["| selector | ε / iteration | total ε (δ) | seeds | syn acc % | syn macro-F1 % | mix acc % | mix macro-F1 % | s / iteration |",
             "|---|---|---|---|---|---|---|---|---|"]
    real = list({r["seed"]: r for r in rows}.values())  # the private-only head depends on the seed alone
    for (sel, eps), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0, order[kv[0][0]])):
        tot = rs[0]["epsilon_total"]
        if sel == "none":
            tot_s = "0 (private data unused)"
        elif tot is None or math.isinf(tot):
            tot_s = "∞ (no privacy)"
        else:
            tot_s = f"{tot:g}" + (f" (δ {rs[0]['delta_total']:.2g})" if rs[0].get("delta_total") else "")
        eps_s = "–" if sel in ("none", "rf") else ("∞" if eps is None else f"{eps:g}")
        spi = [r["seconds_per_iteration"] for r in rs if r["seconds_per_iteration"] is not None]
        lines.append(f"| {sel} | {eps_s} | {tot_s} | {len(rs)} | {_ms([r['syn_acc'] for r in rs])} | "
                     f"{_ms([r['syn_f1'] for r in rs])} | {_ms([r['mix_acc'] for r in rs])} | {_ms([r['mix_f1'] for r in rs])} | "
                     f"{f'{np.mean(spi):.2f}' if spi else '–'} |")
    lines.append(f"| private images only (`real`) | – | – | {len(real)} | – | – | {_ms([r['real_acc'] for r in real])} | "
                 f"{_ms([r['real_f1'] for r in real])} | – |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[str]:
    """The issue's "what must show", as measured: PCEvolve against `none` and PE at the same ε on syn and on mix,
    and `mix` against the private images alone (means over the seeds)."""
    by = {s: [r for r in rows if r["selector"] == s] for s in SELECTORS}
    out = []
    for mode in ("syn", "mix"):
        pc, no, pe = (_mean(by[s], f"{mode}_acc") for s in ("pcevolve", "none", "pe"))
        if pc is not None and no is not None:
            out.append(f"PCEvolve {'beats' if pc > no else 'does not beat'} `none` on `{mode}`: {pc * 100:.2f} vs {no * 100:.2f} %")
        if pc is not None and pe is not None:
            out.append(f"PCEvolve {'beats' if pc > pe else 'does not beat'} PE at the same ε on `{mode}`: "
                       f"{pc * 100:.2f} vs {pe * 100:.2f} %")
    rl = _mean(list({r["seed"]: r for r in rows}.values()), "real_acc")
    for s in ("pcevolve", "pe", "rf", "none"):
        mx = _mean(by[s], "mix_acc")
        if mx is not None and rl is not None:
            out.append(f"`mix` with {s} {'beats' if mx > rl else 'does not beat'} the private images alone: "
                       f"{mx * 100:.2f} vs {rl * 100:.2f} %")
    return out


def curves(rows: list[dict]) -> str:
    its = sorted({p["iteration"] for r in rows for p in r["curve"] if p.get("syn_acc") is not None})
    lines = ["| selector | " + " | ".join(f"it {it}" for it in its) + " |", "|---|" + "---|" * len(its)]
    for s in SELECTORS:
        rs = [r for r in rows if r["selector"] == s]
        if not rs:
            continue
        cells = []
        for it in its:
            v = [p["syn_acc"] for r in rs for p in r["curve"] if p["iteration"] == it and p["syn_acc"] is not None]
            cells.append(f"{np.mean(v) * 100:.2f}" if v else "–")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SETUP = """# Benchmark: private synthetic-data evolution (`fedforge synth`)

**Setup (built-in generators v2).** CIFAR-100 classes 50-59, with the built-in class-conditional generator v2 in two
variants, both trained only on the fixed generator split of `fedforge.generative.split` (400 of each class's 600
pooled CIFAR-100 images; the other 200 per class are held out from every generator v2):
`builtin` (classes 0-49, so the private classes are new to it: the prompts name none of its classes, each class's
candidates start as samples of random classes 0-49, and the evolution varies only the noise part of a selected
latent, so the selection decides which known classes stand in for each new one) and `builtin-c100` (all 100 classes:
the prompt "A photo image of mouse" draws its class `mouse`). The runs record each generator's training steps and
the SHA-256 prefix of its weights. Encoder: the built-in one (the zoo's `cnn` trained on CIFAR-100 classes 0-49),
new to the private classes. **Data, the same for both generators:** the private context (10 images per class, a
seeded draw per seed) and the test set (the other 190 images of each class, 1,900 in all) come from the 200 held-out
images per class of classes 50-59 only (`held_out_positions` on the 60,000-image cache), so `builtin-c100` never saw
any of them and both generators are judged on identical private and test images. T = 20 iterations, N = 100
candidates per class per iteration, ε = 0.2 per iteration (total 4.0 for `pcevolve` by basic composition; for `pe`,
δ = 1/100 per iteration, σ = 6.05 by the analytic Gaussian mechanism, and the total is the smaller of basic
composition, 4.0 at δ 0.2, and Opacus's PRV accountant over the 20 Gaussian releases, 0.28 at δ 0.2: the table's
"total ε" column). Downstream: a bias-free linear head on
the frozen encoder (100 epochs, batch 16, SGD lr 0.05 cosine), trained on the synthetic images (`syn`), synthetic +
private (`mix`), or the private images alone (`real`); accuracy and macro-F1 on the test set; 3 seeds (0, 1, 2),
mean ± std (population std). Seconds per iteration: selection + generation of 1,000 candidates on one torch thread
(`scripts/cpu-slot`) of a 2-core machine shared with other jobs.

This page is written by `.venv/bin/python benchmarks/synth_bench.py --write-doc` from
`docs/benchmarks/synth/results.jsonl` (one line per finished run, with its per-iteration accuracy curve).
"""

V1_SETUP = """Runs made before the generators v2 and kept as they were (by this script as of commit 0314ba1; their rows
carry no `generator` field): the built-in generator version 1, an unconditional DCGAN-style GAN trained for 2,000
steps on all 600 pooled images of each of CIFAR-100 classes 0-49 (30,000), with the private context drawn from all
600 images of each of classes 50-59 and the other 590 per class as the test set (5,900). Not comparable with the v2
tables above (other generator, other test set). Same T, N, ε, encoder, downstream head and seeds.
"""


def _settings(rows: list[dict]) -> str:
    its = sorted({r["iterations"] for r in rows if r["selector"] != "none"})
    pcs = sorted({r["per_class"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    steps = sorted({r.get("generator_steps") for r in rows}, key=str)
    shas = sorted({r.get("generator_sha256") for r in rows}, key=str)
    priv = sorted({r.get("private_images") for r in rows if r.get("private_images")})
    test = sorted({r.get("test_images") for r in rows if r.get("test_images")})
    parts = [f"T = {', '.join(map(str, its)) or '–'}", f"N = {', '.join(map(str, pcs))}",
             f"seeds {', '.join(map(str, seeds))}", f"generator steps {', '.join(map(str, steps))}",
             f"weights SHA-256 {', '.join(f'`{s}`' for s in shas)}"]
    if priv or test:
        parts.append(f"{', '.join(map(str, priv))} private and {', '.join(map(str, test))} test images (held out)")
    prompted = {tuple(r["prompt_classes"]) for r in rows if r.get("prompt_classes") is not None}
    for p in sorted(prompted, key=str):
        hit = [c for c in p if c is not None]
        parts.append("the prompts name none of the generator's classes" if not hit else
                     f"the prompts select {len(hit)} of the task's {len(p)} classes in the generator")
    return "; ".join(parts) + "."


def _section(out: list[str], rows: list[dict], title: str, command: str | None, grids: list[tuple[str, str]]) -> None:
    out.append(f"## {title}\n")
    if command:
        out.append(f"```\n{command}\n```\n")
    out.append(_settings(rows) + "\n")
    main = [r for r in rows if r["tag"] == "main"]
    for tag in ["main"] + sorted({r["tag"] for r in rows} - {"main"}):
        rs = [r for r in rows if r["tag"] == tag]
        if not rs:
            continue
        if tag != "main":
            out.append(f"### `{tag}` runs\n")
            if tag == "sweep":
                out.append("The budget at which the mechanisms start to carry information (ε per iteration; "
                           "`pcevolve` splits it over the 10 classes, `pe` does not need to).\n")
        else:
            out.append("### ε = 0.2 per iteration\n")
        out.append(table(rs) + "\n")
    if main:
        out.append("**What the issue asks to show, as measured** (means over the seeds in the table):\n")
        out += [f"- {c}" for c in checks(main)]
        out.append("")
        out.append("`syn` accuracy (%) along the iterations (mean over seeds; `none` stops at iteration 0):\n")
        out.append(curves(main) + "\n")
    if grids:
        out.append("Sample grids of seed 0 (one row per class, the first 10 candidates; iteration 0 and the final "
                   "synthetic images):\n")
        out += [f"- `{name}`: ![{Path(name).stem}]({link})" for name, link in grids]
        out.append("")


def _run_flags(rows: list[dict]) -> str:
    """The --eval-every and --seeds flags the finished rows were run with, where they differ from the defaults."""
    flags = ""
    its = sorted({c["iteration"] for r in rows for c in r.get("curve", [])})
    if len(its) > 1 and its[1] - its[0] != 5:
        flags += f" --eval-every {its[1] - its[0]}"
    seeds = sorted({int(r["seed"]) for r in rows})
    if seeds and seeds != [0, 1, 2]:
        flags += " --seeds " + " ".join(map(str, seeds))
    return flags


def write_doc(path: Path, results_dir: Path = DOCS) -> None:
    rows = read_rows(results_dir / "results.jsonl")

    def rel(p: Path) -> Path:
        p, home = p.resolve(), path.resolve().parent
        return p.relative_to(home) if p.is_relative_to(home) else p

    out = [SETUP]
    v2 = [r for r in rows if r.get("generator")]
    v1 = [r for r in rows if not r.get("generator")]
    specs = [s for s in SHIPPED if any(r["generator"] == s for r in v2)]
    specs += sorted({r["generator"] for r in v2} - set(SHIPPED))
    if not v2:
        out.append("No run with a generator v2 has finished yet.\n")
    for spec in specs:
        rs = [r for r in v2 if r["generator"] == spec]
        slug = generator_slug(spec)
        grids = [(g.name, str(rel(g))) for g in sorted((results_dir / slug).glob("main-*.png"))]
        cmd = (f"scripts/cpu-slot .venv/bin/python benchmarks/synth_bench.py --data-root /work/shared/data "
               f"--generator {spec}{_run_flags(rs)} --commit")
        _section(out, rs, TITLES.get(spec, f"`{spec}` (a generator folder, not a shipped one)"), cmd, grids)
    if len(specs) > 1:
        reals = {spec: _mean(list({r["seed"]: r for r in v2 if r["generator"] == spec and r["tag"] == "main"}.values()),
                             "real_acc") for spec in specs}
        shown = ", ".join(f"{s} {v * 100:.2f} %" for s, v in reals.items() if v is not None)
        out.append(f"The private-only baseline (`real`) depends on the data and the seed only, so it is the same under "
                   f"both generators when their seeds match: {shown}.\n")
    if v1:
        grids = [(g.name, str(rel(g))) for g in sorted(results_dir.glob("main-*.png"))]
        out.append(f"## {V1_LABEL}\n")
        out.append(V1_SETUP)
        body: list[str] = []
        _section(body, v1, "", None, grids)
        out += body[1:]  # without the empty heading
    from fedforge.results.rundir import atomic_write_text

    atomic_write_text(path, "\n".join(out))


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--generator", default="builtin",
                    help="builtin (v2, classes 0-49), builtin-c100 (v2, all 100 classes) or builtin:DIR")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench-synth"))
    ap.add_argument("--results-dir", default=str(DOCS), help="where results.jsonl and the grids go")
    ap.add_argument("--doc", default=str(DOC), help="the page --write-doc writes")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.2])
    ap.add_argument("--selectors", nargs="+", default=list(SELECTORS), choices=SELECTORS)
    ap.add_argument("--tag", default=None, help="name of this group of runs (default: main, or sweep with --sweep)")
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--strength-step", type=float, default=0.02)
    ap.add_argument("--strength-min", type=float, default=0.6)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sweep", action="store_true", help="pe and pcevolve at ε = 1, 5, 20, 100, ∞ instead")
    ap.add_argument("--table", action="store_true", help="print the tables from results.jsonl and stop")
    ap.add_argument("--check-generator", action="store_true",
                    help="exit 0 when --generator's committed v2 weights are in place, 1 otherwise (for waiting loops)")
    ap.add_argument("--write-doc", action="store_true", help="write --doc from results.jsonl")
    ap.add_argument("--commit", action="store_true", help="git-commit --results-dir after each finished run")
    args = ap.parse_args(argv)
    results_dir = Path(args.results_dir)
    if args.write_doc:
        write_doc(Path(args.doc), results_dir)
        if args.commit:
            _commit("docs/benchmarks/synth.md: tables from the finished synth runs", results_dir, extra=[args.doc])
        return
    if args.check_generator:
        try:
            print(shipped_generator(args.generator))
        except SystemExit as e:
            print(e)
            raise SystemExit(1) from None
        return
    if args.table:
        rows = read_rows(results_dir / "results.jsonl")
        for gen in sorted({r.get("generator") or V1_LABEL for r in rows}):
            for tag in sorted({r["tag"] for r in rows}):
                rs = [r for r in rows if (r.get("generator") or V1_LABEL) == gen and r["tag"] == tag]
                if rs:
                    print(f"{gen}, {tag}:\n{table(rs)}\n")
        return
    run_all(args)


if __name__ == "__main__":
    main()
