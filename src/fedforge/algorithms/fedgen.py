"""FedGen — Zhu et al., "Data-Free Knowledge Distillation for Heterogeneous Federated Learning", ICML 2021.

The server learns a conditional feature generator G(z, y) (z ~ N(0, I)) that produces feature vectors the
clients' heads agree to label y; clients then train their head on generator samples as well, which carries the
ensemble's knowledge back to every client without any data:

    server   min_G  E_{y ~ p̂(y), z} CE( Σ_k w_k^y · h_k(G(z, y)), y ),   w_k^y = n_k^y / Σ_j n_j^y
             (``server_steps`` Adam steps per round; h_k: the heads uploaded this round, frozen)
    client   min    CE(h(f(x)), y) + α · E_{ŷ ~ p̂(y), z} CE( h(G(z, ŷ)), ŷ )

p̂(y) is the label distribution of the clients (each client sends its label counts once). What is averaged:

- ``share = model`` (the paper; the default when every client owns the same architecture): the whole model is
  averaged as in FedAvg and each client is judged with the global model;
- ``share = head`` (HtFLlib's heterogeneous setting; the default when architectures differ): only the head is
  averaged, every client keeps its own feature extractor and is judged with (f_k, averaged head).

Downloads carry the averaged weights and G (parameters and BatchNorm statistics; clients run it in eval mode).
G = Linear(noise + C → hidden) → BatchNorm → ReLU → Linear(hidden → d), as in the paper's code.

Departures from prior code: HtFLlib and the official code draw the noise uniformly (``torch.rand``) although their
comments say Gaussian; the paper's noise is Gaussian, used here. The generator's diversity regulariser of the official code and its
decaying loss weights are left out (the paper's objective, Eq. 4–5, has neither). Adam's moments restart each round.
HtFLlib further (step-checked in ``tests/reference/test_htfllib_equivalence.py``): weighs every uploaded head by the
client's share of all samples, for every label (here n_k^y / Σ_j n_j^y per label, as the paper's code; the same when
the clients' label histograms are proportional); lets its clients use the generator from the first round on, before
the server has trained it (here only once trained), and in training mode (BatchNorm on batch statistics); draws the
server's labels from every client's counts (here this round's clients'); and never saves the generator its server
trains, so its clients always see the initial one.
Defaults: noise 32, hidden 512 and 100 steps (HtFLlib's benchmark script and default; PFLlib's default is 1000
steps), Adam lr 0.005 (HtFLlib's and PFLlib's argparse default; HtFLlib's script uses 0.1), α = 1 (the paper's Eq. 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, weighted_average
from ..core.params import HyperParams, hp
from .mechanics import HEAD, is_head, require_common_feature_dim, require_same_head, select, with_own_head

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime


@dataclass(frozen=True)
class FedGenParams(HyperParams):
    alpha: float = hp(1.0, "weight α of the head's loss on generator samples (0: no generator knowledge)", ge=0)
    noise_dim: int = hp(32, "dimension of the generator's Gaussian noise z", ge=1)
    hidden_dim: int = hp(512, "hidden width of the generator", ge=1)
    gen_lr: float = hp(0.005, "Adam learning rate of the server's generator", gt=0)
    server_steps: int = hp(100, "generator training steps per round on the server", ge=0)
    gen_batch: int = hp(0, "labels per generator step and generator samples per client batch (0: the batch size)", ge=0)
    share: str = hp("auto", "what is averaged: model (paper), head (HtFLlib), auto = model if one architecture else head",
                    choices=("auto", "model", "head"))


class FeatureGenerator(nn.Module):
    """G(z, y) = Linear(hidden → d)(ReLU(BN(Linear(noise + C → hidden)([z; onehot(y)]))))."""

    def __init__(self, noise_dim: int, num_classes: int, hidden_dim: int, feature_dim: int):
        super().__init__()
        self.noise_dim, self.num_classes = noise_dim, num_classes
        self.fc1 = nn.Linear(noise_dim + num_classes, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, feature_dim)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)
        return self.fc2(F.relu(self.bn(self.fc1(h))))


@register_algorithm("fedgen", summary="FedGen (Zhu et al., ICML 2021): server-trained feature generator distils the clients' heads into every client")
class FedGen(Algorithm):
    paper = "Zhu et al., Data-Free Knowledge Distillation for Heterogeneous Federated Learning, ICML 2021"
    Params = FedGenParams
    personalized = False  # the paper's setting (one architecture); head sharing flips both flags per instance
    has_global = True
    heterogeneous = True

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.feature_dim = require_common_feature_dim(ctx, self.name)
        share = hp.share if hp.share != "auto" else ("model" if ctx.homogeneous else "head")
        if share == "model" and not ctx.homogeneous:
            from ..errors import ConfigError

            raise ConfigError("fedgen with share=model averages whole models, so every client needs the same "
                              "architecture; use share=head (or auto) for a model group.")
        if share == "head":
            require_same_head(ctx, self.name)
        self.share = share
        self.has_global = share == "model"  # judged with the global model (paper) ...
        self.personalized = share == "head"  # ... or with its own extractor and the averaged head

    def _generator(self, device: torch.device | str | None = None) -> FeatureGenerator:
        """A fresh G (initialised from the global CPU random stream, then moved to ``device``)."""
        gen = FeatureGenerator(self.hp.noise_dim, self.ctx.num_classes, self.hp.hidden_dim, self.feature_dim)
        return gen.to(device) if device is not None else gen

    def _shared(self, params: State) -> State:
        entries = model_entries(params)
        return entries if self.share == "model" else select(entries, is_head)

    def _batch(self) -> int:
        return self.hp.gen_batch or self.ctx.batch_size

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        state = self._shared(super().init_server())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "fedgen-init"))
            gen = self._generator()
        state |= {f"gen/{k}": v.detach().clone() for k, v in gen.state_dict().items()}
        state["stat/gen_trained"] = torch.zeros((), dtype=torch.long, device=self.ctx.device)
        state["stat/gen_loss"] = torch.tensor(float("nan"), dtype=torch.float64, device=self.ctx.device)
        return state

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        msg = model_entries(server)
        if int(server["stat/gen_trained"]):
            msg |= {k: v for k, v in server.items() if k.startswith("gen/")}
            msg["prior/labels"] = server["prior/labels"]
        return msg

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        out = dict(server)
        for u in updates:
            if "labels/count" in u.upload:
                out[f"labels/{u.cid}"] = u.upload["labels/count"].double()
        weights = [u.weight for u in updates]
        out |= weighted_average([model_entries(u.upload) for u in updates], weights)
        dev = server["stat/gen_trained"].device  # the server's device
        none = torch.zeros(self.ctx.num_classes, dtype=torch.float64, device=dev)
        counts = torch.stack([out.get(f"labels/{u.cid}", none).to(dev) for u in updates])  # (K, C) this round's counts
        if self.hp.server_steps > 0 and counts.sum() > 0:
            gen_state, loss = self._train_generator(under(server, "gen"), updates, counts, rnd)
            out |= {f"gen/{k}": v for k, v in gen_state.items()}
            out["stat/gen_trained"] = torch.ones((), dtype=torch.long, device=dev)
            out["stat/gen_loss"] = torch.tensor(loss, dtype=torch.float64, device=dev)
        total = torch.stack([v for k, v in out.items() if k.startswith("labels/")]).sum(0)
        out["prior/labels"] = (total / total.sum()).float()
        return out

    def _train_generator(self, gen_state: State, updates: list[Update], counts: torch.Tensor, rnd: int):
        dev = counts.device  # the server's device: G, the heads and the sampling all live there
        gen = self._generator(dev)
        gen.load_state_dict(gen_state)
        gen.train()
        head = self.ctx.build_model(self.ctx.archs[0]).head.to(dev)
        heads = [{k[len(HEAD):]: v.to(dev).float() for k, v in u.upload.items() if k.startswith(HEAD)} for u in updates]
        w = counts / counts.sum(0, keepdim=True).clamp(min=1)  # (K, C): w_k^y
        prior = counts.sum(0) / counts.sum()
        g = torch.Generator(device=dev).manual_seed(derive_seed(self.ctx.seed, rnd, "fedgen"))
        opt = torch.optim.Adam(gen.parameters(), lr=self.hp.gen_lr)
        bs = max(2, self._batch())
        loss_sum = 0.0
        for _ in range(self.hp.server_steps):
            y = torch.multinomial(prior.float(), bs, replacement=True, generator=g)
            z = torch.randn(bs, self.hp.noise_dim, generator=g, device=dev)
            f = gen(z, y)
            logits = sum(w[k, y].float().unsqueeze(1) * torch.func.functional_call(head, heads[k], (f,))
                         for k in range(len(heads)))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum = loss_sum + loss.detach().double()  # float64 on the device, read once below
        return {k: v.detach().clone() for k, v in gen.state_dict().items()}, float(loss_sum) / self.hp.server_steps

    def server_metrics(self, server: State) -> dict[str, float]:
        v = float(server["stat/gen_loss"])
        return {"generator_loss": None if v != v else v}

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt: ClientRuntime) -> State:
        return rt.initial_params() if self.share == "head" else {}

    def local_update(self, rt: ClientRuntime, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        rt.load(model_entries(msg))
        loss_fn = None
        if "prior/labels" in msg and self.hp.alpha > 0:
            gen = self._client_generator(rt, msg)
            # labels and noise come from the task's stream rt.gen, drawn on its device, then moved to the run's
            sample_on = rt.gen.device
            prior = msg["prior/labels"].float().to(sample_on)
            alpha, bs, nd = float(self.hp.alpha), max(2, self._batch()), self.hp.noise_dim

            def loss_fn(model, x, y):
                loss = F.cross_entropy(model(x), y)
                y_hat = torch.multinomial(prior, bs, replacement=True, generator=rt.gen).to(rt.device)
                z = torch.randn(bs, nd, generator=rt.gen, device=sample_on).to(rt.device)
                with torch.no_grad():
                    f = gen(z, y_hat)
                return loss + alpha * F.cross_entropy(model.head(f), y_hat)

        stats = rt.train(loss_fn=loss_fn)
        params = rt.model_state()
        upload = self._shared(params)
        new_state = dict(params) if self.share == "head" else {}
        if "sent/labels" not in state:
            upload["labels/count"] = rt.class_counts().float()
        new_state["sent/labels"] = torch.ones((), dtype=torch.long, device=rt.device)
        return Update(upload, new_state, rt.num_train, stats.as_dict())

    def _client_generator(self, rt: ClientRuntime, msg: Message) -> FeatureGenerator:
        gen = self._generator(rt.device)
        gen.load_state_dict(under(msg, "gen"))
        return gen.eval()

    def personal_params(self, msg: Message, state: State) -> Message:
        return {**select(model_entries(state), lambda k: not is_head(k)), **model_entries(msg)}

    def evaluate(self, rt: ClientRuntime, msg: Message, state: State):
        """Judged with the averaged head; ``head_acc``: with the head the client trained itself (heterogeneous
        setting, where the state keeps the whole model)."""
        out = super().evaluate(rt, msg, state)
        return with_own_head(out, rt, state) if self.share == "head" else out
