"""Gradient inversion of one client's upload: DLG (Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019) with
iDLG's label inference (Zhao, Mopuri & Bilen, "iDLG: Improved Deep Leakage from Gradients", 2020).

``fedforge attack dlg --run DIR --client C --round R`` answers "what could the server see of client C's data in the
update it uploaded in round R?":

1. **Replay.** Runs keep no uploads. A run is deterministic (every (round, client) task draws from its own seeded
   stream), so the run is replayed from its ``config.yaml`` and ``partition.npz`` through the run session and the
   round engine, up to and including round R, with the sequential executor (results never depend on the executor);
   a wrapper around the executor keeps the message client C received in round R, its state before it and its update.
   The replayed round's training loss is checked against the run's ``metrics.jsonl`` where that round was logged.
2. **Target.** With plain SGD at rate η, the upload w' and the received weights w give
   g = (w − w') / η, exactly the gradient of the batch's mean loss for one local step (PFLlib's ``DLG`` matches the raw
   difference w − w', i.e. η·g; here η is divided out, so the matched quantity is a gradient). With several steps, g is
   the sum of the steps' gradients, which the attack models as the sum of each step's mean gradient taken at w (exact
   for one step, an approximation otherwise). Only the uploaded parameters are matched; parameters the client keeps
   (a personal head) are given their values from the client's state (the attack then knows more than the server).
3. **Labels.** One image: iDLG reads the label off the last layer's gradient — with cross-entropy, row c of the
   output layer's weight gradient is (p_c − 1[c = y])·z with z ≥ 0 (after ReLU), so only the true class's row sums
   below zero. Several images: DLG optimises soft labels along with the images.
4. **Images.** Dummy images x̂ = sigmoid(u) in [0, 1] pixel space (normalised as the federation normalises real
   batches) are optimised with L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search) to minimise
   Σ_params ‖∇_w ℓ(x̂, ŷ) − g‖², the model's cross-entropy (FedAvg's loss; an algorithm's own extra terms are unknown
   to the attacker).
5. **Scores.** PSNR (10·log₁₀(1/MSE) on [0, 1]) and SSIM (scikit-image's ``structural_similarity``, data range 1) of
   each reconstruction against the image the client really trained on (the replayed batch), after matching
   reconstructions to originals by the assignment with the highest total PSNR (a batch's order is not recoverable),
   and a PNG of the originals above the reconstructions.

Under client-level DP (``--dp-epsilon``) the upload is a clipped and noised gradient, and the same attack recovers
noise: that is the test of the defence (``benchmarks/dlg_psnr.py``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RunConfig, build_config, load_yaml
from ..core.algorithm import Update
from ..core.executors import Executor, SequentialExecutor
from ..core.faults import ClientFailure, RunInterrupted
from ..core.messages import Message, State
from ..core.runtime import ClientRuntime, Task, Worker, WorkerSpec, task_seed
from ..core.simulation import SessionHooks, Simulation, select_clients
from ..errors import ConfigError

log = logging.getLogger("fedforge")
SSIM_HINT = "the attack scores reconstructions with scikit-image's SSIM: pip install 'fedforge[attack]'"


# ---------------------------------------------------------------------------------------------- replay
class _Capture(Executor):
    """Passes every task to the run's executor and keeps client ``cid``'s train task of round ``rnd`` and its result."""

    def __init__(self, inner: Executor, cid: int, rnd: int):
        super().__init__(inner.workers, inner.threads)
        self.inner, self.cid, self.rnd, self.name = inner, cid, rnd, inner.name
        self.task: Task | None = None
        self.result: Any = None

    def start(self, spec: WorkerSpec) -> None:
        self.inner.start(spec)

    def close(self) -> None:
        self.inner.close()

    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        return self.inner.imap(tasks)

    def map(self, tasks: Iterable[Task]) -> list[Any]:
        tasks = list(tasks)
        results = self.inner.map(tasks)
        for t, r in zip(tasks, results):
            if t.kind == "train" and t.round == self.rnd and t.cid == self.cid:
                self.task, self.result = t, r
        return results


class _StopAfter:
    """Engine listener: asks the session to stop once round ``rnd`` is complete; keeps that round's training loss."""

    def __init__(self, rnd: int):
        self.rnd, self.sim, self.loss = rnd, None, None

    def aggregated(self, rnd: int, prog: Any) -> None:
        if rnd == self.rnd:
            self.loss = prog.round_info.get("loss")
            self.sim.request_stop()


@dataclass
class Replay:
    """What the replay of round R recovered for client C."""

    sim: Simulation
    cid: int
    round: int
    message: Message
    state: State
    update: Update
    loss: float | None
    logged_loss: float | None

    @property
    def lr(self) -> float:
        c = self.sim.cfg
        return c.lr * c.lr_decay ** max(0, self.round - 1)


def run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} has no config.yaml, so it is not a fedforge run directory; give --run the folder a "
                          f"`fedforge run` wrote.")
    cfg = build_config(load_yaml(path / "config.yaml"))
    if (path / "partition.npz").is_file():
        cfg.partition_file = str(path / "partition.npz")  # the run's own split, whatever made it
    return cfg


def replay(run_dir: str | Path, cid: int, rnd: int, device: str | None = None) -> Replay:
    """Replay the run in ``run_dir`` up to round ``rnd`` and return client ``cid``'s message, state and update."""
    cfg = run_config(run_dir)
    if not 1 <= rnd <= cfg.rounds:
        raise ConfigError(f"--round must be between 1 and the run's {cfg.rounds} rounds, got {rnd}.")
    cfg.executor, cfg.workers, cfg.out, cfg.tracker = "sequential", 0, None, []
    cfg.eval_every = max(cfg.rounds, 1)  # evaluations never change training; skip them
    if device is not None:
        cfg.device = device
    stop = _StopAfter(rnd)
    capture: list[_Capture] = []
    hooks = SessionHooks(wrap_executor=lambda ex, _sim: capture.append(_Capture(ex, cid, rnd)) or capture[-1],
                         listeners=[stop])
    sim = Simulation(cfg, run_dir=False, progress=False, executor=SequentialExecutor(threads=cfg.threads), hooks=hooks)
    n = sim.ctx.num_clients
    if not 0 <= cid < n:
        raise ConfigError(f"--client must be one of the run's training clients 0..{n - 1}, got {cid}.")
    active, dropped = sim.select_clients(rnd)
    if cid not in active:
        took = [r for r in range(1, cfg.rounds + 1) if cid in select_clients(sim.schedule, n, r)[0]]
        raise ConfigError(f"client {cid} uploaded nothing in round {rnd} ({'it dropped out' if cid in dropped else 'it was not sampled'}); "
                          f"it took part in rounds {_ranges(took) or 'none'}.")
    stop.sim = sim
    try:
        sim.run()
    except RunInterrupted:
        pass
    cap = capture[0]
    if cap.task is None or cap.result is None:
        raise ConfigError(f"the replay of round {rnd} did not reach client {cid}'s update.")
    if isinstance(cap.result, ClientFailure):
        raise ConfigError(f"client {cid}'s update of round {rnd} failed in the run ({cap.result.error}); nothing was uploaded.")
    return Replay(sim, cid, rnd, cap.task.message, cap.task.state or {}, cap.result, stop.loss,
                  _logged_loss(Path(run_dir), rnd))


def _logged_loss(run_dir: Path, rnd: int) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("round") == rnd and not rec.get("stage"):
            return rec.get("loss")
    return None


def _ranges(rounds: list[int]) -> str:
    return ", ".join(map(str, rounds[:12])) + (", ..." if len(rounds) > 12 else "")


# ------------------------------------------------------------------------------------------------ attack
@dataclass
class DLGResult:
    psnr: list[float]
    ssim: list[float]
    labels: list[int]
    inferred_labels: list[int]
    originals: np.ndarray  # (N, H, W, C) in [0, 1]
    reconstructions: np.ndarray  # (N, H, W, C) in [0, 1], matched to the originals
    matching_loss: float
    steps: int
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        p, s = np.asarray(self.psnr), np.asarray(self.ssim)
        return {"images": len(self.psnr), "psnr": self.psnr, "ssim": self.ssim,
                "psnr_mean": float(p.mean()), "psnr_std": float(p.std()), "ssim_mean": float(s.mean()),
                "ssim_std": float(s.std()), "labels": self.labels, "inferred_labels": self.inferred_labels,
                "label_accuracy": float(np.mean(np.asarray(self.labels) == np.asarray(self.inferred_labels))),
                "matching_loss": self.matching_loss, "local_steps": self.steps, **self.info}


def attack(rep: Replay, iterations: int = 300, max_images: int = 16, seed: int = 0) -> DLGResult:
    """DLG/iDLG on client ``rep.cid``'s upload of round ``rep.round`` (see the module docstring)."""
    sim, cid = rep.sim, rep.cid
    if sim.ds.modality != "image":
        raise ConfigError(f"DLG here reconstructs images; {sim.ds.name} holds {sim.ds.modality} data.")
    if sim.cfg.optimizer != "sgd" or sim.cfg.weight_decay:
        raise ConfigError("DLG reads the gradient off the update, which needs plain local SGD (--optimizer sgd, no "
                          "--weight-decay); attack a run made with it.")
    device = torch.device(sim.ctx.device)
    worker = Worker(WorkerSpec(sim.ds, sim.partition, sim.algo, sim.cfg.augment, sim.cfg.threads))
    rt = ClientRuntime(worker, cid, rep.round, task_seed(sim.ctx.seed, rep.round, cid, "train"))
    batches = [(x.detach(), y.detach()) for x, y in rt.batches()]  # the batches of the round's first local pass
    images = sum(int(y.shape[0]) for _, y in batches)
    if images > max_images:
        raise ConfigError(f"DLG reconstructs a few images from one update, but client {cid} trained on {images} images "
                          f"in round {rep.round} ({len(batches)} steps); attack a client with fewer samples or a run "
                          f"with fewer local steps, or raise --max-images.")
    model = worker.model(sim.ctx.arch(cid))
    names = dict(model.named_parameters())
    upload = {k: v.to(device) for k, v in rep.update.upload.items() if k in names}
    if not upload:
        raise ConfigError(f"client {cid}'s upload holds no model weight ({', '.join(list(rep.update.upload)[:3])}, ...); "
                          f"DLG needs an update of the model's weights.")
    start = {**{k: v for k, v in rep.state.items() if k in model.state_dict()},
             **{k: v for k, v in rep.message.items() if k in model.state_dict()}}
    rt.load({k: v.to(device) for k, v in start.items()})
    model.eval()  # the attacker's forward; models without batch statistics behave the same in train mode
    wanted = [k for k in names if k in upload]
    params = [names[k] for k in wanted]
    target = [(rep.message[k].to(device) - upload[k]) / rep.lr for k in wanted]

    mean = torch.tensor(sim.ds.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(sim.ds.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    xs = torch.cat([x for x, _ in batches]).float()
    originals = (xs * std + mean).clamp(0, 1)
    labels = torch.cat([y for _, y in batches])
    groups, pos = [], 0
    for _, y in batches:
        groups.append(list(range(pos, pos + int(y.shape[0]))))
        pos += int(y.shape[0])

    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(originals.shape, generator=gen, device=device).requires_grad_(True)
    known = images == 1
    if known:  # iDLG: the label from the sign of the output layer's gradient
        inferred = torch.tensor([_idlg_label(model, wanted, target, sim.ds.num_classes)], device=device)
        opt_vars = [u]
        soft = None
    else:
        soft = torch.randn(images, sim.ds.num_classes, generator=gen, device=device).requires_grad_(True)
        opt_vars = [u, soft]
    opt = torch.optim.LBFGS(opt_vars, lr=1.0, max_iter=iterations, history_size=100, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def objective() -> torch.Tensor:
        x = (torch.sigmoid(u) - mean) / std
        total: list[torch.Tensor] | None = None
        for g in groups:
            out = model(x[g])
            if soft is None:
                loss = F.cross_entropy(out, inferred[g])
            else:
                loss = -(F.softmax(soft[g], 1) * F.log_softmax(out, 1)).sum(1).mean()
            gs = torch.autograd.grad(loss, params, create_graph=True)
            total = list(gs) if total is None else [a + b for a, b in zip(total, gs)]
        assert total is not None
        return sum(((a - b) ** 2).sum() for a, b in zip(total, target))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    final = float(_detached(objective))
    recon = torch.sigmoid(u).detach()
    guessed = inferred.tolist() if soft is None else soft.argmax(1).tolist()
    orig_np = _hwc(originals)
    rec_np = _hwc(recon)
    order = _match(orig_np, rec_np)
    rec_np = rec_np[order]
    guessed = [guessed[i] for i in order]
    psnr = [_psnr(a, b) for a, b in zip(orig_np, rec_np)]
    ssim = [_ssim(a, b) for a, b in zip(orig_np, rec_np)]
    return DLGResult(psnr, ssim, labels.tolist(), guessed, orig_np, rec_np, final, len(batches),
                     {"label_inference": "idlg" if known else "dlg (soft labels)", "iterations": iterations})


def _detached(objective: Any) -> torch.Tensor:
    with torch.enable_grad():
        return objective().detach()


def _idlg_label(model: torch.nn.Module, names: list[str], target: list[torch.Tensor], num_classes: int) -> int:
    """iDLG: the one class whose row of the output layer's weight gradient sums below zero (the most negative)."""
    head = [(k, g) for k, g in zip(names, target) if k.startswith("head.") and g.dim() == 2 and g.shape[0] == num_classes]
    if not head:
        head = [(k, g) for k, g in zip(names, target) if g.dim() == 2 and g.shape[0] == num_classes]
    if not head:
        raise ConfigError("iDLG reads the label off the output layer's gradient, but the upload holds no output layer; "
                          "attack an upload of the whole model.")
    return int(head[-1][1].sum(1).argmin())


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().permute(0, 2, 3, 1).contiguous().numpy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:
        raise ConfigError(SSIM_HINT) from e

    side = min(a.shape[0], a.shape[1])
    win = min(7, side if side % 2 else side - 1)
    if a.shape[2] == 1:
        return float(structural_similarity(a[..., 0], b[..., 0], data_range=1.0, win_size=win))
    return float(structural_similarity(a, b, data_range=1.0, win_size=win, channel_axis=-1))


def _match(orig: np.ndarray, rec: np.ndarray) -> list[int]:
    """For each original, the reconstruction assigned to it (the assignment with the highest total PSNR)."""
    if len(orig) == 1:
        return [0]
    from scipy.optimize import linear_sum_assignment

    score = np.array([[_psnr(o, r) for r in rec] for o in orig])
    score[~np.isfinite(score)] = 1e9
    rows, cols = linear_sum_assignment(-score)
    return [int(c) for _, c in sorted(zip(rows, cols))]


# ------------------------------------------------------------------------------------------------ output
def write(result: DLGResult, rep: Replay, out: str | Path) -> dict:
    """``dlg.json`` (scores, labels, the replay check, the run's DP settings), ``dlg.png`` (originals above
    reconstructions, each titled with its PSNR) and ``images.npz`` (both as (N, H, W, C) arrays in [0, 1]) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = rep.sim.cfg
    info = {"run_client": rep.cid, "round": rep.round, "lr": rep.lr, "replayed_loss": rep.loss,
            "logged_loss": rep.logged_loss,
            "replay_matches_log": None if rep.logged_loss is None or rep.loss is None else rep.loss == rep.logged_loss,
            "dp_epsilon": c.dp_epsilon, "dp_max_grad_norm": c.dp_max_grad_norm if c.dp_epsilon is not None else None,
            "server_dp_noise": c.server_dp_noise, **result.summary()}
    (out / "dlg.json").write_text(json.dumps(info, indent=2, default=float))
    np.savez_compressed(out / "images.npz", originals=result.originals, reconstructions=result.reconstructions)
    _figure(result, out / "dlg.png", f"client {rep.cid}, round {rep.round}"
            + (f", DP ε = {c.dp_epsilon:g}" if c.dp_epsilon is not None else ""))
    return info


def _figure(result: DLGResult, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.psnr)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.6, 3.6), squeeze=False)
    for i in range(n):
        for row, img, label in ((0, result.originals[i], f"label {result.labels[i]}"),
                                (1, result.reconstructions[i], f"{result.psnr[i]:.1f} dB")):
            ax = axes[row][i]
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    axes[0][0].text(-0.3, 0.5, "original", transform=axes[0][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    axes[1][0].text(-0.3, 0.5, "DLG", transform=axes[1][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_dlg(run_dir: str | Path, cid: int, rnd: int, *, iterations: int = 300, max_images: int = 16, seed: int = 0,
            out: str | Path | None = None, device: str | None = None) -> dict:
    """Replay, attack and write (``out`` default: ``<run>/attacks/dlg-c<C>-r<R>``); returns what ``dlg.json`` holds."""
    if importlib.util.find_spec("skimage") is None:  # before the attack, not after it
        raise ConfigError(SSIM_HINT)
    rep = replay(run_dir, cid, rnd, device)
    if rep.logged_loss is not None and rep.loss is not None and rep.loss != rep.logged_loss:
        log.warning("the replayed round %d has training loss %r, the run logged %r: the replay differs from the run "
                    "(another library version or device?)", rnd, rep.loss, rep.logged_loss)
    res = attack(rep, iterations=iterations, max_images=max_images, seed=seed)
    return write(res, rep, out or Path(run_dir) / "attacks" / f"dlg-c{cid}-r{rnd}")
