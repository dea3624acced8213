"""`fedforge generator ...`: train the built-in generator, or sample any back-end into a PNG grid."""
from __future__ import annotations

import argparse
import inspect
import logging
import time
from pathlib import Path

from ..commands import register_command
from ..errors import ConfigError

log = logging.getLogger("fedforge")


# `generator train` options that are train_builtin() keywords: CLI name -> keyword
_TRAIN_KEYWORDS = {"steps": "steps", "batch_size": "batch_size", "latent_dim": "latent_dim", "channels": "base_channels",
                   "d_channels": "d_channels", "lr": "lr", "ema": "ema_decay", "seed": "seed"}


def _train_command(args: argparse.Namespace, defaults: dict) -> str:
    """The `fedforge generator train` command that reproduces a run: its dataset, classes, output and every training
    option whose value differs from ``defaults`` (train_builtin's keyword defaults)."""
    parts = ["fedforge generator train", f"--dataset {args.dataset}"]
    if args.class_subset:
        parts.append(f"--class-subset {args.class_subset}")
    parts += [f"--{opt.replace('_', '-')} {getattr(args, opt)}" for opt, kw in _TRAIN_KEYWORDS.items()
              if getattr(args, opt) != defaults[kw]]
    parts.append(f"--out {args.out}")
    return " ".join(parts)


@register_command("generator", "train the built-in image generator, or sample a generator back-end")
def cmd_generator(args: argparse.Namespace) -> int:
    if getattr(args, "generator_command", None) is None:
        raise ConfigError("say what to do: `fedforge generator train --out DIR` or `fedforge generator sample SPEC --out FILE.png`.")
    return args.generator_func(args)


@cmd_generator.arguments
def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="generator_command", metavar="ACTION")
    t = sub.add_parser("train", help="train fedforge's built-in GAN on a dataset (resumable from DIR's checkpoint)")
    t.add_argument("--dataset", default="cifar100", help="dataset spec (default: cifar100)")
    t.add_argument("--class-subset", default=None, metavar="A-B", help="train on classes A..B only (e.g. 0-49)")
    t.add_argument("--data-root", default=None, help="dataset cache folder (default: $FEDFORGE_DATA)")
    t.add_argument("--download", action="store_true", help="allow downloading the dataset through torchvision")
    t.add_argument("--out", required=True, help="folder for generator.safetensors/.json, checkpoints, curves, samples")
    t.add_argument("--steps", type=int, default=6000, help="generator steps in total (default: 6000; raise it to continue)")
    t.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    t.add_argument("--latent-dim", type=int, default=128, help="latent dimension of the N(0,I) prior (default: 128)")
    t.add_argument("--channels", type=int, default=64, help="generator width: channels of its last hidden block (default: 64)")
    t.add_argument("--d-channels", type=int, default=32, help="discriminator width: channels of its first block (default: 32)")
    t.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of both networks (default: 2e-4)")
    t.add_argument("--ema", type=float, default=0.999, help="decay of the generator's weight average (default: 0.999)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument("--conditional", action="store_true",
                   help="train the class-conditional generator v2 (latent [z, class embedding], projection discriminator, "
                        "DiffAugment; --channels is then its narrowest width, default 64) instead of version 1's GAN")
    t.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints and exports (default: 250)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(generator_func=_train)

    s = sub.add_parser("sample", help="draw prior samples from a generator and write them as a PNG grid")
    s.add_argument("spec", nargs="?", default="builtin", help="builtin[:DIR], diffusers:DIR or stylegan:FILE.pkl (default: builtin)")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("-n", "--num", type=int, default=64, help="number of images (default: 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--prompt", default=None, help="text prompt (diffusers back-end)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (diffusers back-end)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (diffusers back-end)")
    s.add_argument("--trust-generator-pickle", action="store_true",
                   help="allow unpickling a StyleGAN network file (this runs code from the file; only for files you trust)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    s.set_defaults(generator_func=_sample)


def _check_positive(name: str, v: float) -> None:
    if not v > 0:
        raise ConfigError(f"--{name} must be > 0, got {v}.")


def _train(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from .builtin import train_builtin

    for name in ("steps", "batch_size", "latent_dim", "channels", "d_channels", "lr", "checkpoint_every"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    if not 0.0 <= args.ema < 1.0:
        raise ConfigError(f"--ema must lie in [0, 1), got {args.ema}.")
    ds = load_dataset(args.dataset, args.data_root, args.download, args.class_subset)
    if args.conditional:
        return _train_conditional(args, ds)
    log.info("training the built-in generator on %s: %d images of %s", ds.name, len(ds.y), "×".join(map(str, ds.x.shape[1:])))
    t0 = time.perf_counter()
    defaults = {k: p.default for k, p in inspect.signature(train_builtin).parameters.items()}
    meta = {"dataset": ds.name, "class_subset": args.class_subset, "command": _train_command(args, defaults)}
    cfg = train_builtin(ds.x, args.out, **{kw: getattr(args, opt) for opt, kw in _TRAIN_KEYWORDS.items()},
                        checkpoint_every=args.checkpoint_every, meta=meta, progress=not args.no_progress)
    out = Path(args.out)
    print(f"trained {cfg['steps']} steps ({cfg['train_seconds']:.0f}s of training in total; this call {time.perf_counter() - t0:.0f}s)")
    print(f"written: {out / 'generator.safetensors'}, {out / 'generator.json'}, {out / 'samples.png'}, {out / 'losses.png'}")
    print(f"use it with: --generator builtin:{out}")
    return 0


def _train_conditional(args: argparse.Namespace, ds) -> int:
    """`generator train --conditional`: the class-conditional GAN (generator v2) on the dataset's labels; the
    generator's classes are the dataset's class ids (A..B with --class-subset)."""
    from .cgan import train_cgan

    first = int(ds.meta.get("class_subset", [0])[0])
    classes = list(range(first, first + ds.num_classes))
    command = (f"fedforge generator train --conditional --dataset {args.dataset}"
               + (f" --class-subset {args.class_subset}" if args.class_subset else "")
               + f" --steps {args.steps} --batch-size {args.batch_size} --latent-dim {args.latent_dim} "
               f"--channels {args.channels} --d-channels {args.d_channels} --lr {args.lr} --ema {args.ema} "
               f"--seed {args.seed} --out {args.out}")
    t0 = time.perf_counter()
    cfg = train_cgan(ds.x, ds.y + first, classes, args.out, steps=args.steps, batch_size=args.batch_size,
                     z_dim=args.latent_dim, embed_dim=args.latent_dim, width=args.channels, d_width=args.d_channels,
                     lr_g=args.lr, lr_d=args.lr, ema_decay=args.ema, seed=args.seed, class_names=ds.class_names,
                     checkpoint_every=args.checkpoint_every, meta={"dataset": ds.name, "command": command},
                     progress=not args.no_progress)
    print(f"trained {cfg['steps']} steps of the class-conditional generator on {len(classes)} classes "
          f"({cfg['train_seconds']:.0f}s of training in total; this call {time.perf_counter() - t0:.0f}s)")
    print(f"use it with: --generator builtin:{args.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .base import load_generator
    from .images import image_grid, save_png

    _check_positive("num", args.num)
    opts = {"device": args.device}
    if args.trust_generator_pickle:
        opts["trust_pickle"] = True
    for k in ("prompt", "steps", "guidance"):
        if getattr(args, k) is not None:
            opts[k] = getattr(args, k)
    g = load_generator(args.spec, **opts)
    z = g.sample_prior(args.num, args.seed)
    images = g.synthesize(z, args.prompt)
    save_png(image_grid(images), args.out, upscale=2 if g.resolution <= 64 else 1)
    print(f"{args.num} images of {g.resolution}px from {args.spec} (latent dim {g.latent_dim}) written to {args.out}")
    return 0
