"""DLG/iDLG against client-level DP: the PSNR (and SSIM) of images reconstructed from single-image updates, without DP
and with DP-SGD at ε = 8 and ε = 1 (mean ± std over the images).

Scenario: FedAvg, model mlp, one round; clients 0..K−1 each hold one training image (drawn at random from the
dataset with the seed) and a few test images, so each uploads a 1-image, 1-step update (batch size 1), the setting
where DLG is exact. One run per DP setting (the same partition and seed), then ``fedforge attack dlg`` on every
client's upload of round 1 (the run is replayed from its config; see docs/privacy.md). Resumable: finished runs and
attacks are kept. Writes docs/benchmarks/dlg.md (table) and docs/benchmarks/dlg.png (originals above the
reconstructions of each setting).

    # the benchmark (MNIST 28×28, 8 images, 300 L-BFGS iterations)
    scripts/cpu-slot .venv/bin/python benchmarks/dlg_psnr.py --data-root /work/shared/data
    # smallest size (the check that it works)
    .venv/bin/python benchmarks/dlg_psnr.py --data-root /work/shared/data --images 2 --epsilons 8 --iterations 50 \
        --out-dir /tmp/dlg-smoke --doc /tmp/dlg-smoke/dlg.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _label(eps: float | None) -> str:
    return "no DP" if eps is None else f"DP ε = {eps:g}"


def _partition(ds, k: int, seed: int, path: Path) -> None:
    from fedforge.data.partition import Partition, labels_fingerprint

    idx = np.random.default_rng(seed).permutation(len(ds.y))
    test = [idx[k + 20 * i: k + 20 * (i + 1)] for i in range(k)]
    Partition([idx[i:i + 1] for i in range(k)], test, "dlg-benchmark", {"images": k}, seed,
              labels_fingerprint(ds.y)).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--images", type=int, default=8, help="clients with one training image each (default 8)")
    ap.add_argument("--epsilons", default="none,8,1", help="DP settings: none and/or ε values (default none,8,1)")
    ap.add_argument("--iterations", type=int, default=300, help="L-BFGS iterations per attack (default 300)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="bench-runs/dlg")
    ap.add_argument("--doc", default=str(REPO / "docs" / "benchmarks" / "dlg.md"))
    args = ap.parse_args(argv)

    import fedforge
    from fedforge.attacks import run_dlg
    from fedforge.data import load_dataset

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.dataset, args.data_root)
    part = out / f"partition-{args.dataset}-{args.images}-s{args.seed}.npz"
    if not part.is_file():
        _partition(ds, args.images, args.seed, part)
    settings = [None if e.strip().lower() in ("none", "inf") else float(e) for e in args.epsilons.split(",")]
    rows, images = [], {}
    for eps in settings:
        name = f"{args.dataset}-{args.model}-{'nodp' if eps is None else f'eps{eps:g}'}-s{args.seed}"
        run = out / name
        if not (run / "summary.json").is_file():
            print(f"run {name}", flush=True)
            fedforge.run(algorithm="fedavg", dataset=args.dataset, data_root=args.data_root, model=args.model,
                         partition_file=str(part), batch_size=1, rounds=1, lr=args.lr, seed=args.seed, threads=1,
                         eval_batch_size=100, run_dir=run, **({"dp_epsilon": eps} if eps is not None else {}))
        infos = []
        for cid in range(args.images):
            target = run / "attacks" / f"dlg-c{cid}-r1-it{args.iterations}"
            if (target / "dlg.json").is_file():
                info = json.loads((target / "dlg.json").read_text())
            else:
                print(f"attack {name} client {cid}", flush=True)
                info = run_dlg(run, cid, 1, iterations=args.iterations, out=target)
            infos.append(info)
        psnr = np.array([i["psnr_mean"] for i in infos])
        ssim = np.array([i["ssim_mean"] for i in infos])
        labels = np.mean([i["label_accuracy"] for i in infos])
        rows.append({"setting": _label(eps), "psnr": psnr, "ssim": ssim, "labels": labels,
                     "replayed": all(i["replay_matches_log"] for i in infos)})
        images[_label(eps)] = [run / "attacks" / f"dlg-c{c}-r1-it{args.iterations}" for c in range(args.images)]
        print(f"{_label(eps)}: PSNR {psnr.mean():.2f} ± {psnr.std():.2f} dB, SSIM {ssim.mean():.3f} ± {ssim.std():.3f}",
              flush=True)
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    fig = doc.with_suffix(".png")
    _figure(images, fig, args)
    lines = [
        "# DLG / iDLG against client-level DP",
        "",
        f"Command: `.venv/bin/python benchmarks/dlg_psnr.py --dataset {args.dataset} --model {args.model} --images "
        f"{args.images} --epsilons {args.epsilons} --iterations {args.iterations} --lr {args.lr:g} --seed {args.seed}`",
        "",
        f"FedAvg, {args.model} on {args.dataset}, {args.images} clients with one training image each (batch size 1, one "
        f"local step, lr {args.lr:g}), one round; `fedforge attack dlg` on every client's upload of round 1 "
        f"({args.iterations} L-BFGS iterations, iDLG labels). DP: DP-SGD with C = 1, δ = 1e-5, σ from Opacus's RDP "
        f"accountant for one step at sampling rate 1. Mean ± std over the {args.images} images (population std).",
        "",
        "| setting | PSNR (dB) | SSIM | labels right | replay = run |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['psnr'].mean():.2f} ± {r['psnr'].std():.2f} | {r['ssim'].mean():.3f} ± "
                     f"{r['ssim'].std():.3f} | {r['labels']:.0%} | {'yes' if r['replayed'] else 'no'} |")
    lines += ["", f"![originals and reconstructions]({fig.name})", ""]
    doc.write_text("\n".join(lines))
    print(f"written: {doc}, {fig}")
    return 0


def _figure(images: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedforge.data import load_dataset  # noqa: F401  (the images are read back from the attack folders)

    rows = ["original", *images]
    n = args.images
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 1, 1.35 * len(rows) + 0.3), squeeze=False)
    first = next(iter(images.values()))
    for c in range(n):
        for r, name in enumerate(rows):
            folder = first[c] if name == "original" else images[name][c]
            info = json.loads((folder / "dlg.json").read_text())
            img = _read(folder / "dlg.png", info, original=name == "original")
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if name != "original":
                ax.set_title(f"{info['psnr_mean']:.1f} dB", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read(png: Path, info: dict, original: bool):
    """The original or the reconstruction of a 1-image attack, from the arrays saved beside its figure."""
    arr = np.load(png.with_name("images.npz"))
    img = arr["originals" if original else "reconstructions"][0]
    return img[..., 0] if img.shape[-1] == 1 else img


if __name__ == "__main__":
    raise SystemExit(main())
