"""Train the built-in encoder of `fedforge synth`: the zoo's `cnn` on CIFAR-100 classes 0-49.

Writes src/fedforge/assets/encoder_cifar100_0-49.{safetensors,json} (a fedforge model checkpoint). Plain SGD
through the project's one training loop (core.training.train_loop), random crop + flip, cosine learning rate.
Classes 50-99 are never seen, so the benchmark's private classes (50-59) are new to the encoder.

    scripts/cpu-slot .venv/bin/python benchmarks/synth_encoder.py --data-root /work/shared/data
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from fedforge.core.training import eval_loop, train_loop
from fedforge.data import Federation, Partition, load_dataset
from fedforge.models import create_model
from fedforge.synth.encoder import ASSETS, BUILTIN_STEM, save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--val", type=int, default=2000, help="held-out images of classes 0-49 for monitoring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ASSETS / BUILTIN_STEM))
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = load_dataset("cifar100", args.data_root, class_subset="0-49")
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ds.y))
    part = Partition([np.sort(perm[args.val:])], [np.sort(perm[: args.val])], "encoder", seed=args.seed)
    fed = Federation(ds, part, augment=True)
    model = create_model("cnn", ds.input_shape, ds.num_classes, seed=args.seed).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    log = []
    for epoch in range(args.epochs):
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))
        st = train_loop(model, fed.train_batches(0, args.batch_size, gen), lr)
        model.eval()
        ev = eval_loop(model, fed.test_batches(0, 1000))
        log.append({"epoch": epoch + 1, "lr": lr, "loss": st.loss, "val_acc": ev.acc})
        print(f"epoch {epoch + 1:3d}  lr {lr:.4f}  loss {st.loss:.4f}  val_acc {ev.acc:.4f}  "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    w, c = save_checkpoint(
        args.out, model, "cnn", ds.input_shape, ds.num_classes, ds.mean, ds.std,
        trained_on="cifar100 classes 0-49 (relabelled 0..49)", val_images=args.val, val_acc=log[-1]["val_acc"],
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, train_seconds=round(seconds, 1),
        command="scripts/cpu-slot .venv/bin/python benchmarks/synth_encoder.py --data-root /work/shared/data")
    print(f"written: {w} ({Path(w).stat().st_size / 1e6:.2f} MB), {c}; {seconds:.0f}s")


if __name__ == "__main__":
    main()
