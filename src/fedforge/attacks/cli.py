"""``fedforge attack dlg``: the command-line face of :func:`fedforge.attacks.dlg.run_dlg`."""
from __future__ import annotations

import argparse

from ..commands import register_command


@register_command("attack", help="reconstruct a client's training images from one update it uploaded (DLG / iDLG)")
def cmd_attack(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .dlg import run_dlg

    for name in ("client", "round", "iterations", "max_images"):
        if getattr(args, name) < (0 if name == "client" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {0 if name == 'client' else 1}, got "
                              f"{getattr(args, name)}.")
    info = run_dlg(args.run, args.client, args.round, iterations=args.iterations, max_images=args.max_images,
                   seed=args.seed, out=args.out, device=args.device)
    check = {True: "matches the run's log", False: "DIFFERS from the run's log", None: "not logged by the run"}
    print(f"DLG on client {args.client}'s update of round {args.round} ({info['images']} image(s), "
          f"{info['local_steps']} local step(s); replayed training loss {check[info['replay_matches_log']]})")
    print(f"  PSNR {info['psnr_mean']:.2f} ± {info['psnr_std']:.2f} dB   SSIM {info['ssim_mean']:.3f} ± "
          f"{info['ssim_std']:.3f}   labels {info['label_accuracy']:.0%} right ({info['label_inference']})")
    out = args.out or f"{args.run}/attacks/dlg-c{args.client}-r{args.round}"
    print(f"results: {out}/dlg.json, {out}/dlg.png")
    return 0


@cmd_attack.arguments
def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", choices=("dlg",), help="the attack: dlg (DLG, with iDLG's labels for a single image)")
    p.add_argument("--run", required=True, help="run directory of a finished or stopped `fedforge run`")
    p.add_argument("--client", type=int, required=True, help="the client whose upload is attacked")
    p.add_argument("--round", type=int, required=True, help="the round of the upload (1..rounds)")
    p.add_argument("--iterations", type=int, default=300, help="L-BFGS iterations (default: 300)")
    p.add_argument("--max-images", type=int, default=16,
                   help="refuse updates of more training images than this (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dummy images and labels (default: 0)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/attacks/dlg-c<C>-r<R>)")
    p.add_argument("--device", default=None, help="device of the replay and the attack (default: the run's)")
