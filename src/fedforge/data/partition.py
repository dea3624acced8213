"""Partitions: pure functions of (labels, config, seed) → per-client index lists.

Every partitioner is registered by name and called as ``fn(labels, num_clients, num_classes, rng, **params)``;
:func:`make_partition` then splits each client's share into its own train and test part.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .._io import atomic_open
from ..errors import PartitionError
from ..registry import Registry

PARTITIONERS: Registry[Callable[..., list[np.ndarray]]] = Registry("partitioner", "see `fedforge list partitioners`",
                                                                 populate="fedforge.data.domains")


# ---------------------------------------------------------------------------------------- helpers
def _check_feasible(n_samples: int, num_clients: int, min_samples: int) -> None:
    if num_clients < 1:
        raise PartitionError("the number of clients must be at least 1.")
    if n_samples < num_clients:
        raise PartitionError(f"{num_clients} clients cannot share {n_samples} samples; use at most {n_samples} clients.")
    if n_samples < num_clients * min_samples:
        raise PartitionError(
            f"{n_samples} samples cannot give each of the {num_clients} clients {min_samples} samples; "
            f"lower --clients or --min-samples (at most {n_samples // num_clients} per client here).")


def _assign_classes(num_clients: int, num_classes: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """k distinct classes per client, every class held by ⌊nk/C⌋ or ⌈nk/C⌉ clients (when nk ≥ C)."""
    if not 1 <= k <= num_classes:
        raise PartitionError(f"classes per client must be between 1 and {num_classes}, got {k}.")
    perm = rng.permutation(num_classes)
    order = rng.permutation(num_clients)
    out: list[np.ndarray] = [None] * num_clients  # type: ignore[list-item]
    for slot, cid in enumerate(order):
        out[cid] = np.sort(perm[(slot * k + np.arange(k)) % num_classes])
    return out


def _repair(counts: np.ndarray, min_samples: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Move samples from the largest clients to those below ``min_samples`` (bounded: each move lowers the deficit).

    ``counts`` is (clients, classes); ``allowed[i, c]`` says whether client i may receive class c.
    """
    counts = counts.copy()
    n = counts.shape[0]
    for _ in range(n * max(min_samples, 1) + 1):
        sizes = counts.sum(1)
        needy = np.flatnonzero(sizes < min_samples)
        if len(needy) == 0:
            return counts
        i = needy[np.argmin(sizes[needy])]
        need = min_samples - sizes[i]
        classes = np.arange(counts.shape[1]) if allowed is None else np.flatnonzero(allowed[i])
        # donor: the client with the largest surplus that holds one of the receivable classes
        surplus = sizes - min_samples
        best = None
        for c in classes:
            holders = np.flatnonzero((counts[:, c] > 0) & (surplus > 0))
            holders = holders[holders != i]
            if len(holders) == 0:
                continue
            j = holders[np.argmax(np.minimum(counts[holders, c], surplus[holders]))]
            amount = min(counts[j, c], surplus[j], need)
            if best is None or amount > best[2]:
                best = (j, c, amount)
        if best is None or best[2] <= 0:
            raise PartitionError(
                f"cannot give client {i} the minimum of {min_samples} samples from the classes it may hold; "
                f"lower --min-samples or --clients, or raise --alpha / --classes-per-client.")
        j, c, amount = best
        counts[j, c] -= amount
        counts[i, c] += amount
    raise PartitionError("could not reach the minimum samples per client; lower --min-samples.")


def _counts_to_indices(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Turn a (clients, classes) count matrix into index lists (samples of each class shuffled once)."""
    n, k = counts.shape
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
        assert bounds[-1] <= len(idx)
        for i in range(n):
            if counts[i, c]:
                parts[i].append(idx[bounds[i] : bounds[i + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _split_counts(total: int, props: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``props`` (largest remainder)."""
    props = np.asarray(props, dtype=np.float64)
    props = props / props.sum()
    raw = props * total
    base = np.floor(raw).astype(np.int64)
    rest = total - base.sum()
    if rest:
        base[np.argsort(-(raw - base), kind="stable")[:rest]] += 1
    return base


def _class_totals(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes)


# ------------------------------------------------------------------------------------ partitioners
@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, num_classes: int, rng: np.random.Generator, *, min_samples: int = 1) -> list[np.ndarray]:
    """Uniformly random, equal-sized shares."""
    _check_feasible(len(labels), num_clients, min_samples)
    perm = rng.permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


@PARTITIONERS.register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, num_classes: int, rng: np.random.Generator, *,
              alpha: float = 0.1, min_samples: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Per class, shares over clients ~ Dirichlet(alpha); a bounded repair reaches the minimum per client.

    Like PFLlib, a class stops going to clients that already hold N/n samples. Unlike PFLlib's unbounded
    retry loop, at most ``max_tries`` draws are made; if none gives every client ``min_samples``, the best draw
    is repaired by moving samples from the largest clients (so it always ends).
    """
    if not alpha > 0:
        raise PartitionError(f"Dirichlet alpha must be > 0, got {alpha}.")
    _check_feasible(len(labels), num_clients, min_samples)
    totals = _class_totals(labels, num_classes)
    cap = len(labels) / num_clients
    best, best_deficit = None, None
    for _ in range(max(1, max_tries)):
        counts = np.zeros((num_clients, num_classes), dtype=np.int64)
        for c in rng.permutation(num_classes):
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (counts.sum(1) < cap)
            if p.sum() <= 0:
                p = np.ones(num_clients)
            counts[:, c] = _split_counts(int(totals[c]), p)
        deficit = np.clip(min_samples - counts.sum(1), 0, None).sum()
        if best_deficit is None or deficit < best_deficit:
            best, best_deficit = counts, deficit
        if deficit == 0:
            break
    counts = _repair(best, min_samples)
    return _counts_to_indices(labels, counts, rng)


@PARTITIONERS.register("pathological")
def pathological(labels: np.ndarray, num_clients: int, num_classes: int, rng: np.random.Generator, *,
                 classes_per_client: int = 2, balance: bool = True, min_samples: int = 1) -> list[np.ndarray]:
    """k classes per client, assigned at random so that every class has about nk/C holders.

    Each class's samples are split among its holders equally (``balance``) or in random proportions
    drawn uniformly from [0.1, 1].
    """
    _check_feasible(len(labels), num_clients, min_samples)
    held = _assign_classes(num_clients, num_classes, classes_per_client, rng)
    totals = _class_totals(labels, num_classes)
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    for c in range(num_classes):
        holders = [i for i in range(num_clients) if c in held[i]]
        if not holders:
            continue
        props = np.ones(len(holders)) if balance else rng.uniform(0.1, 1.0, len(holders))
        counts[holders, c] = _split_counts(int(totals[c]), props)
    short = np.flatnonzero(counts.sum(1) < min_samples)
    if len(short):
        raise PartitionError(
            f"with {classes_per_client} classes per client, client {short[0]} gets only {counts[short[0]].sum()} samples "
            f"(minimum {min_samples}); use fewer clients, more classes per client, or a lower --min-samples.")
    return _counts_to_indices(labels, counts, rng)


@PARTITIONERS.register("exdir")
def exdir(labels: np.ndarray, num_clients: int, num_classes: int, rng: np.random.Generator, *,
          classes_per_client: int = 2, alpha: float = 100.0, min_samples: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Extended Dirichlet (Li et al., 2023): k labels per client, then Dirichlet(alpha) among each label's holders."""
    if not alpha > 0:
        raise PartitionError(f"Dirichlet alpha must be > 0, got {alpha}.")
    _check_feasible(len(labels), num_clients, min_samples)
    held = _assign_classes(num_clients, num_classes, classes_per_client, rng)
    allowed = np.zeros((num_clients, num_classes), dtype=bool)
    for i, cs in enumerate(held):
        allowed[i, cs] = True
    totals = _class_totals(labels, num_classes)
    best, best_deficit = None, None
    for _ in range(max(1, max_tries)):
        counts = np.zeros((num_clients, num_classes), dtype=np.int64)
        for c in range(num_classes):
            holders = np.flatnonzero(allowed[:, c])
            if len(holders):
                counts[holders, c] = _split_counts(int(totals[c]), rng.dirichlet(np.full(len(holders), alpha)))
        deficit = np.clip(min_samples - counts.sum(1), 0, None).sum()
        if best_deficit is None or deficit < best_deficit:
            best, best_deficit = counts, deficit
        if deficit == 0:
            break
    counts = _repair(best, min_samples, allowed)
    return _counts_to_indices(labels, counts, rng)


@PARTITIONERS.register("shards")
def shards(labels: np.ndarray, num_clients: int, num_classes: int, rng: np.random.Generator, *,
           shards_per_client: int = 2, min_samples: int = 1) -> list[np.ndarray]:
    """McMahan et al. (2017): sort by label, cut into n·s equal shards, give each client s random shards."""
    if shards_per_client < 1:
        raise PartitionError(f"shards per client must be at least 1, got {shards_per_client}.")
    _check_feasible(len(labels), num_clients * shards_per_client, 1)
    _check_feasible(len(labels), num_clients, min_samples)
    order = np.lexsort((rng.random(len(labels)), labels))
    pieces = np.array_split(order, num_clients * shards_per_client)
    assign = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[j] for j in row])) for row in assign]


@PARTITIONERS.register("fewshot")
def fewshot(labels: np.ndarray, num_clients: int, num_classes: int, rng: np.random.Generator, *,
            shots: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-shot clients: each client trains on `shots` samples of every class; the rest is their test data.

    Training samples are disjoint across clients; the remaining samples of each class are split evenly among
    the clients as test data. Returns (train, test) pairs, so --train-ratio does not apply.
    """
    if shots < 1:
        raise PartitionError(f"fewshot needs at least 1 shot per class, got {shots}.")
    totals = _class_totals(labels, num_classes)
    need = shots * num_clients
    short = [c for c in range(num_classes) if 0 < totals[c] < need]
    if short:
        c = short[0]
        raise PartitionError(f"class {c} has {totals[c]} samples, fewer than {shots} shots for each of {num_clients} clients; "
                             f"lower --shots or --clients.")
    train: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) == 0:
            continue
        for i in range(num_clients):
            train[i].append(idx[i * shots : (i + 1) * shots])
        for i, part in enumerate(np.array_split(idx[need:], num_clients)):
            test[i].append(part)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return [(cat(tr), cat(te)) for tr, te in zip(train, test)]


# ------------------------------------------------------------------------------ train/test and IO
def split_train_test(idx: np.ndarray, labels: np.ndarray, train_ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of one client's indices (largest-remainder per class; at least one sample each side)."""
    n = len(idx)
    if n == 0:
        return idx, idx
    n_test = int(round(n * (1.0 - train_ratio)))
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    else:
        n_test = 0
    y = labels[idx]
    classes, inv = np.unique(y, return_inverse=True)
    per_class = np.bincount(inv)
    raw = per_class * (n_test / n)
    take = np.floor(raw).astype(np.int64)
    rest = n_test - take.sum()
    if rest > 0:
        frac = raw - take
        frac[take >= per_class] = -1
        take[np.argsort(-frac, kind="stable")[:rest]] += 1
    test, train = [], []
    for j in range(len(classes)):
        members = rng.permutation(idx[inv == j])
        test.append(members[: take[j]])
        train.append(members[take[j]:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def labels_fingerprint(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass
class Partition:
    """Per-client train and test index arrays into a pooled dataset."""

    train: list[np.ndarray]
    test: list[np.ndarray]
    scheme: str
    params: dict = field(default_factory=dict)
    seed: int = 0
    fingerprint: str = ""
    # feature shift (``--partition domains``, :mod:`fedforge.data.domains`): the domain name of each client
    domains: list[str] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def counts(self, labels: np.ndarray, num_classes: int, part: str = "train") -> np.ndarray:
        lists = self.train if part == "train" else self.test
        return np.stack([np.bincount(labels[i], minlength=num_classes) for i in lists]) if lists else np.zeros((0, num_classes), np.int64)

    def stats(self, labels: np.ndarray, num_classes: int) -> dict:
        tr, te = self.counts(labels, num_classes, "train"), self.counts(labels, num_classes, "test")
        sizes = tr.sum(1) + te.sum(1)
        return {
            "scheme": self.scheme, "params": self.params, "seed": self.seed, "num_clients": self.num_clients,
            "num_classes": num_classes, "samples": int(sizes.sum()),
            "samples_per_client": {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean()),
                                   "std": float(sizes.std())},
            "classes_per_client": {"min": int(((tr + te) > 0).sum(1).min()), "max": int(((tr + te) > 0).sum(1).max())},
            "train_counts": tr.tolist(), "test_counts": te.tolist(),
            **({"domains": self.domain_stats()} if self.domains else {}),
        }

    def domain_stats(self) -> dict:
        """The domains of a feature-shift partition: the spec, each client's domain, the clients of each domain."""
        names = list(dict.fromkeys(self.domains or []))
        return {"spec": self.params.get("domains"), "client_domains": list(self.domains or []),
                "clients_per_domain": {d: [i for i, x in enumerate(self.domains or []) if x == d] for d in names}}

    def check(self, labels: np.ndarray) -> None:
        n = len(labels)
        seen = np.zeros(n, dtype=np.int64)
        for part in (self.train, self.test):
            for idx in part:
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    raise PartitionError(f"the partition refers to sample {int(idx.max())}, but the dataset has {n}; it belongs to another dataset.")
                np.add.at(seen, idx, 1)
        if (seen > 1).any():
            raise PartitionError("the partition uses some samples more than once; it is corrupt.")
        if self.fingerprint and self.fingerprint != labels_fingerprint(labels):
            raise PartitionError("the partition was made for a dataset with other labels; make a new one for this dataset.")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        arrays = {f"train_{i}": a.astype(np.int64) for i, a in enumerate(self.train)}
        arrays |= {f"test_{i}": a.astype(np.int64) for i, a in enumerate(self.test)}
        meta = {"scheme": self.scheme, "params": self.params, "seed": self.seed, "num_clients": self.num_clients,
                "fingerprint": self.fingerprint, **({"domains": list(self.domains)} if self.domains else {})}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_open(path, hidden=False) as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Partition:
        path = Path(path)
        if path.is_dir():
            path = path / "partition.npz"
        if not path.is_file():
            raise PartitionError(f"partition file {path} does not exist; give a partition.npz or a run directory that has one.")
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(bytes(f["meta"]).decode())
                n = meta["num_clients"]
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise ValueError("num_clients must be a positive integer")
                train = [f[f"train_{i}"] for i in range(n)]
                test = [f[f"test_{i}"] for i in range(n)]
                seed = int(meta.get("seed", 0))
                scheme, params, fingerprint = meta.get("scheme", "file"), meta.get("params", {}), meta.get("fingerprint", "")
                if not isinstance(scheme, str) or not isinstance(params, dict) or not isinstance(fingerprint, str):
                    raise ValueError("malformed metadata")
                domains = meta.get("domains")
                if domains is not None and (not isinstance(domains, list) or len(domains) != n
                                            or not all(isinstance(d, str) for d in domains)):
                    raise ValueError("malformed domains")
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError,
                TypeError, AttributeError, IndexError, RecursionError) as e:
            raise PartitionError(f"partition file {path} is corrupt or not a fedforge partition ({type(e).__name__}).") from None
        for a in train + test:
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise PartitionError(f"partition file {path} holds a non-index array; it is corrupt.")
        return cls(train, test, scheme, params, seed, fingerprint, domains)


def default_min_samples(n_samples: int, num_clients: int, batch_size: int, train_ratio: float) -> int:
    """PFLlib's rule: enough for one training batch after the split, but never more than half a fair share."""
    return max(2, int(min(batch_size / max(1e-9, 1.0 - train_ratio), n_samples / num_clients / 2)))


def make_partition(labels: np.ndarray, num_classes: int, scheme: str, num_clients: int, seed: int, *,
                   train_ratio: float = 0.75, **params) -> Partition:
    """Partition pooled labels over clients with a registered scheme, then split each client 75/25 (stratified)."""
    fn = PARTITIONERS.get(scheme)
    if not 0.0 < train_ratio < 1.0:
        raise PartitionError(f"train_ratio must lie in (0, 1), got {train_ratio}.")
    rng = np.random.default_rng([seed, 0x9A27])
    try:
        shares = fn(labels, num_clients, num_classes, rng, **params)
    except TypeError as e:
        raise PartitionError(f"partitioner '{scheme}' got an unsupported option ({e}).") from None
    train, test = [], []
    for idx in shares:
        if isinstance(idx, tuple):  # the partitioner fixed this client's own train/test split (e.g. fewshot)
            tr, te = (np.sort(np.asarray(a, dtype=np.int64)) for a in idx)
        else:
            tr, te = split_train_test(np.asarray(idx, dtype=np.int64), labels, train_ratio, rng)
        train.append(tr)
        test.append(te)
    return Partition(train, test, scheme, dict(params, train_ratio=train_ratio), seed, labels_fingerprint(labels))


def from_client_split(split: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, scheme: str = "natural") -> Partition:
    """A partition that uses a dataset's own client split as-is."""
    return Partition([np.asarray(a, np.int64) for a, _ in split], [np.asarray(b, np.int64) for _, b in split], scheme,
                     {}, 0, labels_fingerprint(labels))


def plot_heatmap(stats: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Heat-map of samples per client (rows) per class (columns), train + test, with whole-number ticks and a
    title that fits the figure (wrapped to its width)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(stats["train_counts"]) + np.asarray(stats["test_counts"])
    n, k = counts.shape
    width, height = min(16, 3 + 0.25 * k), min(16, 2 + 0.25 * n)
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(np.log1p(counts), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    for axis, size in ((ax.xaxis, k), (ax.yaxis, n)):  # clients and classes are whole numbers
        if size <= 30:
            axis.set_ticks(range(size))
        else:
            axis.set_major_locator(MaxNLocator(integer=True, nbins="auto"))
    domains = (stats.get("domains") or {}).get("client_domains")
    if domains and n <= 30:  # feature shift: each client's domain beside its number
        ax.set_yticklabels([f"{i} · {d}" for i, d in enumerate(domains)])
        ax.set_ylabel("client · domain")
    ax.tick_params(labelsize=7 if max(n, k) > 20 else 9)
    params = ", ".join(f"{key} {v}" for key, v in (stats.get("params") or {}).items() if not isinstance(v, (list, dict)))
    text = title or (f"{stats['scheme']} partition{f' ({params})' if params else ''}: samples per client and class "
                     f"(colour: log scale)")
    ax.set_title("\n".join(textwrap.wrap(text, max(20, int(width * 9)))), fontsize=10)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log(1 + samples)")
    if k <= 20 and n <= 30:
        for i in range(n):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6, color="w")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
