"""Feature shift: each client's data comes from its own domain (``--partition domains``).

A domain is either a transform of the pooled images or a part of the dataset itself:

* ``rotate:0,15,30,45``: rotation by that many degrees, counter-clockwise (Rotated MNIST); multiples of 90° on
  square images are exact (``np.rot90``), other angles are bilinear with black corners (Pillow);
* ``colour:original,invert,gray,red``: ``original``; ``invert`` (255 − x); ``gray`` (ITU-R 601 luma on every
  channel); a tint ``red``, ``green``, ``blue``, ``yellow``, ``cyan``, ``magenta``, ``orange``, ``purple`` or
  ``#rrggbb`` (luma × colour, as Colored MNIST paints its digits). A tint on 1-channel data makes the whole pool RGB
  (the one case where the pool grows, by three: the images become colour);
* ``corrupt:gaussian_noise:3,blur:3,contrast:3,jpeg:3``: the corruptions of CIFAR-10-C at severity 1..5 (``clean``:
  none); :data:`CORRUPTIONS` lists them with their parameters per severity;
* ``folder``: the dataset's own domains, a ``folder:`` dataset laid out as ``ROOT/<domain>/<class>/<image>``
  (DomainNet, Office-Caltech10, Digit-5, PACS).

Several kinds join with ``;`` (``rotate:0,90;colour:invert``). Clients take the domains round-robin (client c →
domain c mod D; ``--clients-per-domain K`` makes K·D clients). The pool is split among the domains first (stratified
by class, so that the domains differ in features, not labels; a ``folder`` dataset's samples keep their own domain),
then the samples of each domain are split among its clients by any partitioner (``--domain-label-skew``: iid by
default, or dirichlet, pathological, exdir, shards, fewshot with their usual options).

Each sample belongs to exactly one client, so it is transformed once, at set-up, by its client's domain: a pure
function of (the sample's pixels, its index in the pool, the domain, the partition's seed). The Federation then
holds one pooled array of the same size as the original (one copy is made, so a dataset shared between runs is
never changed). The partition saves the domain of each client and the spec (``partition.npz``), so a run that re-uses
the partition re-makes the same images.
"""
from __future__ import annotations

import inspect
import io
import re
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError, PartitionError
from .partition import PARTITIONERS, Partition, default_min_samples, make_partition
from .sources import Dataset

# ------------------------------------------------------------------------------------------- domains
# CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; the authors' make_cifar_c.py): one parameter per severity 1..5, on
# images scaled to [0, 1]. The implementations below are this project's own.
CORRUPTIONS: dict[str, tuple[str, tuple[float, ...]]] = {
    "gaussian_noise": ("x + N(0, σ²) per value; σ", (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": ("Poisson(x·λ)/λ per value; λ", (500, 250, 100, 75, 50)),
    "impulse_noise": ("salt-and-pepper on this share of the values (half salt); amount", (0.01, 0.02, 0.03, 0.05, 0.07)),
    "speckle_noise": ("x + x·N(0, σ²) per value; σ", (0.06, 0.10, 0.12, 0.16, 0.20)),
    "blur": ("Gaussian blur (CIFAR-10-C's gaussian_blur: nearest edges, truncated at 4σ); σ in pixels",
             (0.4, 0.6, 0.7, 0.8, 1.0)),
    "contrast": ("(x − m)·c + m, m the image's mean per channel; c", (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": ("HSV value + c (hue and saturation kept); c", (0.05, 0.10, 0.15, 0.20, 0.30)),
    "pixelate": ("box-downsample to this share of the side, box-upsample back; share", (0.95, 0.90, 0.85, 0.75, 0.65)),
    "jpeg": ("JPEG round trip through Pillow at this quality", (80, 65, 58, 50, 40)),
}
ALIASES = {"gaussian_blur": "blur", "jpeg_compression": "jpeg", "color": "colour"}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "cyan": (0, 255, 255), "magenta": (255, 0, 255), "orange": (255, 165, 0), "purple": (128, 0, 128)}
STYLES = ("original", "invert", "gray")
KINDS = ("rotate", "colour", "corrupt", "folder")
SYNTAX = ("rotate:0,90,180,270 | colour:original,invert,gray,red | corrupt:gaussian_noise:3,blur:3,contrast:3,jpeg:3 "
          "| folder, several kinds joined with ';'")


@dataclass(frozen=True)
class Domain:
    """One domain: ``name`` (unique in a run, safe as a metric key), ``kind`` (rotate, colour, corrupt, folder),
    ``arg`` (the angle, style or corruption; the folder's name) and ``severity`` (1..5 for corruptions)."""

    name: str
    kind: str
    arg: str
    severity: int = 0

    @property
    def identity(self) -> bool:
        """Whether the domain leaves the images as they are."""
        return (self.kind == "folder" or (self.kind == "rotate" and float(self.arg) % 360 == 0)
                or (self.kind == "colour" and self.arg == "original") or (self.kind == "corrupt" and self.arg == "clean"))

    @property
    def tint(self) -> tuple[int, int, int] | None:
        return _colour(self.arg) if self.kind == "colour" and self.arg not in STYLES else None


def _bad(spec: str, why: str) -> ConfigError:
    return ConfigError(f"--domains '{spec}': {why}; write it as {SYNTAX} (see docs/scenarios.md).")


def _colour(arg: str) -> tuple[int, int, int] | None:
    if arg in COLOURS:
        return COLOURS[arg]
    m = re.fullmatch(r"#?([0-9a-fA-F]{6})", arg)
    if m:
        v = int(m.group(1), 16)
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    return None


def _angle_name(a: float) -> str:
    return f"rot{int(a)}" if float(a).is_integer() else f"rot{a:g}"


def parse_domains(spec: str) -> list[Domain]:
    """The domains of a ``--domains`` spec, in order (see the module docstring for the syntax)."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "it is empty")
    out: list[Domain] = []
    for group in (g.strip() for g in spec.split(";")):
        if not group:
            continue
        kind, _, rest = group.partition(":")
        kind = ALIASES.get(kind.strip().lower(), kind.strip().lower())
        items = [t.strip() for t in rest.split(",") if t.strip()] if rest else []
        if kind == "folder":
            if items:
                raise _bad(spec, "'folder' takes no list: the domains are the dataset's sub-folders")
            out.append(Domain("folder", "folder", ""))
            continue
        if kind not in KINDS:
            raise _bad(spec, f"unknown kind '{kind}' (one of {', '.join(KINDS)})")
        if not items:
            raise _bad(spec, f"'{kind}' needs a list of domains")
        for item in items:
            if kind == "rotate":
                try:
                    a = float(item)
                except ValueError:
                    raise _bad(spec, f"rotation '{item}' is not a number of degrees") from None
                if not np.isfinite(a):
                    raise _bad(spec, f"rotation '{item}' is not a finite number of degrees")
                out.append(Domain(_angle_name(a), "rotate", f"{a:g}"))
            elif kind == "colour":
                style = item.lower()
                if style not in STYLES and _colour(style) is None:
                    raise _bad(spec, f"colour '{item}' is none of {', '.join(STYLES + tuple(COLOURS))} or #rrggbb")
                out.append(Domain(style.lstrip("#") if style.startswith("#") else style, "colour", style))
            else:
                name, _, sev = item.partition(":")
                name = ALIASES.get(name.strip().lower(), name.strip().lower())
                if name == "clean":
                    out.append(Domain("clean", "corrupt", "clean"))
                    continue
                if name not in CORRUPTIONS:
                    raise _bad(spec, f"unknown corruption '{name}' (one of clean, {', '.join(CORRUPTIONS)})")
                if not sev.strip().isdigit() or not 1 <= int(sev) <= 5:
                    raise _bad(spec, f"corruption '{item}' needs a severity 1..5, as in {name}:3")
                out.append(Domain(f"{name}_s{int(sev)}", "corrupt", name, int(sev)))
    if not out:
        raise _bad(spec, "it names no domain")
    if any(d.kind == "folder" for d in out) and len(out) > 1:
        raise _bad(spec, "'folder' takes the dataset's own domains and cannot be joined with others")
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _bad(spec, f"domain {dup[0]} appears twice")
    return out


# ----------------------------------------------------------------------------------------- randomness
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wraps modulo 2**64)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniforms(key: int, idx: np.ndarray, shape: tuple[int, ...], stream: int) -> np.ndarray:
    """Uniform draws in (0, 1) of shape (len(idx), *shape), a pure function of (key, sample index, position,
    stream): a counter-based generator, so a sample's noise never depends on which other samples share its domain."""
    m = int(np.prod(shape))
    with np.errstate(over="ignore"):
        k = _mix(np.full(len(idx), key % 2**64, dtype=np.uint64) ^ _mix(idx.astype(np.uint64) * _GOLDEN + np.uint64(1)))
        pos = (np.arange(m, dtype=np.uint64) * np.uint64(4) + np.uint64(stream)) * _GOLDEN
        z = _mix(k[:, None] + pos[None, :])
    return (((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53).reshape(len(idx), *shape)


def _normals(key: int, idx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal draws (Box–Muller on two uniform streams)."""
    u1, u2 = _uniforms(key, idx, shape, 0), _uniforms(key, idx, shape, 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def domain_key(seed: int, domain: Domain) -> int:
    """The noise key of a domain under a seed (stable across processes and machines)."""
    code = zlib.crc32(f"{domain.kind}:{domain.arg}".encode())
    return int(_mix(np.array([(int(seed) * 0x100000001B3 + code * 31 + domain.severity) % 2**64], dtype=np.uint64))[0])


# ----------------------------------------------------------------------------------------- transforms
def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8, rounded to the nearest level (CIFAR-10-C truncates with np.uint8)."""
    return np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (Pillow's 'L' conversion weights) of uint8 NHWC images, as float in [0, 255], shape NHW1."""
    if x.shape[3] == 1:
        return x.astype(np.float64)
    return (x[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None]


def _pil_each(x: np.ndarray, fn: Callable) -> np.ndarray:
    """Apply ``fn(PIL image) -> PIL image`` to every image of a uint8 NHWC block."""
    from PIL import Image

    out = np.empty_like(x)
    gray = x.shape[3] == 1
    for i in range(len(x)):
        im = Image.fromarray(x[i, ..., 0] if gray else x[i], mode="L" if gray else "RGB")
        a = np.asarray(fn(im), dtype=np.uint8)
        out[i] = a[..., None] if gray else a
    return out


def _rotate(x: np.ndarray, angle: float) -> np.ndarray:
    a = angle % 360
    square = x.shape[1] == x.shape[2]
    if a % 90 == 0 and (square or a % 180 == 0):
        return np.ascontiguousarray(np.rot90(x, k=int(a // 90), axes=(1, 2)))
    from PIL import Image

    return _pil_each(x, lambda im: im.rotate(a, resample=Image.BILINEAR, fillcolor=0))


def _recolour(x: np.ndarray, d: Domain) -> np.ndarray:
    if d.arg == "invert":
        return 255 - x
    luma = _luma(x)
    if d.arg == "gray":
        return np.repeat(np.clip(np.rint(luma), 0, 255).astype(np.uint8), x.shape[3], axis=3)
    tint = np.array(d.tint, dtype=np.float64) / 255.0
    if x.shape[3] != 3:
        raise ConfigError(f"colour tint '{d.arg}' needs 3-channel images; apply it through apply_domains, which makes "
                          f"1-channel data RGB first.")
    return np.clip(np.rint(luma * tint), 0, 255).astype(np.uint8)


def _corrupt(x: np.ndarray, idx: np.ndarray, d: Domain, seed: int) -> np.ndarray:
    c = CORRUPTIONS[d.arg][1][d.severity - 1]
    key = domain_key(seed, d)
    if d.arg == "jpeg":
        def jpeg(im):
            from PIL import Image

            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(c))
            buf.seek(0)
            with Image.open(buf) as out:
                return out.convert(im.mode)

        return _pil_each(x, jpeg)
    if d.arg == "pixelate":
        from PIL import Image

        h, w = x.shape[1:3]
        small = (max(1, int(w * c)), max(1, int(h * c)))
        return _pil_each(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))
    f = x.astype(np.float64) / 255.0
    shape = f.shape[1:]
    if d.arg == "gaussian_noise":
        f = f + c * _normals(key, idx, shape)
    elif d.arg == "speckle_noise":
        f = f + f * c * _normals(key, idx, shape)
    elif d.arg == "shot_noise":  # Poisson draws from a generator keyed by (domain key, sample index): pure per sample
        f = np.stack([np.random.Generator(np.random.Philox(key=np.array([key, i], dtype=np.uint64))).poisson(fi * c)
                      for i, fi in zip(idx.tolist(), f)]) / c
    elif d.arg == "impulse_noise":
        hit = _uniforms(key, idx, shape, 2) < c
        salt = _uniforms(key, idx, shape, 3) < 0.5
        f = np.where(hit, np.where(salt, 1.0, 0.0), f)
    elif d.arg == "blur":
        from scipy.ndimage import gaussian_filter

        f = gaussian_filter(f, sigma=(0, c, c, 0), mode="nearest", truncate=4.0)
    elif d.arg == "contrast":
        m = f.mean(axis=(1, 2), keepdims=True)
        f = (f - m) * c + m
    elif d.arg == "brightness":
        v = f.max(axis=3, keepdims=True)  # HSV value; RGB is linear in it for a fixed hue and saturation
        v2 = np.clip(v + c, 0.0, 1.0)
        f = np.where(v > 0, f * np.divide(v2, v, out=np.ones_like(v), where=v > 0), v2)
    else:  # pragma: no cover - parse_domains admits only CORRUPTIONS
        raise ConfigError(f"unknown corruption {d.arg}")
    return _to_uint8(f)


def transform_images(x: np.ndarray, idx: np.ndarray, domain: Domain, seed: int) -> np.ndarray:
    """The images ``x`` (uint8 NHWC; their indices ``idx`` in the pool) as they look in ``domain``: a pure function
    of (pixels, index, domain, seed). Returns a new array of the same shape."""
    x = np.asarray(x)
    idx = np.asarray(idx, dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or len(idx) != len(x):
        raise ValueError("transform_images takes uint8 NHWC images and one pool index per image")
    if domain.identity or len(x) == 0:
        return x.copy()
    if domain.kind == "rotate":
        return _rotate(x, float(domain.arg))
    if domain.kind == "colour":
        return _recolour(x, domain)
    return _corrupt(x, idx, domain, seed)


# ----------------------------------------------------------------------------------------- partition
@PARTITIONERS.register("domains")
def domains(labels: np.ndarray, num_clients: int, num_classes: int, rng: np.random.Generator, *,
            num_domains: int = 1, sample_domains: np.ndarray | None = None, within: str = "iid",
            domain_names: Sequence[str] | None = None, **within_params: Any) -> list[Any]:
    """Feature shift: client c gets domain c mod D, then a partitioner within each domain (--domains, docs/scenarios.md).

    ``sample_domains`` gives each sample's domain (a dataset made of domains); without it the pool is split among
    the ``num_domains`` domains at random, stratified by class. ``within`` partitions each domain's samples among
    its clients (any registered partitioner, with ``within_params``).
    """
    if within == "domains":
        raise PartitionError("--domain-label-skew cannot be 'domains'; give a label partitioner such as iid or dirichlet.")
    fn = PARTITIONERS.get(within)
    if num_domains < 1:
        raise PartitionError(f"the number of domains must be at least 1, got {num_domains}.")
    if num_clients < num_domains:
        raise PartitionError(f"{num_domains} domains need at least one client each; use --clients {num_domains} or more "
                             f"(or --clients-per-domain).")
    if sample_domains is None:
        sample_domains = np.empty(len(labels), dtype=np.int64)
        for c in range(num_classes):
            members = rng.permutation(np.flatnonzero(labels == c))
            for d, part in zip(rng.permutation(num_domains), np.array_split(members, num_domains)):
                sample_domains[part] = d
    sample_domains = np.asarray(sample_domains, dtype=np.int64)
    accepted = set(inspect.signature(fn).parameters)
    kwargs = {k: v for k, v in within_params.items() if k in accepted}
    shares: list[Any] = [None] * num_clients
    for d in range(num_domains):
        members = np.flatnonzero(sample_domains == d)
        clients = list(range(d, num_clients, num_domains))
        try:
            parts = fn(labels[members], len(clients), num_classes, rng, **kwargs)
        except PartitionError as e:
            name = domain_names[d] if domain_names is not None else d
            raise PartitionError(f"domain {name} ({len(members)} samples, {len(clients)} clients): {e}") from None
        for cid, part in zip(clients, parts):
            shares[cid] = (tuple(members[np.asarray(p, dtype=np.int64)] for p in part) if isinstance(part, tuple)
                           else members[np.asarray(part, dtype=np.int64)])
    return shares


def make_domain_partition(ds: Dataset, spec: str | None, num_clients: int, seed: int, *,
                          clients_per_domain: int | None = None, within: str = "iid", train_ratio: float = 0.75,
                          batch_size: int = 10, **within_params: Any) -> Partition:
    """A feature-shift partition of ``ds``: the domains of ``spec`` (``None``: the dataset's own, when it has them),
    assigned round-robin to ``num_clients`` clients (``clients_per_domain`` K: K·D clients instead), each domain's
    samples split among its clients by the partitioner ``within`` with those of ``within_params`` it takes
    (``min_samples`` None: PFLlib's rule for ``batch_size``); the domain of each client is kept in
    ``Partition.domains`` and the spec in ``Partition.params['domains']``."""
    if ds.client_split is not None:
        raise PartitionError(f"{ds.name} ships its own client split; --partition domains needs a pooled dataset.")
    if spec is None:
        if ds.domain_names is None:
            raise ConfigError(f"--partition domains needs --domains ({SYNTAX}); {ds.name} has no domains of its own.")
        spec = "folder"
    doms = parse_domains(spec)
    sample_domains = None
    if doms[0].kind == "folder":
        if ds.domain is None or ds.domain_names is None:
            raise PartitionError(f"--domains folder takes the domains of a folder: dataset laid out as "
                                 f"ROOT/<domain>/<class>/<image>; {ds.name} is not one.")
        names = list(ds.domain_names)
        sample_domains = ds.domain
    else:
        if ds.domain_names is not None:
            raise PartitionError(f"{ds.name} is made of domains ({', '.join(ds.domain_names)}); use --domains folder "
                                 f"(or leave --domains out) to give each client one of them.")
        if getattr(ds, "modality", "image") != "image":
            raise PartitionError(f"--domains {spec} transforms images, but {ds.name} holds {ds.modality} data; give it "
                                 f"an image dataset, or a folder: dataset of domains with --domains folder.")
        names = [d.name for d in doms]
    n = clients_per_domain * len(names) if clients_per_domain else num_clients
    if within == "domains" or within not in PARTITIONERS:
        raise ConfigError(f"--domain-label-skew '{within}' is not a label partitioner; use iid, dirichlet, pathological, "
                          f"exdir, shards or fewshot.")
    accepted = set(inspect.signature(PARTITIONERS.get(within)).parameters)
    within_params = {k: v for k, v in within_params.items() if k in accepted}
    if "min_samples" in accepted and within_params.get("min_samples") is None:
        within_params["min_samples"] = default_min_samples(len(ds.y), n, batch_size, train_ratio)
    if n > len(ds.y):
        raise PartitionError(f"{n} clients cannot share the {len(ds.y)} samples of {ds.name}; use at most {len(ds.y)}.")
    part = make_partition(ds.y, ds.num_classes, "domains", n, seed, train_ratio=train_ratio, num_domains=len(names),
                          sample_domains=sample_domains, within=within, domain_names=names, **within_params)
    part.params = {"domains": spec, "within": within, **{k: v for k, v in part.params.items() if k not in
                                                         ("sample_domains", "num_domains", "within", "domain_names")}}
    part.domains = [names[c % len(names)] for c in range(n)]
    return part


def domain_groups(part: Partition, clients: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Domain name → its clients (among ``clients``, all by default), in the order the domains first appear."""
    if not part.domains:
        return {}
    keep = range(part.num_clients) if clients is None else clients
    out: dict[str, list[int]] = {}
    for c in keep:
        out.setdefault(part.domains[c], []).append(int(c))
    return out


def apply_domains(ds: Dataset, part: Partition) -> Dataset:
    """``ds`` with every client's samples (train and test) transformed by the client's domain, once.

    Returns ``ds`` itself when no domain changes the images (no domains, ``folder``, identity domains); otherwise a
    new Dataset holding one new pooled array (RGB when a tint meets 1-channel data; normalisation constants kept,
    repeated per channel in that case)."""
    if not part.domains:
        return ds
    spec = part.params.get("domains")
    if not isinstance(spec, str):
        raise PartitionError("the partition names client domains but not their spec; it is corrupt, make a new one.")
    doms = {d.name: d for d in parse_domains(spec)}
    if any(d.kind == "folder" for d in doms.values()):
        return ds
    unknown = sorted(set(part.domains) - set(doms))
    if unknown:
        raise PartitionError(f"the partition gives clients domain '{unknown[0]}', which its spec '{spec}' does not name; "
                             f"it is corrupt, make a new one.")
    used = {n: doms[n] for n in dict.fromkeys(part.domains)}
    if all(d.identity for d in used.values()):
        return ds
    x, mean, std = ds.x, ds.mean, ds.std
    if x.shape[3] == 1 and any(d.tint is not None for d in used.values()):
        x = np.repeat(x, 3, axis=3)  # the images become colour
        mean, std = tuple(mean) * 3, tuple(std) * 3
    else:
        x = x.copy()
    chunk = 1024
    for name, cids in domain_groups(part).items():
        d = used[name]
        if d.identity:
            continue
        idx = np.sort(np.concatenate([np.concatenate([part.train[c], part.test[c]]) for c in cids]).astype(np.int64))
        for s in range(0, len(idx), chunk):
            block = idx[s : s + chunk]
            x[block] = transform_images(x[block], block, d, part.seed)
    return replace(ds, x=x, mean=mean, std=std, meta={**ds.meta, "domains": spec})
