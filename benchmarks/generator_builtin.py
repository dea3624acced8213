"""Train the shipped built-in generators v2 (class-conditional GAN, issue 23) and install them under
src/fedforge/assets/.

Variants (both on the fixed generator split, `fedforge.generative.split`: 400 of each class's 600 CIFAR-100 images;
the other 200 are held out for the benchmarks' private context and test data):

* ``builtin``: classes 0-49 → ``assets/builtin-cifar100-0-49`` (the ``builtin`` spec with no path; FedKTL and KTL,
  whose clients' classes 50-99 are new to it);
* ``builtin-c100``: all 100 classes → ``assets/builtin-cifar100`` (the ``builtin-c100`` spec; synthetic data whose
  generator covers the task's classes, as Stable Diffusion covers the PCEvolve paper's tasks).

Deterministic (seeded) and resumable: a rerun continues from OUT's checkpoint (raise --steps to train longer).
``--install-only`` copies OUT's latest export (written every --checkpoint-every steps) into the assets without
training, so a training stopped early can be shipped as it stands; generator.json records its steps.

    scripts/cpu-slot .venv/bin/python benchmarks/generator_builtin.py --variant builtin --data-root /work/shared/data \\
        --out bench-runs/generator-v2-c50 --steps 20000
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "fedforge" / "assets"
VARIANTS = {"builtin": ("builtin-cifar100-0-49", list(range(50))), "builtin-c100": ("builtin-cifar100", list(range(100)))}
FILES = ("generator.safetensors", "generator.json", "samples.png", "losses.png", "losses.jsonl")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--install-only", action="store_true", help="install OUT's latest export without training")
    p.add_argument("--commit", action="store_true", help="git-commit the installed asset")
    args = p.parse_args(argv)
    if args.data_root:
        os.environ["FEDFORGE_DATA"] = args.data_root
    asset, classes = VARIANTS[args.variant]
    out = Path(args.out)
    if not args.install_only:
        import torch

        from fedforge.data import load_dataset
        from fedforge.generative.cgan import train_cgan
        from fedforge.generative.split import generator_positions

        torch.set_num_threads(args.threads)
        ds = load_dataset("cifar100")
        pos = generator_positions(ds.y, classes)
        print(f"{args.variant}: {len(pos)} training images of {len(classes)} classes", file=sys.stderr)
        cmd = (f"python benchmarks/generator_builtin.py --variant {args.variant} --out {args.out} --steps {args.steps} "
               f"--threads {args.threads}")
        t0 = time.perf_counter()
        train_cgan(ds.x[pos], ds.y[pos], classes, out, steps=args.steps, checkpoint_every=args.checkpoint_every,
                   class_names=[ds.class_names[c] for c in classes] if ds.class_names else None,
                   meta={"dataset": f"cifar100[{classes[0]}-{classes[-1]}]", "split": "fedforge.generative.split (400/class)",
                         "command": cmd}, progress=sys.stderr.isatty())
        print(f"training call took {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    dest = ASSETS / asset
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (out / name).is_file():
            shutil.copyfile(out / name, dest / name)
            os.chmod(dest / name, 0o644)
    print(f"installed {out} into {dest}", file=sys.stderr)
    if args.commit:
        paths = [str(dest / n) for n in FILES if (dest / n).is_file()]
        for _ in range(20):
            if subprocess.run(["git", "add", *paths]).returncode == 0 and subprocess.run(
                    ["git", "commit", "-m", f"assets: built-in generator v2 ({args.variant})", "--", *paths]).returncode == 0:
                break
            time.sleep(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
