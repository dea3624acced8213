"""FedKTL — Zhang et al., "An Upload-Efficient Scheme for Transferring Knowledge From a Server-Side Pre-trained
Generator to Clients in Heterogeneous Federated Learning", CVPR 2024.

A pretrained generator G on the server lends knowledge to small (possibly heterogeneous) client models; clients
upload only one C-dim vector per class they hold.

Client i (feature extractor f_i, projection head g_i: R^{d_i} → R^C, fixed simplex ETF E = [e_1 … e_C]):

    cos θ_{x,c} = ⟨ĝ_i(f_i(x)), e_c⟩,  ĝ = g / ‖g‖
    L_i = CE(s·[cos(θ_{x,y} + m) on the true class, cos θ_{x,c} elsewhere], y)            (ArcFace margin)
        + μ · E_{(x̃_c, w̄_c)} ‖h'_i(f_i(x̃_c)) − w̄_c‖²                                       (image → latent task)
    upload  P_i^c = normalize(mean_{x ∈ D_i^c} ĝ_i(f_i(x)))  for each class c it holds        (C floats each)

Server (feature transformer F: R^C → R^{d_w}, trainable class centroids Q̄ ∈ R^{C×d_w}):

    Q̄_c ← mean F(P^c) over the uploads,  then for E_s epochs over mini-batches of (P, c) pairs:
    L_s = MMD²_RBF(F(P), W) + λ · ‖F(P) − Q̄_c‖²,   W ~ the generator's latent prior   (Adam, lr η_s)
    Q̄_c ← mean F(P^c) again;  x̃_c = G(Q̄_c) for every class c  →  the C pairs (x̃_c, w̄_c = Q̄_c) go to every client.

Inference: arg max_c cos θ_{x,c} with the client's own model (a personalized method).

Defaults are the authors' tuned values per generator kind (their ``run_me.sh``): StyleGAN-XL η_s 0.01, λ 1,
μ 50; StyleGAN2/3 λ 0.1 (others the same); Stable Diffusion η_s 0.1, λ 0.01, μ 100; all E_s 100, batch 100,
m 0.5, s 64, gradient clip 100. The built-in GAN has no published values; it uses the StyleGAN-XL ones (both are
GANs with one latent vector per image). The MMD kernel is Σ_a exp(−d²/(2a)) for a ∈ {10, 15, 20, 50}, as in
the authors' code.

Departures from prior code (HtFLlib / FedKTL repository), following the paper:

* the projection h'_i (``proj_fc``) is part of the client's model and persists across rounds in the client's
  state; HtFLlib never saves it, so every round restarts from the server's initial random ``proj_fc``. Here it
  is also per client, because heterogeneous clients have different feature sizes (HtFLlib pools every feature
  to 512).
* prototypes come from the model after local training (the same in the authors' code).
* the class centroids are set to the means of F(P) before and after each alignment, as the paper says, with
  BatchNorm normalising by the uploaded prototypes' own statistics (as during alignment). The authors' code means to
  compute them with F in eval mode, i.e. with running statistics left from the previous round's prototypes
  (``centroid_stats=running``); when the prototypes' spread changes between rounds (it grows fast in the first
  rounds) that maps them far from the prior (root-mean-square 12.7 instead of about 1 for the built-in
  generator's N(0, I) in ``benchmarks/ktl_centroid_probe.py``), the MMD's RBF kernels vanish there, and the λ·MSE
  term drags F after them. But its ``set_Centroids`` assigns ``.data`` to row views of the centroid embedding, which
  leaves the embedding unchanged: the authors' centroids are the embedding (N(0, 1) at first), trained by the
  alignment and kept from round to round, never reset. ``reset_centroids=false`` does that (checked step by step
  against HtFLlib in ``tests/reference/test_htfllib_equivalence.py``).
* gradients are clipped per module (the client's model and h', the server's F and centroids), as the authors' code.
* the ETF is fixed and built from the run seed on each side, so it is never sent (the paper does not count it).
* generated images are sent as uint8 pixels at the clients' input shape (C·H·W·channels bytes each) and
  normalised like the clients' own data, not with HtFLlib's fixed 0.5/0.5.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from ..errors import ConfigError
from .mechanics import clip_each, collect_prototypes, mmd_rbf, prototypes_to_message

MMD_BANDWIDTHS = tuple(math.sqrt(a) for a in (10.0, 15.0, 20.0, 50.0))  # σ with exp(−d²/2σ²) = exp(−0.5·d²/a)

# The authors' tuned values (HtFLlib total.sh / FedKTL run_me.sh) by generator kind.
TUNED: dict[str, dict[str, float]] = {
    "stylegan-xl": {"server_lr": 0.01, "lam": 1.0, "mu": 50.0},
    "stylegan": {"server_lr": 0.01, "lam": 0.1, "mu": 50.0},
    "stable-diffusion": {"server_lr": 0.1, "lam": 0.01, "mu": 100.0},
    "builtin": {"server_lr": 0.01, "lam": 1.0, "mu": 50.0},  # no published values: the StyleGAN-XL ones
}
_BY_DEFAULT = "default: the authors' value for the generator kind"


@dataclass(frozen=True)
class FedKTLParams(HyperParams):
    lam: Any = hp(None, f"λ, weight of the MSE pulling transformed prototypes to their class centroids on the server ({_BY_DEFAULT}: StyleGAN-XL 1, StyleGAN3 0.1, SD 0.01, builtin 1)")
    mu: Any = hp(None, f"μ, weight of the clients' image→latent regression on the generated pairs ({_BY_DEFAULT}: StyleGAN 50, SD 100, builtin 50)")
    server_lr: Any = hp(None, f"Adam learning rate of the server's feature transformer and centroids ({_BY_DEFAULT}: StyleGAN 0.01, SD 0.1, builtin 0.01)")
    server_epochs: int = hp(100, "server alignment epochs per round over the uploaded prototypes", ge=1)
    server_batch_size: int = hp(100, "(prototype, class) pairs per server mini-batch", ge=2)
    margin: float = hp(0.5, "ArcFace additive angular margin m on the true class (radians)", ge=0.0, lt=math.pi)
    scale: float = hp(64.0, "ArcFace logit scale s", gt=0.0)
    max_grad_norm: float = hp(100.0, "gradient-norm clip of local and server updates, each module on its own (client: the "
                                     "model and h'; server: F and the centroids), as the authors' code", gt=0.0)
    prompt: str = hp("a cat", "text prompt for text-conditioned generators (diffusers back-end)")
    gen_steps: int = hp(50, "denoising steps of a diffusion generator", ge=1)
    guidance: float = hp(7.5, "classifier-free guidance scale of a diffusion generator", ge=0.0)
    gen_batch_size: int = hp(4, "images per generator call on the server", ge=1)
    centroid_stats: str = hp("prototypes", "BatchNorm statistics of F when the class centroids are (re)set: the uploaded "
                             "prototypes' own, or 'running' (eval mode, last round's running statistics: what the "
                             "authors' code means to do; see reset_centroids)", choices=("prototypes", "running"))
    reset_centroids: bool = hp(True, "set the class centroids to the class means of F(P) before and after the alignment "
                               "(the paper); false keeps the trained centroids from round to round, which is what the "
                               "authors' code does (its reset writes to row views of the embedding and changes nothing)")

    def validate(self, owner: str) -> None:
        for name, low, strict in (("lam", 0.0, False), ("mu", 0.0, False), ("server_lr", 0.0, True)):
            v = getattr(self, name)
            if v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
            if not ok or (float(v) <= low if strict else float(v) < low):
                rng = "> 0" if strict else ">= 0"
                raise ConfigError(f"{owner}: {name} must be a number {rng}, got {v!r}; {_BY_DEFAULT} "
                                  f"({', '.join(f'{k} {t[name]:g}' for k, t in TUNED.items())}).")


# ------------------------------------------------------------------------------------- building blocks
def simplex_etf(num_classes: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(C, C) fixed simplex ETF, row c = unit vector of class c: sqrt(C/(C−1))·P(I − 11ᵀ/C) with P a random
    orthogonal matrix (QR of a uniform random matrix), transposed and row-normalised; drawn with numpy (the same on
    every device), put on ``device`` (default: the CPU)."""
    c = int(num_classes)
    if c < 2:
        raise ConfigError("fedktl needs at least 2 classes for its simplex ETF classifier.")
    rng = np.random.default_rng(seed)
    p, _ = np.linalg.qr(rng.random((c, c)))
    m = math.sqrt(c / (c - 1)) * (p @ (np.eye(c) - np.ones((c, c)) / c))
    return F.normalize(torch.as_tensor(m.T, dtype=torch.float32, device=device), dim=1)


def etf_cosine(proj: torch.Tensor, etf: torch.Tensor) -> torch.Tensor:
    """cos θ between the normalised projections (n, C) and each class vector of the ETF (C, C)."""
    return F.linear(F.normalize(proj, dim=1), etf.to(proj.dtype))


def arcface_loss(proj: torch.Tensor, y: torch.Tensor, etf: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """CE over s·cos θ with the true class's angle enlarged by the additive margin m (Deng et al., 2019)."""
    cos = etf_cosine(proj, etf)
    if margin:
        true = cos.gather(1, y[:, None]).clamp(-1 + 1e-6, 1 - 1e-6)
        cos = cos.scatter(1, y[:, None], torch.cos(torch.acos(true) + margin))
    return F.cross_entropy(scale * cos, y)


class FeatureTransformer(nn.Module):
    """F: Linear(C, C) → BatchNorm → ReLU → Linear(C, d_w) (the paper's two-layer transformer)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim_in), nn.BatchNorm1d(dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def alignment_losses(Fm: nn.Module, protos: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                     prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MMD²(F(P), W), MSE(F(P), Q̄_y)) for one mini-batch."""
    q = Fm(protos)
    return mmd_rbf(q, prior, MMD_BANDWIDTHS), F.mse_loss(q, centroids[labels])


@torch.no_grad()
def transform_all(Fm: nn.Module, protos: torch.Tensor) -> torch.Tensor:
    """F(P) for all uploaded prototypes at once, BatchNorm normalising with *their* statistics (train mode with
    momentum 0, so the running statistics are left as they are)."""
    bns = [m for m in Fm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved, was = [m.momentum for m in bns], Fm.training
    for m in bns:
        m.momentum = 0.0
    Fm.train()
    try:
        return Fm(protos) if protos.shape[0] > 1 else Fm.eval()(protos)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        Fm.train(was)


@torch.no_grad()
def class_centroids(Fm: nn.Module, protos: torch.Tensor, labels: torch.Tensor, current: torch.Tensor,
                    running_stats: bool = False) -> torch.Tensor:
    """Q̄_c = mean of F(P) over the uploads of class c; classes nobody uploaded keep their row.

    ``running_stats``: F in eval mode (BatchNorm with its running statistics), as the authors' code does."""
    if running_stats:
        was = Fm.training
        q = Fm.eval()(protos)
        Fm.train(was)
    else:
        q = transform_all(Fm, protos)
    out = current.detach().clone()
    counts = torch.bincount(labels, minlength=out.shape[0])
    sums = torch.zeros_like(out).index_add_(0, labels, q)
    present = counts > 0
    out[present] = sums[present] / counts[present, None].to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------- algorithm
@register_algorithm("fedktl", summary="FedKTL (Zhang et al., CVPR 2024): server generator → clients via ETF prototypes and image–latent pairs")
class FedKTL(Algorithm):
    paper = ("Zhang et al., An Upload-Efficient Scheme for Transferring Knowledge From a Server-Side Pre-trained "
             "Generator to Clients in Heterogeneous Federated Learning, CVPR 2024")
    Params = FedKTLParams
    personalized = True
    has_global = False
    heterogeneous = True
    family = "generator"  # a pretrained generator on the server lends knowledge to the clients

    def __init__(self, hp: FedKTLParams, ctx):
        super().__init__(hp, ctx)
        self.generator_spec = getattr(ctx, "generator", None) or "builtin"
        self._generator = None
        gen = self.generator  # load now: its kind sets the defaults and its latent size sets h'
        self.kind = getattr(gen, "kind", self.generator_spec.split(":", 1)[0])
        tuned = TUNED.get(self.kind, TUNED["builtin"])
        self.lam = float(tuned["lam"] if hp.lam is None else hp.lam)
        self.mu = float(tuned["mu"] if hp.mu is None else hp.mu)
        self.server_lr = float(tuned["server_lr"] if hp.server_lr is None else hp.server_lr)
        self.latent_dim = int(gen.latent_dim)
        self._etf: dict[str, torch.Tensor] = {}  # the ETF per device it was asked for

    # the generator lives on the server only: never pickled to workers (nor are device copies of the ETF)
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_generator"] = None
        d["_etf"] = {}
        return d

    @property
    def generator(self):
        if self._generator is None:
            from ..generative import load_generator

            opts: dict[str, Any] = {"device": self.ctx.device}
            kind = self.generator_spec.split(":", 1)[0]
            if getattr(self.ctx, "trust_generator_pickle", False):
                opts["trust_pickle"] = True
            if kind == "diffusers":
                opts |= {"prompt": self.hp.prompt, "steps": self.hp.gen_steps, "guidance": self.hp.guidance,
                         "batch_size": self.hp.gen_batch_size}
            elif kind == "stylegan":
                opts["batch_size"] = self.hp.gen_batch_size
            self._generator = load_generator(self.generator_spec, **opts)
        return self._generator

    @property
    def etf(self) -> torch.Tensor:
        """The fixed simplex ETF on the CPU (:meth:`etf_on` gives it on a device)."""
        return self.etf_on("cpu")

    def etf_on(self, device: torch.device | str) -> torch.Tensor:
        """The fixed simplex ETF on ``device``, computed once per device (not copied per batch)."""
        key = str(torch.device(device))
        if key not in self._etf:
            cpu = self._etf.get("cpu")
            if cpu is None:
                cpu = self._etf["cpu"] = simplex_etf(self.ctx.num_classes,
                                                     derive_seed(self.ctx.seed, "fedktl", "etf") % (2**32))
            self._etf[key] = cpu.to(device)
        return self._etf[key]

    def settings(self) -> dict[str, Any]:
        """The resolved values (the defaults depend on the generator kind)."""
        return {"generator": self.generator_spec, "kind": self.kind, "lam": self.lam, "mu": self.mu,
                "server_lr": self.server_lr, "latent_dim": self.latent_dim}

    # --------------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        c = self.ctx.num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "fedktl", "server-init"))
            Fm = FeatureTransformer(c, self.latent_dim)
            # nn.Embedding's N(0, 1) initialisation, drawn on the CPU like F's weights (the same on every device)
            centroids = torch.randn(c, self.latent_dim)
        dev = self.ctx.device
        return {**with_prefix({k: v.to(dev) for k, v in Fm.state_dict().items()}, "ftrans"), "centroids": centroids.to(dev)}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        """The C generated (image, latent) pairs once they exist (nothing in round 1, nothing when μ = 0: the
        clients would not use them)."""
        if self.mu == 0:
            return {}
        return {k: server[k] for k in ("gen/images", "gen/latents") if k in server}

    def eval_message(self, server: State, cid: int) -> Message:
        return {}

    def _server_rng(self, rnd: int) -> torch.Generator:
        """The server's random stream of a round, on the CPU: the generators' ``sample_prior`` draws there (the
        permutations and prior samples are then moved to the server's device)."""
        return torch.Generator().manual_seed(derive_seed(self.ctx.seed, rnd, "fedktl", "server"))

    def align(self, server: State, protos: torch.Tensor, labels: torch.Tensor, rnd: int,
              epochs: int | None = None) -> tuple[State, dict[str, list[float]]]:
        """The server's domain alignment (MMD to the prior + λ·MSE to the centroids); returns the new state and the
        per-epoch mean losses."""
        c, dev = self.ctx.num_classes, torch.device(self.ctx.device)
        gen_rng = self._server_rng(rnd)
        Fm = FeatureTransformer(c, self.latent_dim)
        Fm.load_state_dict(under(server, "ftrans"))
        Fm.to(dev)
        protos, labels = protos.to(dev).float(), labels.to(dev)
        running, reset = self.hp.centroid_stats == "running", self.hp.reset_centroids
        start = server["centroids"].to(dev).float()
        cent = nn.Parameter(class_centroids(Fm, protos, labels, start, running) if reset else start.clone())
        opt_f = torch.optim.Adam(Fm.parameters(), lr=self.server_lr)
        opt_c = torch.optim.Adam([cent], lr=self.server_lr)
        n, bs = protos.shape[0], self.hp.server_batch_size
        history: dict[str, list[float]] = {"mmd": [], "mse": []}
        Fm.train()
        for _ in range(self.hp.server_epochs if epochs is None else epochs):
            perm = torch.randperm(n, generator=gen_rng, device=gen_rng.device).to(dev)
            stop = n - 1 if (n % bs == 1 and n > 1) else n  # never a BatchNorm batch of one (HtFLlib drops it too)
            sums, batches = [0.0, 0.0], 0
            for s in range(0, stop, bs):
                idx = perm[s : min(s + bs, stop)]
                if idx.numel() < 2:
                    continue
                prior = self.generator.sample_prior(idx.numel(), gen_rng).to(dev).float()
                mmd, mse = alignment_losses(Fm, protos[idx], labels[idx], cent, prior)
                loss = mmd + self.lam * mse
                opt_f.zero_grad(set_to_none=True)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(Fm.parameters(), self.hp.max_grad_norm)
                nn.utils.clip_grad_norm_([cent], self.hp.max_grad_norm)
                opt_f.step()
                opt_c.step()
                sums[0] += float(mmd.detach())
                sums[1] += float(mse.detach())
                batches += 1
            if batches:
                history["mmd"].append(sums[0] / batches)
                history["mse"].append(sums[1] / batches)
        final = class_centroids(Fm, protos, labels, cent.detach(), running) if reset else cent.detach().clone()
        new = {**server, **with_prefix({k: v.detach().clone() for k, v in Fm.state_dict().items()}, "ftrans"),
               "centroids": final}
        return new, history

    @torch.no_grad()
    def generate(self, latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One image per latent centroid: (images fitted to the clients' input shape, a preview ≤ 128 px)."""
        from ..generative.images import fit_to_input, resize_images

        g = self.generator
        raw = g.synthesize(latents, self.hp.prompt if getattr(g, "conditional", False) else None)
        side = min(128, raw.shape[1])
        preview = raw if raw.shape[1] == side else resize_images(raw, side, side)
        return fit_to_input(raw, self.ctx.input_shape), preview

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if self.mu == 0:  # nothing generated would be used: the clients train on their own data only
            return server
        pairs = [(v, c) for u in updates for k, v in u.upload.items() if k.startswith("proto/")
                 for c in [int(k.split("/", 1)[1])]]
        if not pairs:
            return server
        protos = torch.stack([v.float() for v, _ in pairs])
        dev = torch.device(self.ctx.device)  # the server's device (align works there)
        labels = torch.tensor([c for _, c in pairs], dtype=torch.long, device=dev)
        t0 = time.perf_counter()
        server, hist = self.align(server, protos, labels, rnd)
        t1 = time.perf_counter()
        images, preview = self.generate(server["centroids"])
        t2 = time.perf_counter()
        server["gen/images"] = torch.as_tensor(images, device=dev)
        server["gen/latents"] = server["centroids"].clone().float()
        server["gen/preview"] = torch.as_tensor(preview, device=dev)
        scalars = {"mmd": hist["mmd"][-1] if hist["mmd"] else float("nan"),
                   "mse": hist["mse"][-1] if hist["mse"] else float("nan"),
                   "mmd_first": hist["mmd"][0] if hist["mmd"] else float("nan"),
                   "mse_first": hist["mse"][0] if hist["mse"] else float("nan"),
                   "align_seconds": t1 - t0, "generate_seconds": t2 - t1}
        for k, v in scalars.items():
            server[f"metrics/{k}"] = torch.tensor(v, dtype=torch.float64, device=dev)
        return server

    def server_metrics(self, server: State) -> dict[str, float]:
        """The two alignment losses (first and last server epoch of the latest round) and server seconds."""
        if "metrics/mmd" not in server:
            return {}
        m = {k.split("/", 1)[1]: float(v) for k, v in server.items() if k.startswith("metrics/")}
        return {"server_mmd": m["mmd"], "server_centroid_mse": m["mse"], "server_mmd_first_epoch": m["mmd_first"],
                "server_centroid_mse_first_epoch": m["mse_first"], "server_align_seconds": m["align_seconds"],
                "server_generate_seconds": m["generate_seconds"],
                "server_seconds": m["align_seconds"] + m["generate_seconds"]}

    def artifacts(self, server: State) -> dict[str, np.ndarray]:
        """The latest generated images (one per class, in class order) as one grid image."""
        if "gen/preview" not in server:
            return {}
        from ..generative.images import image_grid

        preview = server["gen/preview"].cpu().numpy()  # the server state may live on a GPU
        return {"generated": image_grid(preview, ncol=min(10, preview.shape[0]))}

    # --------------------------------------------------------------------------------------- client side
    def _proj_fc(self, rt) -> nn.Linear:
        """h'_i: Linear(feature_dim → latent_dim); its initial weights depend only on the architecture."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "fedktl", "proj_fc", rt.arch))
            return nn.Linear(rt.model.feature_dim, self.latent_dim).to(rt.device)

    def init_client(self, rt) -> State:
        return {**rt.initial_params(), **with_prefix(self._proj_fc(rt).state_dict(), "proj_fc")}

    def client_loss(self, etf: torch.Tensor, proj_fc: nn.Module | None = None, gen_x: torch.Tensor | None = None,
                    gen_z: torch.Tensor | None = None, gen_batches=None):
        """The local loss: ArcFace CE on the ETF, plus μ·MSE(h'(f(x̃)), w̄) on generated pairs when they exist."""
        use_gen = self.mu > 0 and gen_x is not None and proj_fc is not None

        def loss_fn(model, x, y):
            loss = arcface_loss(model(x), y, etf, self.hp.margin, self.hp.scale)
            if use_gen:
                idx = next(gen_batches)
                loss = loss + self.mu * F.mse_loss(proj_fc(model.features(gen_x[idx])), gen_z[idx])
            return loss

        return loss_fn

    @staticmethod
    def _cycle(n: int, batch_size: int, gen: torch.Generator, device: torch.device | str | None = None):
        """Endless shuffled mini-batches of indices 0..n−1 (reshuffled at every pass), drawn on ``gen``'s device and
        moved to ``device`` (where the indexed tensors live) when given."""
        while True:
            perm = torch.randperm(n, generator=gen, device=gen.device)
            if device is not None:
                perm = perm.to(device)
            for s in range(0, n, batch_size):
                yield perm[s : s + batch_size]

    def local_update(self, rt, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        model = rt.model
        proj_fc = self._proj_fc(rt)
        proj_fc.load_state_dict({k: v.to(rt.device) for k, v in under(state, "proj_fc").items()})
        etf = self.etf_on(rt.device)
        gen_x = gen_z = batches = None
        params = list(model.parameters())
        groups = [len(params)]
        if "gen/images" in msg and self.mu > 0:
            gen_x = rt.fed.to_input(msg["gen/images"].to(rt.device))
            gen_z = msg["gen/latents"].to(rt.device).float()
            batches = self._cycle(gen_x.shape[0], rt.batch_size, rt.gen, rt.device)
            groups.append(len(list(proj_fc.parameters())))
            params += list(proj_fc.parameters())
        # the model's and h''s gradients are clipped each on its own, as the authors' client does
        stats = rt.train(loss_fn=self.client_loss(etf, proj_fc, gen_x, gen_z, batches), params=params,
                         grad_hook=clip_each(groups, self.hp.max_grad_norm))
        protos, counts = collect_prototypes(rt, features=lambda x: model(x), normalize=True)
        new_state = {**rt.model_state(), **with_prefix({k: v.detach().clone() for k, v in proj_fc.state_dict().items()}, "proj_fc")}
        return Update(prototypes_to_message(protos, counts), new_state, rt.num_train, stats.as_dict())

    def predict(self, rt, x: torch.Tensor) -> torch.Tensor:
        return self.hp.scale * etf_cosine(rt.model(x), self.etf_on(x.device))

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
