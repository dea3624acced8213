"""pFedLA — Ma, Zhang, Guo & Xu, "Layer-wised Model Aggregation for Personalized Federated Learning", CVPR 2022.

The server keeps every client's model θ_j and, for each client i, a small hypernetwork HN_i(v_i; ψ_i) that outputs
one non-negative weight vector α_i^l ∈ R^N per layer l (parameter tensor). Client i receives its personalized
aggregate, layer by layer,

    θ̄_i^l = Σ_j α_ij^l θ_j^l / Σ_j α_ij^l             (α = ReLU(linear head of an MLP on the embedding v_i))

trains it locally to θ̃_i and returns Δθ_i = θ̄_i − θ̃_i. The server then updates client i's hypernetwork by the chain
rule through the aggregation, taking Δθ_i as the gradient of the client's loss at θ̄_i, and client i's model:

    ψ_i ← ψ_i − η (∇_{ψ_i} θ̄_i)ᵀ Δθ_i,        θ_i ← θ_i − Δθ_i

A client is judged with its personalized aggregate θ̄_i (``personalized``); there is no global model. Hypernetworks,
embeddings and models live in the server state (``hn/<i>/...``, ``client/<j>/...``); buffers (BatchNorm statistics)
stay on the clients. In a round's first steps all θ_j are still equal, so α has no effect until the models differ.

Defaults are the paper's code and FL-bench's: embedding and hidden width 100, three hidden layers, head weights
initialised uniformly in [0, 1) and biases at 0, SGD with η = 5e-3 and no momentum. Difference from FL-bench, whose
server passes −Δθ_i (the trained minus the sent model) as the output gradient and then *descends*, which moves θ̄_i
away from what the client learned: here ψ_i descends along (∇θ̄_i)ᵀΔθ_i, as pFedHN does in the same code base
(the direction is tested). The heuristic variant (HeurpFedLA) is not included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from .mechanics import hypernet_grads, sgd_momentum_step


@dataclass(frozen=True)
class PFedLAParams(HyperParams):
    hn_lr: float = hp(5e-3, "η: SGD rate of each client's hypernetwork (0: the aggregation weights stay as initialised)", ge=0)
    embed_dim: int = hp(100, "dimension of a client's embedding v_i", ge=1)
    hidden_dim: int = hp(100, "width of the hypernetworks' hidden layers", ge=1)


class LayerWeights(nn.Module):
    """HN_i: embedding of client i → 3-layer MLP → one ReLU-linear head per layer giving N aggregation weights."""

    def __init__(self, num_clients: int, num_layers: int, embed_dim: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(num_clients, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, num_clients) for _ in range(num_layers))
        for h in self.heads:
            nn.init.uniform_(h.weight)
            nn.init.zeros_(h.bias)

    def forward(self, cid: int) -> list[torch.Tensor]:
        f = self.mlp(self.embedding.weight[cid])
        return [F.relu(h(f)) for h in self.heads]


@register_algorithm("pfedla", summary="pFedLA (Ma et al., CVPR 2022): per-client hypernetworks learn layer-wise weights to aggregate all clients' models")
class PFedLA(Algorithm):
    paper = "Ma, Zhang, Guo & Xu, Layer-wised Model Aggregation for Personalized Federated Learning, CVPR 2022"
    Params = PFedLAParams
    personalized = True
    has_global = False

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.layers = [n for n, _ in ctx.build_model().named_parameters()]
        self._net: LayerWeights | None = None

    def hypernet(self, server: State, cid: int) -> LayerWeights:
        """Client ``cid``'s hypernetwork, loaded from the server state (one module reused as a buffer)."""
        if self._net is None:  # on the server's device, where the client models it mixes live
            self._net = LayerWeights(self.ctx.num_clients, len(self.layers), self.hp.embed_dim,
                                     self.hp.hidden_dim).to(self.ctx.device)
        self._net.load_state_dict(under(server, f"hn/{cid}"))
        return self._net

    def aggregated(self, server: State, net: LayerWeights, cid: int) -> dict[str, torch.Tensor]:
        """θ̄_cid, differentiable in ``net``'s parameters."""
        n = self.ctx.num_clients
        out = {}
        for name, alpha in zip(self.layers, net(cid)):
            if float(alpha.detach().sum()) == 0:  # no weight left on any client: keep the client's own layer
                alpha = F.one_hot(torch.tensor(cid, device=alpha.device), n).to(alpha.dtype)
            w = alpha / alpha.sum()
            stack = torch.stack([server[f"client/{j}/{name}"] for j in range(n)], dim=-1)
            out[name] = (stack * w).sum(-1)
        return out

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        model = {n: p.detach().clone() for n, p in self.ctx.build_model().named_parameters()}
        state: State = {}
        for j in range(self.ctx.num_clients):
            state |= with_prefix(model, f"client/{j}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.ctx.seed, "pfedla", j))
                net = LayerWeights(self.ctx.num_clients, len(self.layers), self.hp.embed_dim, self.hp.hidden_dim)
            state |= with_prefix({k: v.detach().clone() for k, v in net.state_dict().items()}, f"hn/{j}")
        return state

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in self.aggregated(server, self.hypernet(server, cid), cid).items()}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        out = dict(server)
        for u in sorted(updates, key=lambda u: u.cid):
            delta = under(u.upload, "delta")
            net = self.hypernet(server, u.cid)  # the models as they were when the round's messages were made
            agg = self.aggregated(server, net, u.cid)
            params = list(net.parameters())
            grads = hypernet_grads([agg[n] for n in self.layers], params, [delta[n] for n in self.layers])
            sgd_momentum_step(params, grads, None, self.hp.hn_lr)
            out |= with_prefix({k: v.detach().clone() for k, v in net.state_dict().items()}, f"hn/{u.cid}")
            out |= {f"client/{u.cid}/{n}": server[f"client/{u.cid}/{n}"] - delta[n].to(server[f"client/{u.cid}/{n}"].dtype)
                    for n in self.layers}
        return out

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt) -> State:
        names = set(self.layers)
        return {k: v for k, v in rt.initial_params().items() if k not in names}  # buffers only

    def local_update(self, rt, msg: Message, state: State) -> Update:
        sent = model_entries(msg)
        rt.load({**sent, **model_entries(state)})
        stats = rt.train()
        trained = rt.model_state()
        delta = {f"delta/{n}": (sent[n].to(trained[n].device) - trained[n]).detach() for n in self.layers}
        return Update(delta, {k: v for k, v in trained.items() if k not in self.layers}, rt.num_train, stats.as_dict())
