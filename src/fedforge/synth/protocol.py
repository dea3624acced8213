"""The two roles of private synthetic-data evolution and the only messages they exchange.

PCEvolve (Zhang et al., "PCEvolve: Private Contrastive Evolution for Synthetic Dataset Generation via Few-Shot
Private Data and Generative APIs", ICML 2025), Algorithm 1. The client holds K private images per class and an
encoder e(·); the server holds a generator. At iteration t:

* server → client: candidates D_t = {d_{c,i}} (N per class; at t = 0 prior samples, for text-conditioned
  back-ends with the prompt "A {domain} image of {label}", for unconditional ones one shared pool seen by every class);
* client: class centres p_c = mean_{x∈X_c} e(x); for a candidate d of class c with ℓ_j = ‖e(d) − p_j‖₂
    contrastive filter   g(d) = 1 if argmin_j ℓ_j = c, else 0;
    similarity calibrator u(d) = g(d)·exp(−τ·(ℓ_c − ℓ_min)/(ℓ_max − ℓ_min)) ∈ [0, 1]  (min/max over kept d; τ = 10);
    exponential mechanism  P(select d) ∝ exp(ε_c·u(d)/(2Δ)),  Δ = 1,  ε_c = ε/(K_proto·C);
* client → server: a :class:`Selection` (per class: the chosen candidate indices and weights) and nothing else;
* server: D_{t+1}: N variations per class of the selected candidates (seed drawn ∝ weight), strength
  s_t = max(0.6, 0.8 − 0.02·t) (latent variation; img2img for diffusion back-ends).

Baselines on the same path: ``pe`` (Private Evolution, Lin et al., ICLR 2024: each private image votes for its
nearest candidate of its class, the histogram gets N(0, σ²) noise with σ from (ε, δ) and is thresholded at H;
seeds are drawn ∝ the noisy counts), ``rf`` (a distance filter without noise) and ``none`` (iteration 0 only).

Differences from the released code (PCEvolve/EvolveGen), where we follow the paper: the released filter also
demands a margin of τ between the own centre and the others (``-(dist + tau)`` inside the softmax); the prompt
there is "A {DOMAIN} image with {LABEL}", here "A {domain} image of {label}" as the project's issue fixes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..generative.base import Generator
from .encoder import Encoder
from .privacy import PrivacyAccountant, exponential_mechanism_probs, gaussian_sigma

SELECTORS = ("pcevolve", "pe", "rf", "none")


# ------------------------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class Candidates:
    """Server → client: the candidate images of one iteration.

    ``images`` is one pooled uint8 NHWC array; ``index[c]`` lists the rows that are class c's candidates (with a
    shared pool, every class lists every row).
    """

    iteration: int
    images: np.ndarray
    index: Mapping[int, np.ndarray]
    shared: bool = False

    def of(self, c: int) -> np.ndarray:
        return self.images[self.index[c]]


class Selection:
    """Client → server: for each class, which of the server's own candidates were chosen and with what weight.

    The only fields are the iteration and, per class, a tuple of (candidate index, weight) pairs with Python
    ints and finite non-negative floats; no array, tensor or other object can be stored in it (``__slots__``, and
    every value is checked and copied into immutable tuples). The server validates the indices against the
    candidates it sent.
    """

    __slots__ = ("_iteration", "_picks")

    def __init__(self, iteration: int, picks: Mapping[int, Sequence[tuple[int, float]]]):
        if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)):
            raise TypeError("Selection.iteration must be an int")
        clean: dict[int, tuple[tuple[int, float], ...]] = {}
        for c, pairs in dict(picks).items():
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise TypeError(f"Selection class keys must be ints, got {type(c).__name__}")
            if isinstance(pairs, (np.ndarray, torch.Tensor)):
                raise TypeError("Selection values must be (index, weight) pairs, not arrays")
            out = []
            for pair in pairs:
                if isinstance(pair, (np.ndarray, torch.Tensor)) or len(pair) != 2:
                    raise TypeError("each selection entry must be one (candidate index, weight) pair")
                i, w = pair
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or int(i) < 0:
                    raise TypeError(f"a selected candidate index must be a non-negative int, got {i!r}")
                if isinstance(w, (np.ndarray, torch.Tensor)) and np.ndim(w) != 0:
                    raise TypeError("a selection weight must be one number")
                w = float(w)
                if not math.isfinite(w) or w < 0:
                    raise ValueError(f"a selection weight must be finite and non-negative, got {w}")
                out.append((int(i), w))
            clean[int(c)] = tuple(out)
        object.__setattr__(self, "_iteration", int(iteration))
        object.__setattr__(self, "_picks", MappingProxyType(clean))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Selection is immutable")

    @property
    def iteration(self) -> int:
        return self._iteration

    @property
    def picks(self) -> Mapping[int, tuple[tuple[int, float], ...]]:
        return self._picks

    def numbers(self) -> int:
        """How many numbers the message carries (indices plus weights)."""
        return 2 * sum(len(v) for v in self._picks.values())

    def to_json(self) -> dict:
        return {"iteration": self._iteration, "picks": {str(c): [list(p) for p in v] for c, v in self._picks.items()}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selection) and other.iteration == self.iteration and dict(other.picks) == dict(self.picks)

    def __repr__(self) -> str:
        return f"Selection(iteration={self._iteration}, picks={dict(self._picks)})"


# ------------------------------------------------------------------------------------------------ mechanics
def contrastive_filter(dist: torch.Tensor, c: int) -> torch.Tensor:
    """(n, C) distances to the class centres → (n,) bool: kept when c's centre is the nearest."""
    return dist[:, c] <= dist.min(dim=1).values


def calibrated_utility(dist_own: torch.Tensor, keep: torch.Tensor, tau: float) -> np.ndarray:
    """u = exp(−τ·(ℓ − ℓ_min)/(ℓ_max − ℓ_min)) over the kept candidates (1 when they are all equally far), 0 elsewhere."""
    u = np.zeros(len(dist_own), dtype=np.float64)
    if not bool(keep.any()):
        return u
    d = dist_own[keep].double().numpy()
    lo, hi = d.min(), d.max()
    u[keep.numpy()] = np.exp(-tau * (d - lo) / (hi - lo)) if hi > lo else 1.0
    return u


def pcevolve_pick(u: np.ndarray, epsilon_c: float, prototypes: int, rng: np.random.Generator) -> list[tuple[int, float]]:
    """Draw ``prototypes`` candidates with the exponential mechanism; weights are how often each was drawn."""
    p = exponential_mechanism_probs(u, epsilon_c, 1.0)
    draws = rng.choice(len(u), size=prototypes, replace=True, p=p)
    idx, counts = np.unique(draws, return_counts=True)
    return [(int(i), float(n)) for i, n in zip(idx, counts)]


def pe_votes(private_emb: torch.Tensor, cand_emb: torch.Tensor) -> np.ndarray:
    """PE's histogram: each private embedding votes for its nearest candidate (L2)."""
    nearest = torch.cdist(private_emb, cand_emb).argmin(dim=1).numpy()
    return np.bincount(nearest, minlength=len(cand_emb)).astype(np.float64)


# ------------------------------------------------------------------------------------------------ client
class Client:
    """Holds the private images; answers each :class:`Candidates` with one :class:`Selection`.

    Everything computed from private pixels (embeddings, centres, distances, utilities, filter statistics) stays
    in this object; :meth:`respond` returns only the selection. ``local_log`` is the client's own record of how
    many candidates its filter kept (written to its metrics file, never sent).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, encoder: Encoder, selector: str,
                 epsilon: float, *, tau: float = 10.0, prototypes: int = 1, delta: float | None = None,
                 pe_threshold: float = 0.0, rf_threshold: float = 0.0, seed: int = 0):
        if selector not in SELECTORS:
            raise ConfigError(f"unknown selector '{selector}'; choose one of {', '.join(SELECTORS)}.")
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            c = int(np.flatnonzero(counts == 0)[0])
            raise DataError(f"class {c} has no private images; give at least one image of every class "
                            f"(or narrow --class-subset to the classes you hold).")
        encoder.check_images(images.shape)
        self._encoder = encoder
        self._labels = labels
        self._emb = encoder.embed(images)
        self._centres = torch.stack([self._emb[torch.from_numpy(labels == c)].mean(0) for c in range(num_classes)])
        self.num_classes = num_classes
        self.selector = selector
        self.tau = float(tau)
        self.prototypes = int(prototypes)
        self.pe_threshold = float(pe_threshold)
        self.rf_threshold = float(rf_threshold)
        self.accountant = PrivacyAccountant(selector, float(epsilon), num_classes, self.prototypes,
                                            delta if delta is not None else 1.0 / len(labels))
        self.sigma = gaussian_sigma(float(epsilon), self.accountant.delta_per_iteration) if selector == "pe" else 0.0
        self._seed = seed
        self.local_log: list[dict] = []

    def _rng(self, iteration: int) -> np.random.Generator:
        from ..core.context import derive_seed

        return np.random.default_rng(derive_seed(self._seed, iteration, "client"))

    def respond(self, cands: Candidates) -> Selection:
        """One iteration of the client's side: filter, score, select; spend the budget; return the selection."""
        if self.selector == "none":
            raise ConfigError("the 'none' selector sends nothing; it stops after iteration 0.")
        rng = self._rng(cands.iteration)
        emb_all = self._encoder.embed(cands.images)
        picks: dict[int, list[tuple[int, float]]] = {}
        kept_total = 0
        for c in range(self.num_classes):
            idx = np.asarray(cands.index[c])
            emb = emb_all[torch.from_numpy(idx)]
            if self.selector == "pcevolve":
                dist = torch.cdist(emb, self._centres)
                keep = contrastive_filter(dist, c)
                u = calibrated_utility(dist[:, c], keep, self.tau)
                picks[c] = pcevolve_pick(u, self.accountant.epsilon_per_class, self.prototypes, rng)
            elif self.selector == "pe":
                h = pe_votes(self._emb[torch.from_numpy(self._labels == c)], emb)
                if self.sigma > 0:
                    h = h + rng.normal(0.0, self.sigma, size=len(h))
                w = np.maximum(h - self.pe_threshold, 0.0)
                keep = torch.from_numpy(w > 0)
                if not w.any():  # nothing survived the noise: every candidate equally likely (as in EvolveGen)
                    w = np.ones_like(w)
                picks[c] = [(int(i), float(v)) for i, v in enumerate(w) if v > 0]
            else:  # rf
                d = torch.cdist(emb, self._emb)
                own = torch.from_numpy(self._labels == c)
                nearest_own = d[:, own].min(1).values
                nearest_other = d[:, ~own].min(1).values if bool((~own).any()) else torch.full_like(nearest_own, math.inf)
                keep = (nearest_own <= nearest_other) & (nearest_other >= self.rf_threshold)
                chosen = torch.nonzero(keep).flatten().tolist() or list(range(len(idx)))
                picks[c] = [(int(i), 1.0) for i in chosen]
            kept_total += int(keep.sum())
        self.accountant.spend()
        self.local_log.append({"iteration": cands.iteration, "kept": kept_total,
                               "candidates": int(sum(len(cands.index[c]) for c in range(self.num_classes)))})
        return Selection(cands.iteration, picks)


# ------------------------------------------------------------------------------------------------ server
def strength_schedule(t: int, start: float = 0.8, step: float = 0.02, floor: float = 0.6) -> float:
    """Variation strength of the t-th variation round (t = 0, 1, ...): max(floor, start − step·t)."""
    return max(floor, start - step * t)


class Server:
    """Holds the generator and the current candidates; sees only :class:`Selection` messages.

    Variation: a back-end with an ``img2img(images, strength, condition, rng) -> uint8 NHWC`` method (image-to-image
    generation, as the paper does with diffusion models) gets the selected candidates' images; any other back-end
    gets their latents through :meth:`Generator.vary`.
    """

    def __init__(self, generator: Generator, num_classes: int, per_class: int, image_shape: Sequence[int], *,
                 labels: Sequence[str] | None = None, domain: str = "photo", seed: int = 0,
                 strength: float = 0.8, strength_step: float = 0.02, strength_min: float = 0.6):
        self.gen = generator
        self.num_classes = int(num_classes)
        self.per_class = int(per_class)
        self.image_shape = tuple(int(v) for v in image_shape)  # (C, H, W) the client works in
        self.labels = list(labels) if labels else [f"class {c}" for c in range(num_classes)]
        self.domain = domain
        self.seed = seed
        self.strength0, self.strength_step, self.strength_min = strength, strength_step, strength_min
        self.iteration = 0
        self.variations = 0
        self.latents: dict[int, torch.Tensor] = {}  # per class (latent-variation back-ends)
        self.native: dict[int, np.ndarray] = {}  # per class, the generator's own images (img2img back-ends)
        self.current: Candidates | None = None
        self.received: list[Selection] = []
        self.strengths: list[float] = []
        self._pool_latents: torch.Tensor | None = None
        self._pool_native: np.ndarray | None = None
        self._labels_of_pool: np.ndarray | None = None

    @property
    def conditional(self) -> bool:
        return bool(getattr(self.gen, "conditional", False))

    @property
    def image_to_image(self) -> bool:
        return callable(getattr(self.gen, "img2img", None))

    def prompt(self, c: int) -> str:
        return f"A {self.domain} image of {self.labels[c]}"

    def _condition(self, c: int | None) -> str | None:
        return self.prompt(c) if (self.conditional and c is not None) else None

    def _rng(self, tag: str) -> torch.Generator:
        from ..core.context import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.seed, self.iteration, "server", tag))

    def _fit(self, native: np.ndarray) -> np.ndarray:
        from ..generative.images import fit_to_input

        return fit_to_input(native, self.image_shape)

    def propose(self) -> Candidates:
        """This iteration's candidates (iteration 0: prior samples; later: the variations made in :meth:`receive`)."""
        if self.current is not None and self.current.iteration == self.iteration:
            return self.current
        C, N = self.num_classes, self.per_class
        if self.iteration == 0 and not self.conditional:
            z = self.gen.sample_prior(N * C, self._rng("prior"))
            native = self.gen.synthesize(z, None)
            self._pool_latents, self._pool_native = z, native
            everything = np.arange(N * C)
            self.current = Candidates(0, self._fit(native), MappingProxyType({c: everything for c in range(C)}), shared=True)
            return self.current
        if self.iteration == 0:
            for c in range(C):
                self.latents[c] = self.gen.sample_prior(N, self._rng(f"prior{c}"))
        if not self.native:  # latent back-ends render the current latents; img2img ones made images in receive()
            self.native = {c: self.gen.synthesize(self.latents[c], self._condition(c)) for c in range(C)}
        imgs = np.concatenate([self._fit(self.native[c]) for c in range(C)])
        index = {c: np.arange(c * N, (c + 1) * N) for c in range(C)}
        self.current = Candidates(self.iteration, imgs, MappingProxyType(index), shared=False)
        return self.current

    def _class_pool(self, c: int) -> tuple[torch.Tensor | None, np.ndarray]:
        """(latents, native images) of class c's current candidates."""
        cur = self.current
        assert cur is not None
        if cur.shared:
            assert self._pool_native is not None and self._pool_latents is not None
            rows = np.asarray(cur.index[c])
            return self._pool_latents[torch.as_tensor(rows)], self._pool_native[rows]
        return self.latents.get(c), self.native[c]

    def receive(self, sel: Selection) -> None:
        """Make the next candidates: per class, N variations of the selected ones (seed drawn ∝ weight)."""
        if not isinstance(sel, Selection):
            raise TypeError("the server accepts only Selection messages")
        cur = self.propose()
        if sel.iteration != cur.iteration:
            raise ValueError(f"selection for iteration {sel.iteration} arrived at iteration {cur.iteration}")
        s = strength_schedule(self.variations, self.strength0, self.strength_step, self.strength_min)
        new_latents: dict[int, torch.Tensor] = {}
        new_native: dict[int, np.ndarray] = {}
        for c in range(self.num_classes):
            pairs = sel.picks.get(c, ())
            n_c = len(cur.index[c])
            if any(i >= n_c for i, _ in pairs):
                raise ValueError(f"selection for class {c} names a candidate beyond the {n_c} sent")
            if pairs and sum(w for _, w in pairs) > 0:
                idx = np.array([i for i, _ in pairs])
                w = np.array([wt for _, wt in pairs], dtype=np.float64)
            else:
                idx, w = np.arange(n_c), np.ones(n_c)
            g = self._rng(f"seeds{c}")
            seeds = torch.multinomial(torch.as_tensor(w / w.sum()), self.per_class, replacement=True, generator=g)
            rows = idx[seeds.numpy()]
            z_c, native_c = self._class_pool(c)
            if self.image_to_image:
                new_native[c] = self.gen.img2img(native_c[rows], s, self._condition(c), self._rng(f"vary{c}"))
            else:
                assert z_c is not None
                new_latents[c] = self.gen.vary(z_c[torch.as_tensor(rows)], s, self._rng(f"vary{c}"))
        self.received.append(sel)
        self.strengths.append(s)
        self.latents, self.native = new_latents, new_native
        self.iteration += 1
        self.variations += 1
        self.current = None

    def dataset(self) -> tuple[np.ndarray, np.ndarray]:
        """The current population as a labelled dataset (N images per class).

        With a shared pool at iteration 0 (an unconditional back-end before any feedback) nothing tells the
        classes apart, so the pool is split evenly at random (a seeded permutation) among the classes.
        """
        cur = self.propose()
        C, N = self.num_classes, self.per_class
        if cur.shared:
            if self._labels_of_pool is None:
                perm = torch.randperm(N * C, generator=self._rng("split")).numpy()
                lab = np.empty(N * C, dtype=np.int64)
                lab[perm] = np.repeat(np.arange(C), N)
                self._labels_of_pool = lab
            order = np.argsort(self._labels_of_pool, kind="stable")
            return cur.images[order], self._labels_of_pool[order]
        return cur.images, np.repeat(np.arange(C, dtype=np.int64), N)
