"""Differential privacy around aggregation, by composition (as :mod:`fedforge.core.server_opt`): user-level DP on the
server, and the per-round record of the privacy both levels have spent.

**User-level DP-FedAvg** (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018), with ``--server-dp-noise z``: each upload's change of the model weights, Δ_i = w_i − w (w: the
server's weights before the round), is clipped to norm S, the clipped uploads are averaged with equal weights (a
client's data size is private too), and Gaussian noise is added to the average::

    Δ̄_i = Δ_i · min(1, S / ‖Δ_i‖);   w ← w + (1/m) Σ_i Δ̄_i + N(0, (z·S/m)²·I)          (m: the round's clients)

The algorithm's own ``aggregate`` computes the average (it is handed the clipped uploads with unit weights), so any
weight-sharing algorithm whose ``aggregate`` is the weighted average of the uploads composes with it; an upload that is
not clipped (its norm within S) is passed on untouched, so with no noise and a huge S the result is plain aggregation
bit for bit. Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021), with ``--server-dp-quantile γ``: S starts at ``--server-dp-clip`` and follows the γ-quantile
of the update norms geometrically, S ← S·exp(−η_C (b̃ − γ)), b̃ = (Σ_i 1[‖Δ_i‖ ≤ S] + N(0, σ_b²)) / m, with the paper's
η_C = 0.2 and σ_b = m/20; the noise on the average then uses z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) so that the two releases
together are as private as one of noise multiplier z (the paper's Theorem 1).

Accounting: Opacus's RDP accountant over ``rounds`` steps at sampling rate q = ``--join-ratio`` with noise multiplier
z, at δ = ``--dp-delta`` (the sensitivity S/m assumes the round's cohort size m is fixed, as it is without
``--random-join``, ``--drop-rate`` or failures). Each record gets ``server_dp_epsilon`` (and ``server_dp_clip``).

**Client-level DP-SGD** (:mod:`fedforge.core.dp`) happens in the clients; here the server keeps the number of DP steps
each client reported (its state's ``dp/steps``) so that each record gets ``dp_epsilon``: the ε spent so far by the
client that has spent the most (each client at its own sampling rate and σ), and ``dp_steps_max``.

The state (S, the step counts) lives in the server state under ``privacy/``, out of the algorithm's view and
checkpointed with it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..errors import ConfigError
from .algorithm import Algorithm, Update
from .context import derive_seed
from .dp import STEPS, ClientDP, check_model, client_dp, epsilon_spent
from .messages import State

log = logging.getLogger("fedforge")

PREFIX = "privacy/"
CLIP = "privacy/clip"  # the current clip norm S of user-level DP (adaptive clipping moves it)
CLIENT_STEPS = "privacy/client_steps"  # DP-SGD steps each client has reported (client-level DP)
CLIP_LR = 0.2  # η_C of adaptive clipping (Andrew et al. 2021)
COUNT_NOISE_FRACTION = 1 / 20  # σ_b = m / 20 (Andrew et al. 2021)


@dataclass(frozen=True)
class ServerDP:
    """User-level DP-FedAvg: noise multiplier z, clip S (the initial S with adaptive clipping at quantile γ)."""

    noise: float
    clip: float
    quantile: float | None = None
    cohort: int = 1  # m: clients per round (sets σ_b of adaptive clipping)

    @property
    def count_noise(self) -> float:
        """σ_b of the clipped-count estimate (adaptive clipping), 0 without noise."""
        return self.cohort * COUNT_NOISE_FRACTION if (self.quantile is not None and self.noise > 0) else 0.0

    @property
    def update_noise(self) -> float:
        """z_Δ: the noise multiplier of the averaged update (z itself with a fixed clip)."""
        if self.quantile is None or self.noise == 0:
            return self.noise
        z: float = (self.noise ** -2 - (2 * self.count_noise) ** -2) ** -0.5
        return z

    def check(self) -> ServerDP:
        if self.quantile is not None and self.noise > 0 and self.noise >= 2 * self.count_noise:
            raise ConfigError(f"adaptive clipping spends part of the noise on counting clipped updates (σ_b = m/20 = "
                              f"{self.count_noise:g} for {self.cohort} clients a round), so --server-dp-noise must stay "
                              f"below 2·σ_b = {2 * self.count_noise:g}; lower it, sample more clients a round, or use a "
                              f"fixed clip (leave --server-dp-quantile out).")
        return self


class Privacy:
    """The engine's privacy step around ``aggregate`` and the privacy metrics of each record."""

    def __init__(self, *, server: ServerDP | None, client: ClientDP | None, num_clients: int, delta: float,
                 sample_rate: float, seed: int, model_names: Iterable[str], device: str | torch.device = "cpu"):
        self.server, self.client = server, client
        self.num_clients, self.delta, self.sample_rate, self.seed = num_clients, delta, sample_rate, seed
        self.model_names = set(model_names)
        self.device = torch.device(device)
        self._eps_cache: dict[tuple[float, float, int], float] = {}
        self._warned = False

    # ------------------------------------------------------------------------------------------ round
    def aggregate(self, aggregate: Callable[[State, list[Update], int], State], old: State, server: State,
                  updates: list[Update], rnd: int) -> State:
        """The new server state: ``aggregate(server, updates, rnd)`` with user-level DP around it (clipped uploads
        in, noise out), plus the ``privacy/`` entries. ``old`` is the whole server state before the round (with
        ``privacy/``), ``server`` the algorithm's view of it."""
        extra: dict[str, torch.Tensor] = {}
        if self.client is not None:
            steps = old[CLIENT_STEPS].clone() if CLIENT_STEPS in old else torch.zeros(
                self.num_clients, dtype=torch.int64, device=self.device)
            for u in updates:
                if u.state is not None and STEPS in u.state:
                    steps[u.cid] = int(u.state[STEPS])
            extra[CLIENT_STEPS] = steps
        if self.server is None:
            return {**aggregate(server, updates, rnd), **extra}
        s = self.server
        clip = float(old[CLIP]) if CLIP in old else s.clip
        clipped, within, names = self.clip(server, updates, clip)
        new = aggregate(server, clipped, rnd)
        m = len(updates)
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, rnd, "server_dp"))
        std = s.update_noise * clip / m if m else 0.0
        if std > 0:
            new = dict(new)
            for k in sorted(names):
                t = new[k]
                new[k] = t + torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) * std
        if s.quantile is not None and m:
            count = within + (float(torch.randn((), generator=gen, device=self.device)) * s.count_noise
                              if s.count_noise > 0 else 0.0)
            clip = clip * math.exp(-CLIP_LR * (count / m - s.quantile))
        extra[CLIP] = torch.tensor(clip, dtype=torch.float64, device=self.device)
        return {**new, **extra}

    def clip(self, server: State, updates: list[Update], clip: float) -> tuple[list[Update], int, set[str]]:
        """(the uploads with each change of the weights clipped to norm ``clip`` and unit weights, how many were
        within the clip, the names of the weights uploaded). An upload within the clip is handed on untouched."""
        out, within, names = [], 0, set()
        for u in updates:
            keys = [k for k, v in u.upload.items() if v.is_floating_point()]
            foreign = [k for k in keys if k not in self.model_names or k not in server]
            if foreign:
                raise ConfigError(f"user-level DP clips and noises uploads of model weights, but client {u.cid} also "
                                  f"uploads '{foreign[0]}', which it would leave unprotected; use an algorithm that "
                                  f"shares model weights only (fedavg, fedprox, ditto, fedper, ...) or leave "
                                  f"--server-dp-noise out.")
            names.update(keys)
            deltas = {k: u.upload[k] - server[k] for k in keys}
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d.double()) for d in deltas.values()]))) \
                if deltas else 0.0
            if norm <= clip:
                within += 1
                out.append(dataclasses.replace(u, weight=1.0))
                continue
            scale = clip / norm
            upload = dict(u.upload)
            for k, d in deltas.items():
                upload[k] = server[k] + d * scale
            out.append(dataclasses.replace(u, upload=upload, weight=1.0))
        return out, within, names

    # ---------------------------------------------------------------------------------------- metrics
    def metrics(self, server: State, rnd: int) -> dict[str, Any]:
        """``dp_epsilon``/``dp_steps_max`` (client level) and ``server_dp_epsilon``/``server_dp_clip`` (user level)
        after round ``rnd``."""
        out: dict[str, Any] = {}
        if self.client is not None:
            steps = server[CLIENT_STEPS].tolist() if CLIENT_STEPS in server else [0] * self.num_clients
            eps = max((self._client_epsilon(c, int(t)) for c, t in enumerate(steps)), default=0.0)
            out["dp_epsilon"] = eps
            out["dp_steps_max"] = int(max(steps, default=0))
            if eps > self.client.epsilon * 1.01 and not self._warned:
                self._warned = True
                log.warning("client-level DP: a client has spent ε = %.3g, more than the target %g: it took more "
                            "DP-SGD steps than planned (an algorithm that trains several models or passes a round; "
                            "set --dp-epochs to the passes a round)", eps, self.client.epsilon)
        if self.server is not None:
            out["server_dp_epsilon"] = epsilon_spent(self.server.noise, self.sample_rate, rnd, self.delta)
            out["server_dp_clip"] = float(server[CLIP]) if CLIP in server else self.server.clip
        return out

    def _client_epsilon(self, cid: int, steps: int) -> float:
        assert self.client is not None
        key = (self.client.sample_rates[cid], self.client.sigmas[cid], steps)  # clients of one size share it
        if key not in self._eps_cache:
            self._eps_cache[key] = self.client.epsilon_after(cid, steps)
        return self._eps_cache[key]


def make_privacy(cfg: Any, algo: Algorithm) -> Privacy | None:
    """The run's privacy step (None without ``--dp-epsilon`` and ``--server-dp-noise``); refuses what it cannot
    protect before the run starts."""
    ctx = algo.ctx
    server = None
    if cfg.server_dp_noise is not None:
        if type(algo).aggregate is not Algorithm.aggregate:
            raise ConfigError(f"user-level DP bounds each client's influence on the weighted average of the uploads, "
                              f"but {algo.name} aggregates its own way; use an algorithm that averages model weights "
                              f"(fedavg, fedprox, ditto, fedper, fedrep, ...) or leave --server-dp-noise out.")
        cohort = max(1, int(cfg.join_ratio * ctx.num_clients + 1e-9))
        server = ServerDP(cfg.server_dp_noise, cfg.server_dp_clip, cfg.server_dp_quantile, cohort).check()
    if server is None and ctx.dp is None:
        return None
    names = {k for arch in ctx.arch_set for k in ctx.build_model(arch).state_dict()}
    return Privacy(server=server, client=ctx.dp, num_clients=ctx.num_clients, delta=cfg.dp_delta,
                   sample_rate=cfg.join_ratio, seed=cfg.seed, model_names=names, device=ctx.device)


def with_client_dp(cfg: Any, ctx: Any) -> Any:
    """``ctx`` with the run's client-level DP-SGD (``--dp-epsilon``): every architecture checked for layers that mix
    a batch's samples, and σ calibrated for every client before the run starts."""
    if cfg.dp_epsilon is None:
        return ctx
    for arch in ctx.arch_set:
        check_model(ctx.build_model(arch), arch)
    spec = client_dp(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_max_grad_norm, ctx.train_sizes, ctx.batch_size, ctx.rounds,
                     cfg.dp_epochs or ctx.local_epochs)
    return dataclasses.replace(ctx, dp=spec)
