"""FedFomo — Zhang, Sapra, Fidler, Yeung & Alvarez, "Personalized Federated Learning with First Order Model
Optimization", ICLR 2021.

Every client keeps its own model θ_i; there is no global model. The server stores the latest model of every client
and an affinity matrix P (P_ij: how useful client j's model has been to client i). Each round client i downloads
M other clients' models — the M with the highest P_ij, each slot replaced by a random client with probability
ε_t = ε − t·decay (ε-greedy exploration) — scores them on a validation split held out from its training data and
moves towards those that lower its validation loss:

    w_n = max(0, (L_i(θ_i) − L_i(θ_n)) / ‖θ_n − θ_i‖),   w ← w / Σ_n w_n   (no move when every w_n is 0)
    θ_i ← θ_i + Σ_n w_n (θ_n − θ_i),   then local SGD on the remaining training data
    server: stores θ_i, P_in ← P_in + w_n

A client is judged with its own θ_i (``personalized``). Only models that a client has uploaded can be downloaded
(none in round 1, when all models are still the initial one). ``bytes_down`` counts the M models each client
receives; the upload is its model plus the M weights.

Defaults: M = 5, 20 % of local training data held out (as PFLlib), ε = 0.3 decaying by 0.05 per round (the
authors' ε-greedy download; PFLlib always takes the top M). With M = 0 and val_ratio = 0 the method is ``local``
(tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under
from ..core.params import HyperParams, hp
from ..core.training import eval_loop
from ..errors import ConfigError
from .mechanics import holdout_positions, mix_params, sq_distance


@dataclass(frozen=True)
class FedFomoParams(HyperParams):
    M: int = hp(5, "other clients' models each client downloads per round", ge=0)
    val_ratio: float = hp(0.2, "share of each client's training data held out to score downloaded models", ge=0.0, lt=1.0)
    epsilon: float = hp(0.3, "initial probability that a download slot goes to a random client instead of the top-affinity one", ge=0.0, le=1.0)
    epsilon_decay: float = hp(0.05, "decrease of ε per round (exploration fades out)", ge=0.0)

    def validate(self, owner: str) -> None:
        if self.M > 0 and self.val_ratio == 0:
            raise ConfigError(f"{owner}: val_ratio must be > 0 when M > 0 (downloaded models are weighted by their "
                              f"loss on held-out local data); the paper's default is 0.2.")


def split_positions(n: int, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (validation, training) positions within a client's training indices, on the CPU (the same split on
    every device; the callers move them to the data's device)."""
    nv = min(max(int(round(n * ratio)), 1), n - 1) if ratio > 0 and n >= 2 else 0
    return holdout_positions(n, nv, seed)


@register_algorithm("fedfomo", summary="FedFomo (Zhang et al., ICLR 2021): per-client weighted download of other clients' models")
class FedFomo(Algorithm):
    paper = "Zhang, Sapra, Fidler, Yeung & Alvarez, Personalized Federated Learning with First Order Model Optimization, ICLR 2021"
    Params = FedFomoParams
    personalized = True
    has_global = False

    # ------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        init = super().init_server()
        n = self.ctx.num_clients
        server: State = {f"client/{j}/{k}": v for j in range(n) for k, v in init.items()}
        server["fomo/affinity"] = torch.zeros(n, n, dtype=torch.float64, device=self.ctx.device)
        server["fomo/uploaded"] = torch.zeros(n, dtype=torch.bool, device=self.ctx.device)
        return server

    def choose(self, server: State, cid: int, rnd: int) -> list[int]:
        """The clients whose models ``cid`` downloads in round ``rnd``: top-M affinity, ε-greedy."""
        hp_ = self.hp
        uploaded = server["fomo/uploaded"].tolist()  # a host decision: one read, not one per client
        avail = [j for j in range(self.ctx.num_clients) if j != cid and uploaded[j]]
        if hp_.M == 0 or not avail:
            return []
        rng = np.random.default_rng(derive_seed(self.ctx.seed, rnd, cid, "fomo"))
        aff = server["fomo/affinity"][cid].cpu().numpy()
        tie = rng.random(len(avail))
        top = [avail[i] for i in np.lexsort((tie, -aff[avail]))]
        rand = [avail[i] for i in rng.permutation(len(avail))]
        eps = max(0.0, hp_.epsilon - max(rnd - 1, 0) * hp_.epsilon_decay)
        chosen: list[int] = []
        for _ in range(min(hp_.M, len(avail))):
            pool = rand if rng.random() < eps else top
            chosen.append(next(j for j in pool if j not in chosen))
        return sorted(chosen)

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        msg: Message = {}
        for j in self.choose(server, cid, rnd):
            msg.update({f"peer/{j}/{k}": v for k, v in under(server, f"client/{j}").items()})
        return msg

    def eval_message(self, server: State, cid: int) -> Message:
        return {}  # a client is judged with the model it keeps

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        out = dict(server)
        aff = server["fomo/affinity"].clone()
        uploaded = server["fomo/uploaded"].clone()
        for u in updates:
            out.update({f"client/{u.cid}/{k}": v for k, v in model_entries(u.upload).items()})
            uploaded[u.cid] = True
            for j, w in under(u.upload, "fomo/w").items():
                aff[u.cid, int(j)] += float(w)
        out["fomo/affinity"] = aff
        out["fomo/uploaded"] = uploaded
        return out

    # ------------------------------------------------------------------------------------- client
    def init_client(self, rt) -> State:
        return rt.initial_params()

    def _val_loss(self, rt, params: Message, positions: torch.Tensor) -> float:
        rt.load(params)
        rt.model.eval()
        idx = rt.fed.train_idx[rt.cid][positions.to(rt.fed.train_idx[rt.cid].device)]
        bs = rt.ctx.eval_batch_size
        batches = (rt.fed.inputs(idx[s: s + bs]) for s in range(0, idx.numel(), bs))
        c = eval_loop(rt.model, batches, autocast=rt.autocast)
        return c.loss_sum / max(c.total, 1)

    def weights(self, rt, own: Message, peers: dict[int, Message], val: torch.Tensor) -> dict[int, float]:
        """Normalised FedFomo weights of the downloaded models (all zero when none lowers the validation loss)."""
        if not peers or val.numel() == 0:
            return {j: 0.0 for j in peers}
        l_old = self._val_loss(rt, own, val)
        raw = {}
        for j, theta in peers.items():
            dist = math.sqrt(sq_distance(theta, own))
            raw[j] = max(0.0, (l_old - self._val_loss(rt, theta, val)) / dist) if dist > 0 else 0.0
        total = sum(raw.values())
        return {j: (w / total if total > 0 else 0.0) for j, w in raw.items()}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        own = model_entries(state)
        peer_ids = sorted({int(k.split("/")[1]) for k in msg if k.startswith("peer/")})
        peers = {j: under(msg, f"peer/{j}") for j in peer_ids}
        val, train = split_positions(rt.num_train, self.hp.val_ratio, derive_seed(rt.ctx.seed, rt.cid, "fomo-val"))
        w = self.weights(rt, own, peers, val)
        s = sum(w.values())
        start = own if s == 0 else mix_params([own] + [peers[j] for j in peer_ids],
                                              [1.0 - s] + [w[j] for j in peer_ids], keys=list(own))
        rt.load(start)
        batches = (rt.fed.train_batches(rt.cid, rt.batch_size, rt.gen, epochs=rt.local_epochs, subset=train)
                   if val.numel() else rt.batches())
        stats = rt.train(batches=batches)
        theta = rt.model_state()
        upload = {**theta, **{f"fomo/w/{j}": torch.tensor(w[j], dtype=torch.float32, device=rt.device) for j in peer_ids}}
        metrics = {**stats.as_dict(), "peers_used": float(sum(1 for v in w.values() if v > 0))}
        return Update(upload, theta, rt.num_train, metrics)
