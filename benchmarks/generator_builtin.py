"""Train the shipped built-in generator (CIFAR-100 classes 0-49) and install it under src/fedforge/assets/.

Resumable: the training continues from OUT's checkpoint. When it is done, the weights, config, loss curves and
sample grid are copied into ``src/fedforge/assets/builtin-cifar100-0-49/`` (the ``builtin`` spec with no path).

    scripts/cpu-slot .venv/bin/python benchmarks/generator_builtin.py --data-root /work/shared/data \\
        --out bench-runs/generator-builtin --commit
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ASSET = Path(__file__).resolve().parents[1] / "src" / "fedforge" / "assets" / "builtin-cifar100-0-49"
FILES = ("generator.safetensors", "generator.json", "samples.png", "losses.png", "losses.jsonl")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="bench-runs/generator-builtin")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--commit", action="store_true", help="git-commit the installed asset")
    args = p.parse_args(argv)
    if args.data_root:
        os.environ["FEDFORGE_DATA"] = args.data_root

    from fedforge.cli import main as fedforge_main

    t0 = time.perf_counter()
    rc = fedforge_main(["generator", "train", "--dataset", "cifar100", "--class-subset", "0-49", "--out", args.out,
                        "--steps", str(args.steps), "--no-progress"])
    if rc:
        return rc
    print(f"training call took {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    ASSET.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(Path(args.out) / name, ASSET / name)
        os.chmod(ASSET / name, 0o644)
    print(f"installed into {ASSET}", file=sys.stderr)
    if args.commit:
        paths = [str(ASSET / n) for n in FILES]
        for _ in range(20):
            if subprocess.run(["git", "add", *paths]).returncode == 0 and subprocess.run(
                    ["git", "commit", "-m", "assets: the shipped built-in generator (CIFAR-100 classes 0-49)", "--", *paths]).returncode == 0:
                break
            time.sleep(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
