"""``fedforge synth``: the command-line face of :func:`fedforge.synth.run_synth`."""
from __future__ import annotations

import argparse
import math
import time

from ..cli import register_command


def _epsilon(v: str) -> float:
    try:
        e = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or inf, got '{v}'") from None
    return e


def _labels(v: str) -> list[str]:
    return [s.strip() for s in v.split(",") if s.strip()]


@register_command("synth", help="evolve a task-specific synthetic dataset from a few private images (PCEvolve, PE, ...)")
def cmd_synth(args: argparse.Namespace) -> int:
    from .run import SynthConfig, run_synth

    names = {f for f in SynthConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "eval_modes" in values:
        values["eval_modes"] = tuple(m.strip() for m in values["eval_modes"].split(",") if m.strip())
    cfg = SynthConfig(**values)
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

    d = SynthConfig()
    p.add_argument("--private", default=d.private, metavar="SPEC",
                   help=f"dataset holding the client's images (the rest of each class is the test set; default {d.private})")
    p.add_argument("--shots", type=int, default=d.shots, metavar="K", help=f"private images per class (default {d.shots})")
    p.add_argument("--class-subset", metavar="A-B", help="keep classes A..B of the private dataset, relabelled 0..B-A")
    p.add_argument("--generator", default=d.generator, metavar="SPEC",
                   help="builtin[:DIR], diffusers:DIR or stylegan:FILE (default builtin)")
    p.add_argument("--selector", default=d.selector, choices=("pcevolve", "pe", "rf", "none"),
                   help="pcevolve (exponential mechanism), pe (noisy votes), rf (no privacy), none (iteration 0 only)")
    p.add_argument("--epsilon", type=_epsilon, default=d.epsilon, metavar="E",
                   help=f"privacy budget per iteration; inf turns the noise off (default {d.epsilon})")
    p.add_argument("--iterations", type=int, default=d.iterations, metavar="T", help=f"iterations (default {d.iterations})")
    p.add_argument("--per-class", type=int, default=d.per_class, metavar="N",
                   help=f"candidates per class per iteration (default {d.per_class})")
    p.add_argument("--encoder", default=d.encoder, metavar="SPEC",
                   help="builtin, checkpoint:PATH.safetensors or torchvision:NAME (cached weights only; default builtin)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/synth-<selector>-<time>)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="M",
                   help="also evaluate downstream every M iterations (default: only after the last)")
    p.add_argument("--eval-modes", default=",".join(d.eval_modes), metavar="LIST",
                   help="which training sets to evaluate: syn, mix, real (default syn,mix; '' for none)")
    p.add_argument("--classifier", default=d.classifier, help="linear (head on the frozen encoder) or a model name")
    p.add_argument("--eval-epochs", type=int, metavar="E", help="classifier epochs (default 100 linear, 20 model)")
    p.add_argument("--eval-lr", type=float, metavar="LR", help="classifier learning rate")
    p.add_argument("--tau", type=float, default=d.tau, help=f"similarity calibrator temperature (default {d.tau:g})")
    p.add_argument("--prototypes", type=int, default=d.prototypes, help="candidates drawn per class by pcevolve (default 1)")
    p.add_argument("--delta", type=float, metavar="D", help="PE's δ per iteration (default 1 / private images)")
    p.add_argument("--pe-threshold", type=float, default=d.pe_threshold, metavar="H", help="PE's histogram threshold (default 0)")
    p.add_argument("--rf-threshold", type=float, default=d.rf_threshold, metavar="D",
                   help="rf: reject candidates this close to another class's private image (default 0)")
    p.add_argument("--domain", default=d.domain, help="{domain} in the prompt 'A {domain} image of {label}'")
    p.add_argument("--labels", type=_labels, metavar="A,B,...", help="class names for the prompt")
    p.add_argument("--test-per-class", type=int, metavar="M", help="cap on held-out test images per class")
    p.add_argument("--data-root", metavar="DIR", help="dataset cache folder (default $FEDFORGE_DATA)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

