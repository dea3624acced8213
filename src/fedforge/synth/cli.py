"""``fedforge synth``: the command-line face of :func:`fedforge.synth.run_synth`."""
from __future__ import annotations

import argparse
import math
import time

from ..commands import register_command
from ..options import add_arguments, values_from_args


@register_command("synth", help="evolve a task-specific synthetic dataset from a few private images (PCEvolve, PE, ...)")
def cmd_synth(args: argparse.Namespace) -> int:
    from .run import SynthConfig, run_synth

    cfg = SynthConfig(**values_from_args(args, SynthConfig)).validate()
    if not cfg.out:
        cfg.out = f"runs/synth-{cfg.selector}-{time.strftime('%Y%m%d-%H%M%S')}"
    res = run_synth(cfg, progress=not args.no_progress)
    s = res.summary
    p = s["privacy"]
    eps = "inf" if p["epsilon_total"] is None or math.isinf(p["epsilon_total"] or 0) else f"{p['epsilon_total']:g}"
    print(f"{s['selector']}: {s['synthetic']['images']} synthetic images ({s['classes']} classes) after {s['iterations']} "
          f"iterations, {s['seconds_per_iteration'] or 0:.2f}s/iteration")
    print(f"privacy: ε = {eps}" + (f", δ = {p['delta_total']:g}" if p["delta_total"] else "") + f" ({p['note']})")
    for m, r in s["final"].items():
        if r.get("acc") is not None:
            print(f"  {m:<5} acc={r['acc']:.4f}  macro_f1={r['macro_f1']:.4f}")
    print(f"results: {res.path} (use --dataset npz:{res.path / 'synthetic.npz'})")
    return 0


@cmd_synth.arguments
def _add(p: argparse.ArgumentParser) -> None:
    from .run import SynthConfig

    add_arguments(p, SynthConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
