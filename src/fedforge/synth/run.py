"""``fedforge synth`` as a Python API: private context in, a task-specific synthetic dataset out.

    from fedforge.synth import SynthConfig, run_synth
    res = run_synth(SynthConfig(private="cifar100", class_subset="50-59", shots=10, selector="pcevolve",
                                epsilon=0.2, iterations=20, per_class=100, out="runs/synth"))
    res.summary["final"]["syn"]["acc"]

The output folder holds ``synthetic.npz`` (the cache format: ``--dataset npz:DIR/synthetic.npz`` works with every
command), ``grids/iteration-XXX.png`` (a row of candidates per class), ``metrics.jsonl`` (per iteration: ε spent so
far, candidates the client's filter kept, seconds, downstream accuracy when due), ``messages.jsonl`` (every
client → server message, i.e. everything the server learnt), ``config.json`` and ``summary.json`` (written last:
total privacy budget and its composition, final accuracy).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data import Dataset, load_dataset, write_cache
from ..errors import ConfigError, DataError
from ..generative.base import Generator, load_generator
from ..options import option, validate_fields
from .encoder import Encoder, load_encoder
from .evaluate import MODES, DownstreamEvaluator, EvalSettings
from .protocol import SELECTORS, Client, Server

log = logging.getLogger("fedforge")


@dataclass
class SynthConfig:
    """Everything that defines one synthetic-data run; ``fedforge synth`` generates its options from these fields."""

    private: str = option("cifar100", "dataset holding the client's images (the rest of each class is the test set)",
                          metavar="SPEC")
    shots: int = option(10, "private images per class (the paper's README: 10)", ge=1, metavar="K")
    class_subset: str | None = option(None, "keep classes A-B of the private dataset, relabelled 0..B-A", metavar="A-B")
    generator: str = option("builtin", "builtin[:DIR], diffusers:DIR or stylegan:FILE", metavar="SPEC")
    gen_steps: int = option(50, "denoising steps of a diffusers generator (PCEvolve: 50)", ge=1, metavar="S")
    guidance: float = option(7.5, "classifier-free guidance scale of a diffusers generator (PCEvolve: 7.5)", ge=0,
                             metavar="G")
    gen_batch_size: int = option(4, "images per call of a diffusers generator", ge=1, metavar="B")
    gen_dtype: str = option("float32", "weights' dtype of a diffusers generator (PCEvolve: float16 on a GPU)",
                            choices=("float32", "float16", "bfloat16"))
    trust_generator_pickle: bool = option(False, "allow loading a StyleGAN pickle (unpickling runs code from the file: "
                                                 "only for files you trust)")
    selector: str = option("pcevolve", "pcevolve (exponential mechanism), pe (noisy votes), rf (no privacy), "
                           "none (iteration 0 only)", choices=SELECTORS)
    epsilon: float = option(0.2, "privacy budget per iteration (PCEvolve README: 0.2); inf turns the noise off",
                            gt=0, finite=False, metavar="E")
    iterations: int = option(100, "evolution iterations T (the paper's code: 100)", ge=0, metavar="T")
    per_class: int = option(100, "candidates per class per iteration N (the paper: 100)", ge=1, metavar="N")
    encoder: str = option("builtin", "builtin, checkpoint:PATH.safetensors or torchvision:NAME (cached weights only)",
                          metavar="SPEC")
    seed: int = option(0, "random seed", ge=0)
    out: str | None = option(None, "output folder (default runs/synth-<selector>-<time>)", metavar="DIR")
    eval_every: int = option(0, "also evaluate downstream every M iterations (0: only after the last)", ge=0,
                             metavar="M")
    eval_modes: Sequence[str] = option(("syn", "mix"), "training sets to evaluate: syn, mix, real ('' for none)",
                                       metavar="LIST")
    classifier: str = option("linear", "linear (head on the frozen encoder) or a model name")
    eval_epochs: int | None = option(None, "classifier epochs (default 100 linear, 20 model)", ge=1, metavar="E")
    eval_lr: float | None = option(None, "classifier learning rate", gt=0, metavar="LR")
    eval_batch_size: int = option(16, "classifier batch size", ge=1)
    tau: float = option(10.0, "similarity calibrator's temperature (the paper: 10)", gt=0)
    prototypes: int = option(1, "prototypical candidates the exponential mechanism draws per class (the paper: 1)",
                             ge=1)
    delta: float | None = option(None, "PE's δ per iteration (default: 1 / number of private images, as EvolveGen)",
                                 gt=0, lt=1, metavar="D")
    pe_threshold: float = option(0.0, "PE's histogram threshold H (EvolveGen default 0)", metavar="H")
    rf_threshold: float = option(0.0, "rf: reject candidates within this distance of another class's private image",
                                 ge=0, metavar="D")
    strength: float = option(0.8, "first variation strength (the paper: 0.8)", ge=0, le=1)
    strength_step: float = option(0.02, "decrease of the variation strength per iteration (the paper: 0.02)", ge=0)
    strength_min: float = option(0.6, "floor of the variation strength (the paper: 0.6)", ge=0, le=1)
    domain: str = option("photo", "{domain} in the prompt 'A {domain} image of {label}'")
    labels: Sequence[str] | None = option(None, "class names for the prompt (default: the dataset's, else 'class c')",
                                          metavar="A,B,...")
    test_per_class: int | None = option(None, "cap on held-out test images per class (None: all)", ge=1, metavar="M")
    data_root: str | None = option(None, "dataset cache folder (default $FEDFORGE_DATA)", metavar="DIR")
    device: str = option("cpu", "cpu or cuda[:N]")
    grid_columns: int = option(10, "candidates shown per class in the grids", ge=1)

    def validate(self) -> SynthConfig:
        validate_fields(self, flags=True)
        if self.strength_min > self.strength:
            raise ConfigError("variation strengths need --strength-min ≤ --strength.")
        bad = [m for m in self.eval_modes if m not in MODES]
        if bad:
            raise ConfigError(f"unknown evaluation mode '{bad[0]}'; choose from {', '.join(MODES)}.")
        self.eval_modes = tuple(self.eval_modes)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_modes"] = list(self.eval_modes)
        d["labels"] = list(self.labels) if self.labels else None
        return d


@dataclass
class SynthResult:
    summary: dict
    records: list[dict]
    x: np.ndarray
    y: np.ndarray
    path: Path | None = None
    messages: list = field(default_factory=list)


def split_private(ds: Dataset, shots: int, seed: int, test_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``shots`` private indices (a seeded draw) and the rest as test indices."""
    from ..core.context import derive_seed

    rng = np.random.default_rng(derive_seed(seed, "private"))
    priv, test = [], []
    counts = np.bincount(ds.y, minlength=ds.num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(f"class {int(empty[0])} of {ds.name} has no images, so the client has no private images "
                        f"of it; relabel the data to 0..K-1 without gaps or pick classes with --class-subset.")
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.y == c))
        priv.append(idx[:shots])
        rest = idx[shots:]
        test.append(rest[:test_per_class] if test_per_class else rest)
    return np.concatenate(priv), np.concatenate(test)


def generator_options(cfg: SynthConfig) -> dict[str, Any]:
    """The ``load_generator`` options of ``cfg.generator``: the device, the trust flag, and for a diffusers folder its
    steps, guidance, batch size and dtype."""
    opts: dict[str, Any] = {"device": cfg.device, "trust_pickle": cfg.trust_generator_pickle}
    if cfg.generator.split(":", 1)[0] == "diffusers":
        opts |= {"steps": cfg.gen_steps, "guidance": cfg.guidance, "batch_size": cfg.gen_batch_size,
                 "dtype": cfg.gen_dtype}
    return opts


def _write_grid(server: Server, path: Path, columns: int) -> None:
    from ..generative.images import image_grid, save_png

    x, y = server.dataset()
    rows = [x[y == c][:columns] for c in range(server.num_classes)]
    h, w, ch = x.shape[1:]
    blank = np.full((columns, h, w, ch), 255, np.uint8)
    tiles = np.concatenate([np.concatenate([r, blank[: columns - len(r)]]) for r in rows])
    save_png(image_grid(tiles, ncol=columns), path, upscale=max(1, 64 // h))


def run_synth(cfg: SynthConfig, *, dataset: Dataset | None = None, generator: Generator | None = None,
              encoder: Encoder | None = None, progress: bool = False,
              on_record: Callable[[dict], None] | None = None) -> SynthResult:
    """Run the protocol for ``cfg.iterations`` iterations (objects passed here replace the specs in ``cfg``)."""
    from ..results.rundir import RunDir

    cfg.validate()
    t_start = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(cfg.private, cfg.data_root, class_subset=cfg.class_subset)
    if dataset is not None and cfg.class_subset and "class_subset" not in ds.meta:  # not yet narrowed
        from ..data.sources import select_classes

        ds = select_classes(ds, cfg.class_subset)
    priv_idx, test_idx = split_private(ds, cfg.shots, cfg.seed, cfg.test_per_class)
    px, py = ds.x[priv_idx], ds.y[priv_idx]
    enc = encoder if encoder is not None else load_encoder(cfg.encoder, cfg.device)
    enc.check_images(px.shape)
    gen = generator if generator is not None else load_generator(cfg.generator, **generator_options(cfg))
    C = ds.num_classes
    labels = list(cfg.labels) if cfg.labels else (ds.class_names or None)
    if labels is not None and len(labels) != C:
        raise ConfigError(f"--labels names {len(labels)} classes but the private data has {C}; give one name per class.")

    client = Client(px, py, C, enc, cfg.selector, cfg.epsilon, tau=cfg.tau, prototypes=cfg.prototypes, delta=cfg.delta,
                    pe_threshold=cfg.pe_threshold, rf_threshold=cfg.rf_threshold, seed=cfg.seed)
    del px  # from here on the private pixels live only inside the client (and the evaluator, which is the client's)
    server = Server(gen, C, cfg.per_class, ds.input_shape, labels=labels, domain=cfg.domain, seed=cfg.seed,
                    strength=cfg.strength, strength_step=cfg.strength_step, strength_min=cfg.strength_min)
    T = 0 if cfg.selector == "none" else cfg.iterations
    wants_eval = bool(cfg.eval_modes)
    evaluator = None
    if wants_eval:
        evaluator = DownstreamEvaluator(enc, (ds.x[priv_idx], py), (ds.x[test_idx], ds.y[test_idx]), C,
                                        EvalSettings(cfg.classifier, cfg.eval_epochs, cfg.eval_batch_size, cfg.eval_lr, cfg.seed))

    rd = RunDir.create(cfg.out) if cfg.out else None
    if rd is not None:
        rd.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.write_json("config.json", {**cfg.to_dict(), "dataset": ds.name, "num_classes": C,
                                      "private_images": int(len(py)), "test_images": int(len(test_idx)),
                                      "generator_repr": repr(gen), "encoder_name": enc.name})
    records: list[dict] = []
    messages: list = []

    def due(t: int) -> bool:
        return wants_eval and (t == T or (cfg.eval_every > 0 and t % cfg.eval_every == 0))

    def record(t: int, seconds: float, kept: int | None, candidates: int | None) -> dict:
        eps, delta = client.accountant.spent()
        rec: dict[str, Any] = {"iteration": t, "epsilon_spent": eps, "delta_spent": delta, "kept": kept,
                               "candidates": candidates, "strength": server.strengths[-1] if server.strengths else None,
                               "seconds": seconds}
        if rd is not None:
            _write_grid(server, rd.file("grids") / f"iteration-{t:03d}.png", cfg.grid_columns)
        if due(t):
            sx, sy = server.dataset()
            for m in cfg.eval_modes:
                r = evaluator.evaluate(m, (sx, sy))
                rec[f"{m}_acc"], rec[f"{m}_macro_f1"] = r["acc"], r["macro_f1"]
        rec["elapsed"] = time.perf_counter() - t_start
        records.append(rec)
        if rd is not None:
            rd.write_metrics(records)
            rd.write_text("messages.jsonl", "".join(_json_line(m.to_json()) for m in messages))
        if on_record is not None:
            on_record(rec)
        return rec

    bar = None
    if progress and T > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, desc=f"synth {cfg.selector}", unit="iter", dynamic_ncols=True, leave=True)
    try:
        t0 = time.perf_counter()
        server.propose()
        record(0, time.perf_counter() - t0, None, None)
        for t in range(1, T + 1):
            t0 = time.perf_counter()
            sel = client.respond(server.propose())
            messages.append(sel)
            server.receive(sel)
            server.propose()
            seconds = time.perf_counter() - t0
            local = client.local_log[-1]
            rec = record(t, seconds, local["kept"], local["candidates"])
            if bar is not None:
                bar.update(1)
                post = {k: f"{rec[k]:.3f}" for k in ("syn_acc", "mix_acc") if rec.get(k) is not None}
                bar.set_postfix({"eps": f"{rec['epsilon_spent']:.3g}", "kept": rec["kept"], **post}, refresh=False)
        sx, sy = server.dataset()
        final = {m: {"acc": records[-1].get(f"{m}_acc"), "macro_f1": records[-1].get(f"{m}_macro_f1")}
                 for m in cfg.eval_modes}
        if wants_eval:
            final["real"] = evaluator.evaluate("real")
        iter_secs = [r["seconds"] for r in records[1:]]
        summary = {
            "selector": cfg.selector, "dataset": ds.name, "classes": C, "shots": cfg.shots,
            "generator": cfg.generator if generator is None else repr(gen), "encoder": enc.name,
            "iterations": T, "per_class": cfg.per_class, "seed": cfg.seed,
            "privacy": client.accountant.summary(),
            "pe_sigma": client.sigma if cfg.selector == "pe" else None,
            "synthetic": {"images": int(len(sy)), "shape": list(sx.shape[1:]), "file": "synthetic.npz" if rd else None},
            "final": final, "classifier": cfg.classifier,
            "seconds_per_iteration": float(np.mean(iter_secs)) if iter_secs else None,
            "wall_seconds": time.perf_counter() - t_start,
            "messages": {"count": len(messages), "numbers": sum(m.numbers() for m in messages)},
        }
        if rd is not None:
            write_cache(rd.file("synthetic.npz"), sx, sy)
            rd.write_json("summary.json", summary)
            rd.set_status("complete", wall_seconds=summary["wall_seconds"])
    except BaseException as e:
        if rd is not None:
            rd.set_status("failed" if not isinstance(e, KeyboardInterrupt) else "interrupted", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if bar is not None:
            bar.close()
    return SynthResult(summary, records, sx, sy, rd.path if rd else None, messages)


def _json_line(obj: Any) -> str:
    from ..results.rundir import dumps

    return dumps(obj, indent=None) + "\n"
