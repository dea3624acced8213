"""Speed and scale benchmark (not a test): seconds per round, samples per second, peak memory, and how far a round is
from what the hardware allows, for each executor and precision.

Usage (each case runs in its own fresh process and writes benchmarks/results/speed/<case>.json; finished cases are
skipped, so an interrupted sweep resumes; timing needs a quiet machine, hence ``scripts/cpu-slot --all``):

    scripts/cpu-slot --all .venv/bin/python benchmarks/speed.py run CASE [CASE ...]   # or: all
    .venv/bin/python benchmarks/speed.py list
    .venv/bin/python benchmarks/speed.py report          # markdown tables for docs/performance.md

What is measured per case:
* ``round_s``: median wall time of a round's training (broadcast, local updates, aggregation), from the engine's
  own ``train_seconds``; ``round_eval_s``: the same plus the evaluation that follows each round (every round here,
  as PFLlib does);
* ``samples_per_s``: training samples processed per second of ``round_s``;
* ``flops_round``: FLOPs of one round's local training, counted with ``torch.utils.flop_counter`` on one training
  step (forward and backward) times the round's steps; ``bound_s``: those FLOPs divided by the machine's measured
  peak (case ``peak``: a large fp32 or bf16 matmul on all cores); ``round_s / bound_s`` says how far from the
  hardware limit a round is;
* ``bare_s``: the same local steps (same clients, batch sizes and step counts) in a bare loop — one model, weights
  copied in place, batches pre-made in memory, forward/backward/SGD only — on all cores;
* memory: ``rss_import`` (after importing torch and fedforge), the main process's peak RSS (``getrusage``), and the
  peak over time of the summed RSS and PSS of the whole process tree (workers included; PSS splits shared pages
  between the processes that share them, so the summed PSS is the physical memory the run used).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "speed"
# Under `scripts/cpu-slot` (one core, OMP_NUM_THREADS=1) a case is recorded as CASE@1core: its memory figures are
# valid, its times are those of one core beside another job; under `cpu-slot --all` (both cores) as CASE.
ONE_CORE = os.environ.get("OMP_NUM_THREADS") == "1"
SUFFIX = "@1core" if ONE_CORE else ""
DATA = Path(os.environ.get("FEDFORGE_DATA", ROOT.parent / "shared" / "data"))
PFLLIB_MNIST = f"pfllib:{DATA / 'pfllib-mnist'}"

MNIST = dict(algorithm="fedavg", dataset=PFLLIB_MNIST, model="cnn", batch_size=10, local_epochs=1, lr=0.005,
             rounds=3, eval_every=1, seed=0)
CIFAR = dict(algorithm="fedavg", dataset="cifar100", model="cnn", partition="dirichlet", alpha=0.1, clients=20,
             batch_size=64, local_epochs=1, lr=0.005, rounds=5, eval_every=1, seed=0)
DITTO = "ditto"  # replaced by `local` (also a full model per client) when ditto is not registered


def ditto_or_local() -> str:
    import fedforge.algorithms  # noqa: F401
    from fedforge.core import ALGORITHMS

    return DITTO if DITTO in ALGORITHMS else "local"


# 30 rounds of 10 %: 96 % of the clients have taken part (and hold a personal model) by the end
SCALE500 = dict(dataset="cifar100", model="cnn", partition="dirichlet", alpha=0.1, clients=500, join_ratio=0.1,
                batch_size=10, local_epochs=1, lr=0.005, rounds=30, eval_every=30, seed=0)
SCALE10K = dict(dataset="cifar100", model="cnn", partition="iid", clients=10_000, join_ratio=0.005, batch_size=10,
                local_epochs=1, lr=0.005, rounds=3, eval_every=3, seed=0, state_store="disk")

# case name -> (run config, options)
CASES: dict[str, tuple[dict, dict]] = {
    "smoke-digits": (dict(algorithm="fedavg", dataset="digits", clients=6, rounds=2, executor="process", workers=2), {}),
    "mnist-sequential": (dict(MNIST, executor="sequential"), {}),
    "mnist-sequential-2threads": (dict(MNIST, executor="sequential", threads=2), {}),
    "mnist-process": (dict(MNIST, executor="process", workers=2), {}),
    "mnist-ray": (dict(MNIST, executor="ray", workers=2), {}),
    "mnist-vectorized": (dict(MNIST, executor="vectorized", workers=20), {}),
    "mnist-process-bf16": (dict(MNIST, executor="process", workers=2, precision="bf16"), {}),
    "cifar-process-fp32": (dict(CIFAR, executor="process", workers=2), {}),
    "cifar-process-bf16": (dict(CIFAR, executor="process", workers=2, precision="bf16"), {}),
    # accuracy only (executors give the same numbers, so these run on one core): lr 0.05, where 5 rounds reach an
    # accuracy well above chance (1 %), for a sharper fp32/bf16 comparison
    "cifar-acc-fp32-lr0.05": (dict(CIFAR, executor="sequential", lr=0.05), {}),
    "cifar-acc-bf16-lr0.05": (dict(CIFAR, executor="sequential", lr=0.05, precision="bf16"), {}),
    "ditto-500": (dict(SCALE500, executor="sequential", state_store="memory"), {"ditto": True}),
    # the default store (auto): 500 × 3.7 MB of personal models project past AUTO_DISK_BYTES, so it keeps them on disk
    "ditto-500-auto": (dict(SCALE500, executor="sequential", state_store="auto"), {"ditto": True}),
    "ditto-500-process": (dict(SCALE500, executor="process", workers=2, state_store="memory"), {"ditto": True}),
    "ditto-500-disk": (dict(SCALE500, executor="sequential", state_store="disk"), {"ditto": True}),
    "ditto-10k-disk": (dict(SCALE10K, executor="sequential"), {"ditto": True}),
    "ditto-10k-disk-process": (dict(SCALE10K, executor="process", workers=2), {"ditto": True}),
}
SPECIAL = ("peak",)


# ------------------------------------------------------------------------------------------- memory
class MemorySampler(threading.Thread):
    """Peak summed RSS and PSS of this process and all its descendants, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.every = every
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 1
        self._halt = threading.Event()

    def sample(self) -> None:
        import psutil

        rss = pss = 0
        procs = [self.proc] + self.proc.children(recursive=True)
        for p in procs:
            try:
                m = p.memory_full_info()
                rss += m.rss
                pss += m.pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def max_rss_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------- lower bound
def matmul_peak(dtype_name: str, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of an n×n matmul in ``dtype`` on all of this process's threads."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def step_flops(model, batch: int, input_shape, num_classes: int) -> float:
    """FLOPs of one training step (forward + backward) at ``batch`` samples."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *input_shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


# ------------------------------------------------------------------------------------------- bare loop
def bare_loop(sim, rnd: int, threads: int, precision: str) -> float:
    """Seconds for round ``rnd``'s local steps in a bare loop (batches made beforehand, outside the timing)."""
    import torch
    import torch.nn.functional as F

    from fedforge.core.context import derive_seed

    torch.set_num_threads(threads)
    active, _ = sim.select_clients(rnd)
    fed_x = torch.from_numpy(sim.ds.x)
    fed_y = torch.from_numpy(sim.ds.y)
    c = sim.ds.input_shape[0]
    mean = torch.tensor(sim.ds.mean).view(1, c, 1, 1)
    std = torch.tensor(sim.ds.std).view(1, c, 1, 1)
    bs, epochs = sim.cfg.batch_size, sim.cfg.local_epochs
    model = sim.ctx.build_model().to(memory_format=torch.channels_last)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    plan = []
    for cid in active:
        idx = torch.from_numpy(sim.partition.train[cid])
        g = torch.Generator().manual_seed(derive_seed(0, rnd, cid))
        x = (fed_x[idx].permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        x = x.contiguous(memory_format=torch.channels_last)
        y = fed_y[idx]
        n = len(idx)
        batches = []
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            stop = n - n % bs if n > bs else n
            for s in range(0, stop, bs):
                sel = perm[s : s + bs]
                batches.append((x[sel].contiguous(memory_format=torch.channels_last), y[sel]))
        plan.append(batches)
    t0 = time.perf_counter()
    for batches in plan:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(init[k])
        for x, y in batches:
            if precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
            else:
                loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                torch._foreach_add_(params, list(grads), alpha=-sim.cfg.lr)
    return time.perf_counter() - t0


def round_samples(sim, rnd: int) -> tuple[int, int]:
    """(training samples, steps) of round ``rnd``'s local updates (drop-last batches, as the engine cuts them)."""
    active, _ = sim.select_clients(rnd)
    bs, ep = sim.cfg.batch_size, sim.cfg.local_epochs
    samples = steps = 0
    for cid in active:
        n = len(sim.partition.train[cid])
        per = n // bs if n > bs else 1
        steps += per * ep
        samples += (per * bs if n > bs else n) * ep
    return samples, steps


# ------------------------------------------------------------------------------------------- one case
def run_case(name: str) -> dict:
    t_import = time.perf_counter()
    import torch

    import fedforge
    import fedforge.algorithms  # noqa: F401
    from fedforge.config import build_config
    from fedforge.core.simulation import Simulation

    rss_import = rss_now()
    result: dict = {"case": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                    "cores": os.cpu_count(), "load_before": os.getloadavg()[0], "rss_import": rss_import,
                    "import_s": time.perf_counter() - t_import, "main_threads": torch.get_num_threads()}
    result["one_core"] = ONE_CORE
    if name == "peak":
        result["peak_fp32"] = matmul_peak("fp32")
        result["peak_bf16"] = matmul_peak("bf16")
        return result
    cfg_d, opts = CASES[name]
    cfg_d = dict(cfg_d)
    if opts.get("ditto"):
        cfg_d["algorithm"] = ditto_or_local()
    cfg_d.setdefault("data_root", str(DATA))
    result["config"] = cfg_d
    sampler = MemorySampler()
    sampler.start()
    cfg = build_config(overrides=cfg_d)
    stamps: list[tuple[int, float, float, float]] = []  # (round, seconds, train_seconds, eval_seconds)
    t_setup = time.perf_counter()
    sim = Simulation(cfg, run_dir=False, progress=False,
                     on_record=lambda r: stamps.append((r["round"], r["seconds"], r["train_seconds"], r["eval_seconds"])))
    result["setup_s"] = time.perf_counter() - t_setup
    res = sim.run()
    sampler.stop()
    result["rss_main_peak"] = max_rss_self()
    result["rss_tree_peak"] = sampler.peak_rss
    result["pss_tree_peak"] = sampler.peak_pss
    result["processes"] = sampler.peak_procs
    rounds = [s[0] for s in stamps]
    train = [b[2] - a[2] for a, b in zip(stamps, stamps[1:])]
    per_round_rounds = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    result["round_s_all"] = [t / max(1, k) for t, k in zip(train, per_round_rounds)]
    result["round_s"] = statistics.median(result["round_s_all"])
    walls = [(b[1] - a[1]) / max(1, b[0] - a[0]) for a, b in zip(stamps, stamps[1:])]
    result["round_eval_s"] = statistics.median(walls)
    result["eval_s"] = [s[3] for s in stamps]
    result["rounds"] = rounds
    result["wall_s"] = res.summary.get("wall_seconds")
    last = res.records[-1]
    result["global_acc"] = last.get("global_acc")
    result["personalized_acc"] = last.get("personalized_acc")
    result["acc_curve"] = [(r["round"], r.get("global_acc"), r.get("personalized_acc")) for r in res.records]
    result["clients"] = sim.ctx.num_clients
    samples, steps = round_samples(sim, 1)
    mult = 2 if cfg.algorithm == "ditto" else 1  # ditto trains the global and the personal model
    result["round_samples"] = samples * mult
    result["samples_per_s"] = samples * mult / result["round_s"]
    model = sim.ctx.build_model()
    fl = step_flops(model, cfg.batch_size, sim.ds.input_shape, sim.ds.num_classes)
    result["flops_step"] = fl
    result["flops_round"] = fl / cfg.batch_size * samples * mult
    peak = OUT / f"peak{SUFFIX}.json"
    if peak.is_file():
        p = json.loads(peak.read_text())
        key = "peak_bf16" if cfg.precision == "bf16" else "peak_fp32"
        result["peak_flops"] = p[key]
        result["bound_s"] = result["flops_round"] / p[key]
        result["round_over_bound"] = result["round_s"] / result["bound_s"]
    if not opts.get("ditto"):
        torch_threads = torch.get_num_threads()
        if not ONE_CORE:
            result["bare_s_2threads"] = bare_loop(sim, 1, 2, cfg.precision) * mult
        result["bare_s_1thread"] = bare_loop(sim, 1, 1, cfg.precision) * mult
        torch.set_num_threads(torch_threads)
        bare = result.get("bare_s_2threads", result["bare_s_1thread"])
        result["round_over_bare"] = result["round_s"] / bare
        result["round_eval_over_bare"] = result["round_eval_s"] / bare
    if res.store is not None and hasattr(res.store, "disk_bytes"):
        result["state_files"] = len(res.store.cids())
        result["state_disk_bytes"] = res.store.disk_bytes()
        res.store.close()
    result["load_after"] = os.getloadavg()[0]
    return result


# ------------------------------------------------------------------------------------------- report
def mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:,.0f}"


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(folder: Path | None = None) -> str:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted((folder or OUT).glob("*.json"))}
    out = []
    for key in ("peak", "peak@1core"):
        if key in rows:
            p = rows[key]
            where = "one core" if key.endswith("1core") else "all cores"
            out.append(f"Matmul peak (4096², {where}): fp32 {p['peak_fp32'] / 1e9:.0f} GFLOP/s, "
                       f"bf16 {p['peak_bf16'] / 1e9:.0f} GFLOP/s (measured {p['when']}, load {p['load_before']:.2f}).\n")
    out.append("| case | algorithm | executor | precision | s/round (train) | s/round (+eval) | samples/s | bare loop s | round / bare | round / FLOP bound | acc (last) % | RSS after import MB | peak RSS main MB | peak RSS tree MB | peak PSS tree MB |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if name.startswith("peak"):
            continue
        c = r["config"]
        acc = r.get("global_acc") if r.get("global_acc") is not None else r.get("personalized_acc")
        out.append("| " + " | ".join([
            name, c["algorithm"], c["executor"] + (f"×{c['workers']}" if c.get("workers") else ""),
            c.get("precision", "fp32"), fmt(r["round_s"]), fmt(r["round_eval_s"]), fmt(r["samples_per_s"], ",.0f"),
            fmt(r.get("bare_s_2threads", r.get("bare_s_1thread"))), fmt(r.get("round_over_bare")),
            fmt(r.get("round_over_bound"), ".1f"),
            fmt(None if acc is None else 100 * acc, ".2f"), mb(r["rss_import"]), mb(r["rss_main_peak"]),
            mb(r["rss_tree_peak"]), mb(r["pss_tree_peak"])]) + " |")
    return "\n".join(out)


def schedule_balance(workers: int = 2) -> None:
    """How evenly the pool's schedule splits the pfllib-mnist round over ``workers`` (no training: sample counts)."""
    import fedforge.algorithms  # noqa: F401
    from fedforge.config import build_config
    from fedforge.core.executors import Schedule
    from fedforge.core.runtime import Task, WorkerSpec
    from fedforge.core.simulation import Simulation

    sim = Simulation(build_config(overrides=dict(MNIST, rounds=0)), run_dir=False, progress=False)
    spec = WorkerSpec(sim.ds, sim.partition, sim.algo)
    sizes = sim.ctx.train_sizes
    tasks = [Task("train", c, 1, {}, None) for c in range(sim.ctx.num_clients)]

    def makespan(order) -> float:
        t = [0.0] * workers
        for i in order:  # each task goes to the worker that frees first
            k = min(range(workers), key=t.__getitem__)
            t[k] += sizes[i]
        return max(t) / (sum(sizes) / workers)

    def streamed() -> list[int]:
        sched, out, done = Schedule(spec, iter(tasks), workers), [], 0
        while (item := sched.next(done)) is not None:
            out.append(item[0])
            done += 1  # as if results came back in order (the window then never blocks)
        return out

    plain = makespan(range(len(tasks)))
    look = makespan(streamed())
    full = makespan(sorted(range(len(tasks)), key=lambda i: -sizes[i]))
    print(f"slowest worker / even split, {workers} workers: in task order {plain:.3f}, "
          f"look-ahead stream {look:.3f}, sorted list {full:.3f}")


def heap_growth(trim: bool, clients: int = 500, cohort: int = 50, rounds: int = 30) -> None:
    """RSS growth of the engine's allocation pattern with client states kept in memory (no training): each round
    the cohort's states are replaced and uploads and evaluation copies come and go, as in a Ditto run."""
    import psutil

    from fedforge.core.executors import release_memory
    from fedforge.models import create_model

    base = {k: v.detach() for k, v in create_model("cnn", (3, 32, 32), 100, seed=0).state_dict().items()}
    proc = psutil.Process()
    r0 = proc.memory_info().rss
    store: dict[int, dict] = {}
    peak = 0
    for rnd in range(rounds):
        chosen = [(rnd * cohort + i * 7) % clients for i in range(cohort)]
        ups = [({k: v.clone() for k, v in base.items()}, {k: v.clone() for k, v in base.items()}) for _ in chosen]
        for c, (_, st) in zip(chosen, ups):
            store[c] = st
        avg = {k: sum(u[k] for u, _ in ups) / len(ups) for k in base}
        del ups, avg
        for c in range(clients):  # evaluation: a copy of each client's (or the initial) state comes and goes
            s = store.get(c) or {k: v.clone() for k, v in base.items()}
            tmp = {k: v.clone() for k, v in s.items()}
            del tmp, s
        if trim:
            release_memory()
        peak = max(peak, proc.memory_info().rss)
    live = sum(t.numel() * t.element_size() for s in store.values() for t in s.values())
    print(f"trim after each round: {trim}; {len(store)} clients hold {live / 2**30:.2f} GiB of state; "
          f"RSS grew by {(peak - r0) / 2**30:.2f} GiB (peak)")


def pool_memory(start_method: str | None, clients: int = 6) -> None:
    """Per-process memory (RSS, USS, PSS) of a 2-worker process pool on pfllib-mnist after a few clients' training
    and an evaluation of all clients (a short run; no timing)."""
    import psutil

    import fedforge.algorithms  # noqa: F401
    from fedforge.config import build_config
    from fedforge.core.executors import ProcessExecutor
    from fedforge.core.runtime import Task, WorkerSpec
    from fedforge.core.simulation import Simulation

    sim = Simulation(build_config(overrides=dict(MNIST, rounds=0)), run_dir=False, progress=False)
    ex = ProcessExecutor(workers=2, start_method=start_method)
    ex.start(WorkerSpec(sim.ds, sim.partition, sim.algo))
    server = sim.algo.init_server()
    ex.map([Task("train", c, 1, server, None) for c in range(clients)])
    ex.map([Task("eval", c, 1, server, None) for c in range(sim.ctx.num_clients)])
    me = psutil.Process()
    total = 0
    for p in [me] + me.children(recursive=True):
        m = p.memory_full_info()
        total += m.pss
        role = "main" if p.pid == me.pid else " ".join(p.cmdline())[-40:]
        print(f"  {p.pid:>7} {role:<40} RSS {m.rss / 1e6:6.0f} MB  USS {m.uss / 1e6:6.0f} MB  PSS {m.pss / 1e6:6.0f} MB")
    print(f"start method {start_method or 'default'}: summed PSS {total / 1e6:.0f} MB")
    ex.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run cases (each in a fresh process), skipping finished ones")
    r.add_argument("cases", nargs="+", help="case names, or 'all'")
    r.add_argument("--force", action="store_true", help="re-run finished cases")
    one = sub.add_parser("one", help="run one case in this process and write its JSON (used by `run`)")
    one.add_argument("case")
    sub.add_parser("list", help="list the cases")
    rep = sub.add_parser("report", help="print markdown tables of the finished cases")
    rep.add_argument("--dir", type=Path, help="folder of case JSON files (default: benchmarks/results/speed)")
    sub.add_parser("schedule", help="how evenly the process/ray schedule splits the pfllib-mnist round (no training)")
    sub.add_parser("heap", help="RSS growth of 500 clients' states in memory, with and without trimming the heap")
    sub.add_parser("pool-memory", help="per-process memory of a 2-worker pool on pfllib-mnist (fork vs fork server)")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for k in (*SPECIAL, *CASES):
            print(k)
        return 0
    if args.cmd == "pool-memory":
        for method in ("fork", "forkserver"):
            subprocess.call([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                             f"import speed; speed.pool_memory({method!r})"])
        return 0
    if args.cmd == "heap":
        for trim in (False, True):
            subprocess.call([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                             f"import speed; speed.heap_growth({trim})"])
        return 0
    if args.cmd == "schedule":
        schedule_balance()
        return 0
    if args.cmd == "report":
        print(report(args.dir))
        return 0
    if args.cmd == "one":
        res = run_case(args.case)
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = OUT / f".{args.case}{SUFFIX}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=float) + "\n")
        tmp.replace(OUT / f"{args.case}{SUFFIX}.json")
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}, default=float))
        return 0
    names = list(SPECIAL) + list(CASES) if args.cases == ["all"] else args.cases
    unknown = [n for n in names if n not in CASES and n not in SPECIAL]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; see `speed.py list`")
    for n in names:
        if (OUT / f"{n}{SUFFIX}.json").is_file() and not args.force:
            print(f"{n}: done (skipped; --force to re-run)")
            continue
        print(f"{n}: running (load {os.getloadavg()[0]:.2f})", flush=True)
        rc = subprocess.call([sys.executable, __file__, "one", n])
        if rc != 0:
            print(f"{n}: failed with exit code {rc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
