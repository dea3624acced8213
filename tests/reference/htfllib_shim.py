"""HtFLlib (TsingZ0/HtFLlib, ``$FEDFORGE_REFERENCE_CODE/htfllib/system``) run in-process as an oracle.

What this shim does, and nothing more:

* **Isolated import.** HtFLlib's top-level packages are ``flcore`` and ``utils``, as PFLlib's are. They are imported
  with ``htfllib/system`` first on ``sys.path`` after every ``flcore*``/``utils*`` entry of ``sys.modules`` was set
  aside; afterwards HtFLlib's entries are removed again (the module objects live on here) and the set-aside entries
  and ``sys.path`` are restored, so another shim (PFLlib's) can import its own ``flcore`` in the same process.
  Only the modules below are imported: ``main.py`` is not (it imports ``calmsize`` through ``utils.mem_utils`` and
  the StyleGAN-XL/Stable-Diffusion servers, which need NVlabs' ``torch_utils`` and diffusers). **No stand-in
  modules are needed**: every module imported here imports only torch, torchvision, numpy, scikit-learn, h5py and
  the standard library at module level.
* **In-memory transport.** HtFLlib moves every object by ``torch.save``/``torch.load`` of whole ``nn.Module``
  objects under ``temp/`` (its ``save_item``/``load_item``); ``torch.load`` now defaults to ``weights_only=True``
  and refuses those files. The two functions are replaced, in every HtFLlib module that bound them, by a dict that
  stores a deep copy on save and hands out a deep copy on load (the same independence a file round trip gives).
  The last object each ``load_item`` handed out is kept in ``Session.loaded`` (FedGen's server trains a generator
  it never saves; the test reads it there).
* **fedforge's data.** ``read_client_data`` returns the samples the test registered for a client (only their
  number is used, for ``train_samples``), and ``Client.load_train_data`` returns exactly the list of batches the
  test registered, i.e. fedforge's batches in fedforge's order (HtFLlib's own loader is an unshuffled
  ``DataLoader`` with ``drop_last=True``).
* **Arguments** with HtFLlib's ``main.py`` defaults, read from its argparse calls (``main_defaults``).
* **Random draws.** :class:`DrawTape` records what fedforge's code draws from explicit torch generators;
  :func:`patched` and :class:`TapeLoader` hand those draws to HtFLlib where it calls ``np.random.choice``,
  ``torch.rand``, ``np.random.RandomState`` or a shuffling ``DataLoader``.
* **Weights.** :func:`pair_entries` pairs a fedforge model's state-dict entries with an HtFLlib model's, in
  registration order, checked by shape (and by count).
* :class:`TinyStyleGAN`: a small random StyleGAN-shaped network (``mapping``/``synthesis``/``z_dim``/``w_dim``/
  ``num_ws``), the *same* module for both codes in the FedKTL test (no pretrained generator needed).
"""
from __future__ import annotations

import ast
import copy
import importlib
import os
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pytest
import torch
import torch.nn as nn
from torch.utils.data import default_collate

REPO = Path(__file__).resolve().parents[2]

# HtFLlib modules used by the tests (the client modules come with their servers).
SERVER_MODULES = {
    "fd": "flcore.servers.serverfd", "fml": "flcore.servers.serverfml", "lgfedavg": "flcore.servers.serverlg",
    "fedgen": "flcore.servers.servergen", "fedproto": "flcore.servers.serverproto", "fedkd": "flcore.servers.serverkd",
    "fedgh": "flcore.servers.servergh", "fedtgp": "flcore.servers.servertgp", "fedmrl": "flcore.servers.servermrl",
    "fedktl": "flcore.servers.serverktl_stylegan_3",
}
BASE_MODULES = ("flcore.clients.clientbase", "flcore.servers.serverbase", "flcore.trainmodel.models")
_OWN_TOP = ("flcore", "utils")


def reference_root() -> Path:
    env = os.environ.get("FEDFORGE_REFERENCE_CODE")
    return Path(env) if env else REPO.parent / "shared" / "reference-code"


def htfllib_system() -> Path:
    return reference_root() / "htfllib" / "system"


def require_htfllib() -> Path:
    """The HtFLlib ``system`` folder; skips the test with a clear reason when it is absent."""
    root = htfllib_system()
    if not (root / "main.py").is_file() or not (root / "flcore" / "clients" / "clientbase.py").is_file():
        pytest.skip(f"HtFLlib is not at {root} (set FEDFORGE_REFERENCE_CODE to the folder holding htfllib/system)")
    return root


# ------------------------------------------------------------------------------------------ import
def _owned(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _OWN_TOP)


def import_isolated(root: Path, names: Iterable[str]) -> dict[str, Any]:
    """Import ``names`` from ``root`` with its own ``flcore``/``utils``; leaves ``sys.modules``/``sys.path`` as found."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _owned(k)}
    saved_path = list(sys.path)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        for n in names:
            importlib.import_module(n)
        return {k: m for k, m in sys.modules.items() if _owned(k)}
    finally:
        for k in [k for k in sys.modules if _owned(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = saved_path  # serverktl_* append stylegan folders relative to the working directory
        importlib.invalidate_caches()


_MODULES: dict[str, Any] | None = None


def htfllib_modules() -> dict[str, Any]:
    """HtFLlib's modules by dotted name (imported once per process)."""
    global _MODULES
    if _MODULES is None:
        _MODULES = import_isolated(require_htfllib(), [*BASE_MODULES, *SERVER_MODULES.values()])
    return _MODULES


def htfllib_module(name: str):
    """One HtFLlib module: a dotted name (``flcore.clients.clientktl``) or an algorithm key (``fedktl``)."""
    return htfllib_modules()[name if name.startswith("flcore") else SERVER_MODULES[name]]


# ---------------------------------------------------------------------------------------- arguments
def main_defaults(root: Path | None = None) -> dict[str, Any]:
    """``dest → default`` of every ``parser.add_argument`` call in HtFLlib's ``main.py``."""
    tree = ast.parse(((root or htfllib_system()) / "main.py").read_text())
    out: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            long = next(f for f in flags if f.startswith("--"))
            kw = {k.arg: k.value for k in node.keywords}
            out[long[2:].replace("-", "_")] = ast.literal_eval(kw["default"]) if "default" in kw else None
    return out


def make_args(**overrides: Any) -> SimpleNamespace:
    """An ``args`` namespace with main.py's defaults, on the CPU, overridden by ``overrides``."""
    args = SimpleNamespace(**main_defaults())
    args.device = "cpu"
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def htfl_model_string(arch: str, input_shape: Sequence[int]) -> str:
    """HtFLlib's model expression for a fedforge architecture (models.py evaluates it with ``args`` in scope)."""
    c, h, _ = input_shape
    if arch == "cnn":
        side = ((h - 4) // 2 - 4) // 2
        return f"FedAvgCNN(in_features={c}, num_classes=args.num_classes, dim={64 * side * side})"
    if arch.startswith("ht_resnet"):
        depth = int(arch[len("ht_resnet"):])
        if depth <= 10:  # HtFLlib's own resnet.py (HtFE-img-9)
            return f"resnet{depth}(num_classes=args.num_classes)"
        return f"torchvision.models.resnet{depth}(pretrained=False, num_classes=args.num_classes)"
    if arch == "ht_googlenet":
        return "torchvision.models.googlenet(pretrained=False, aux_logits=False, num_classes=args.num_classes)"
    if arch == "ht_mobilenet_v2":  # HtFLlib's own copy of torchvision's MobileNetV2
        return "mobilenet_v2(pretrained=False, num_classes=args.num_classes)"
    raise ValueError(f"no HtFLlib counterpart mapped for {arch}")


# ------------------------------------------------------------------------------------------- session
class Session:
    """HtFLlib's modules wired to an in-memory store and to the batches a test hands its clients."""

    def __init__(self) -> None:
        self.mods = htfllib_modules()
        self.store: dict[tuple[str, str], Any] = {}
        self.loaded: dict[tuple[str, str], Any] = {}
        self.samples: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.batches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for mod in self.mods.values():
            if hasattr(mod, "save_item"):
                mod.save_item = self.save_item
            if hasattr(mod, "load_item"):
                mod.load_item = self.load_item
            if hasattr(mod, "read_client_data"):
                mod.read_client_data = self.read_client_data
        session = self

        def load_train_data(client, batch_size=None):
            return list(session.batches[client.id])

        self.mods["flcore.clients.clientbase"].Client.load_train_data = load_train_data

    def module(self, name: str):
        return htfllib_module(name)

    # transport
    def save_item(self, item, role, item_name, item_path=None):
        self.store[(role, item_name)] = copy.deepcopy(item)

    def load_item(self, role, item_name, item_path=None):
        if (role, item_name) not in self.store:
            return None
        obj = copy.deepcopy(self.store[(role, item_name)])
        self.loaded[(role, item_name)] = obj
        return obj

    def get(self, role: str, item: str):
        return self.store[(role, item)]

    def put(self, role: str, item: str, value) -> None:
        self.store[(role, item)] = copy.deepcopy(value)

    # data
    def read_client_data(self, dataset, idx, is_train=True, few_shot=0):
        return list(self.samples[idx]) if is_train else []

    def set_client_data(self, cid: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.samples[cid] = list(zip(x, y))

    def set_batches(self, cid: int, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches[cid] = [(x.clone(), y.clone()) for x, y in batches]

    # servers
    def server(self, algorithm: str, cls_name: str, args: SimpleNamespace):
        """Build HtFLlib's server (and its clients) for ``algorithm``; needs every client's samples and batches."""
        return getattr(self.module(algorithm), cls_name)(args, 0)


# ---------------------------------------------------------------------------------------- weights
def pair_entries(ff: Mapping[str, torch.Tensor], ht: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(fedforge name, HtFLlib name) of two state dicts of the same architecture, in registration order.

    Raises AssertionError when the counts or any pair's shapes differ (the architectures then differ)."""
    a, b = list(ff.items()), list(ht.items())
    assert len(a) == len(b), f"fedforge has {len(a)} entries, HtFLlib {len(b)}"
    for (ka, va), (kb, vb) in zip(a, b):
        assert tuple(va.shape) == tuple(vb.shape), f"{ka} {tuple(va.shape)} vs {kb} {tuple(vb.shape)}"
    return [(ka, kb) for (ka, _), (kb, _) in zip(a, b)]


def load_pairs(module: nn.Module, ff: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, str]]) -> None:
    """Copy fedforge's entries into an HtFLlib module (in place)."""
    own = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for kf, kh in pairs:
            own[kh].copy_(ff[kf])


def as_fedforge(module: nn.Module, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """An HtFLlib module's entries under fedforge's names."""
    sd = module.state_dict()
    return {kf: sd[kh].detach().clone() for kf, kh in pairs}


def mapped(module: nn.Module, ff: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Pair ``ff`` (a fedforge state, possibly with other entries filtered out) with ``module`` and load it."""
    pairs = pair_entries(ff, module.state_dict())
    load_pairs(module, ff, pairs)
    return pairs


# ----------------------------------------------------------------------------------- random draws
class DrawTape:
    """Records the tensors fedforge's code draws from explicit generators, by function name, in call order.

    Only calls that pass ``generator=`` are recorded (fedforge never draws from the global stream)."""

    FUNCS = ("randperm", "randn", "rand", "multinomial", "randint")

    def __init__(self) -> None:
        self.draws: dict[str, list[torch.Tensor]] = defaultdict(list)

    @contextmanager
    def recording(self) -> Iterator[DrawTape]:
        originals = {f: getattr(torch, f) for f in self.FUNCS}

        def wrap(name, fn):
            def recorder(*args, **kwargs):
                out = fn(*args, **kwargs)
                if kwargs.get("generator") is not None:
                    self.draws[name].append(out.detach().clone())
                return out
            return recorder

        for f, fn in originals.items():
            setattr(torch, f, wrap(f, fn))
        try:
            yield self
        finally:
            for f, fn in originals.items():
                setattr(torch, f, fn)

    def queue(self, name: str) -> list[torch.Tensor]:
        return list(self.draws[name])

    def clear(self) -> None:
        self.draws.clear()


@contextmanager
def patched(*items: tuple[Any, str, Any]) -> Iterator[None]:
    """Set ``obj.attr = value`` for each item; restore afterwards what ``obj`` itself held (a class's staticmethod
    stays a staticmethod; an attribute that was inherited is removed again)."""
    missing = object()
    saved = [(obj, attr, vars(obj).get(attr, missing) if hasattr(obj, "__dict__") else getattr(obj, attr))
             for obj, attr, _ in items]
    for obj, attr, value in items:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            if value is missing:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)


def feeder(queue: list, transform=lambda t: t):
    """A function that ignores its arguments and returns the next queued draw (transformed); fails when empty."""
    items = list(queue)

    def next_draw(*args, **kwargs):
        assert items, "HtFLlib asked for more random draws than fedforge made"
        return transform(items.pop(0))

    next_draw.remaining = items
    return next_draw


class TapeLoader:
    """Stands in for ``DataLoader(dataset, batch_size, drop_last=..., shuffle=True)``: every pass follows the next
    permutation from ``perms`` (fedforge's draws); ``default_collate`` stacks the items as a DataLoader would."""

    def __init__(self, dataset, batch_size, perms: list[torch.Tensor], drop_last: bool = False):
        self.dataset, self.batch_size, self.perms, self.drop_last = list(dataset), int(batch_size), perms, drop_last

    def __iter__(self):
        assert self.perms, "HtFLlib shuffled more often than fedforge did"
        perm = self.perms.pop(0).tolist()
        assert sorted(perm) == list(range(len(self.dataset))), "fedforge's permutation is over another number of items"
        stop = len(perm) - len(perm) % self.batch_size if self.drop_last else len(perm)
        for s in range(0, stop, self.batch_size):
            yield default_collate([self.dataset[i] for i in perm[s:s + self.batch_size]])

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def tape_loader_factory(perms: list[torch.Tensor], unshuffled_first: int = 0, unshuffled_last: int = 0):
    """A ``DataLoader`` replacement: shuffling loaders take fedforge's permutations in order. The first
    ``unshuffled_first`` and last ``unshuffled_last`` loaders built (order-free passes such as FedKTL's centroid
    means) get the identity order instead, so they do not consume fedforge's draws."""
    queue = list(perms)
    made = {"n": 0}

    def factory(dataset, batch_size=1, shuffle=False, drop_last=False, **kwargs):
        made["n"] += 1
        if not shuffle:
            return TapeLoader(dataset, batch_size, [torch.arange(len(dataset))], drop_last)
        if made["n"] <= unshuffled_first or (unshuffled_last and not queue):
            return TapeLoader(dataset, batch_size, [torch.arange(len(dataset))], drop_last)
        return TapeLoader(dataset, batch_size, queue, drop_last)

    factory.queue = queue
    return factory


# ------------------------------------------------------------------------------------ generator
class TinyStyleGAN(nn.Module):
    """A small random network with a StyleGAN ``G_ema``'s interface: ``mapping(z, c) → W⁺`` (n, num_ws, w_dim) and
    ``synthesis(W⁺) → images`` in [−1, 1]; for tests that need a generator but no pretrained weights."""

    def __init__(self, z_dim: int = 8, w_dim: int = 16, num_ws: int = 2, resolution: int = 32, channels: int = 3,
                 seed: int = 0):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.c_dim = z_dim, w_dim, num_ws, 0
        self.img_resolution, self.img_channels = resolution, channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.map1 = nn.Linear(z_dim, w_dim)
            self.map2 = nn.Linear(w_dim, w_dim)
            self.syn = nn.Linear(w_dim, channels * resolution * resolution)

    def mapping(self, z, c=None, truncation_psi: float = 1.0, **kwargs):
        w = self.map2(torch.relu(self.map1(z.float())))
        return w.unsqueeze(1).repeat(1, self.num_ws, 1)

    def synthesis(self, ws, noise_mode: str = "const", **kwargs):
        x = torch.tanh(self.syn(ws.float().mean(1)))
        return x.view(-1, self.img_channels, self.img_resolution, self.img_resolution)


__all__ = ["DrawTape", "Session", "TapeLoader", "TinyStyleGAN", "as_fedforge", "feeder", "htfl_model_string",
           "htfllib_module", "htfllib_modules", "import_isolated", "load_pairs", "main_defaults", "make_args", "mapped", "pair_entries", "patched",
           "require_htfllib", "tape_loader_factory"]
