"""pFedHN — Shamsian, Navon, Fetaya & Chechik, "Personalized Federated Learning using Hypernetworks", ICML 2021.

The server holds a hypernetwork h(·; φ) and one embedding v_i per client; it *generates* each client's model,
θ_i = h(v_i; φ) (an MLP on v_i followed by one linear head per weight tensor). Client i trains θ_i locally to θ̃_i
and sends back Δθ_i = θ_i − θ̃_i; the server treats Δθ_i as the gradient of the client's loss at θ_i and
back-propagates it through the hypernetwork (chain rule):

    φ   ← φ   − β (∇_φ θ_i)ᵀ Δθ_i
    v_i ← v_i − β (∇_{v_i} θ_i)ᵀ Δθ_i

with SGD (momentum 0.9, weight decay 1e-3, gradient norm clipped at 50, as the authors' code). A client is judged
with its generated model h(v_i; φ); there is no global model. Only parameters are generated: buffers (e.g. BatchNorm
statistics) stay on the client, in its state.

Defaults are the paper's: embedding dimension ⌊(1 + N)/4⌋, hidden width 100, 3 hidden layers, β = 1e-2.
The paper trains one client per round; with several clients per round they all train from the models generated at
the start of the round and the server then takes one step per client, in client order, each through the
hypernetwork as the previous step left it (FL-bench instead trains them one after another). The hypernetwork and its
momentum live in the server state (``hn/...``, ``hn_mom/...``). pFedHN-PC (personal classifiers) is not included.

Initialisation (the paper does not state it): the authors' code and FL-bench keep PyTorch's default for the linear
heads, which generates weights far larger than the architecture's own initialisation (on the 4-layer CNN the second
convolution's norm is 26 against about 4.5) and diverges at a learning rate of 0.05 on `digits`. Here each head's bias
starts at the architecture's initial tensor and its weight is scaled so that the client-dependent part has a tenth of
that tensor's spread: every client starts near the usual initial model, and the embeddings set them apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under
from ..core.params import HyperParams, hp
from .mechanics import hypernet_grads, sgd_momentum_step

INIT_SPREAD = 0.1  # client-dependent part of a generated tensor at the start, relative to its usual initial spread


@dataclass(frozen=True)
class PFedHNParams(HyperParams):
    hn_lr: float = hp(1e-2, "β: SGD rate of the hypernetwork and of the client embeddings (0: nothing is learned)", ge=0)
    embed_dim: int = hp(0, "client embedding dimension (0: the paper's ⌊(1 + N)/4⌋, at least 1)", ge=0)
    hidden_dim: int = hp(100, "width of the hypernetwork's hidden layers", ge=1)
    hidden_layers: int = hp(3, "hidden layers of the hypernetwork's MLP", ge=1)
    momentum: float = hp(0.9, "momentum of the hypernetwork's SGD", ge=0, lt=1)
    weight_decay: float = hp(1e-3, "L2 weight decay of the hypernetwork's SGD", ge=0)
    max_grad_norm: float = hp(50.0, "clip norm of the hypernetwork's gradient", gt=0)


class HyperNetwork(nn.Module):
    """v_i = embedding(i) → MLP → one linear head per generated tensor (reshaped to that tensor)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_clients: int, embed_dim: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(num_clients, embed_dim)
        mlp: list[nn.Module] = [nn.Linear(embed_dim, hidden)]
        for _ in range(layers - 1):
            mlp += [nn.ReLU(), nn.Linear(hidden, hidden)]
        self.mlp = nn.Sequential(*mlp)
        self.names = list(shapes)
        self.shapes = shapes
        self.heads = nn.ModuleList(nn.Linear(hidden, int(torch.Size(s).numel())) for s in shapes.values())

    def forward(self, cid: int) -> dict[str, torch.Tensor]:
        h = self.mlp(self.embedding.weight[cid])
        return {n: head(h).reshape(self.shapes[n]) for n, head in zip(self.names, self.heads)}


@register_algorithm("pfedhn", summary="pFedHN (Shamsian et al., ICML 2021): a server hypernetwork generates each client's model from its embedding")
class PFedHN(Algorithm):
    paper = "Shamsian, Navon, Fetaya & Chechik, Personalized Federated Learning using Hypernetworks, ICML 2021"
    Params = PFedHNParams
    personalized = True
    has_global = False

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        model = ctx.build_model()
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.embed_dim = hp.embed_dim or max(1, (1 + ctx.num_clients) // 4)

    def hypernet(self, server: State | None = None) -> HyperNetwork:
        """A fresh hypernetwork (``server`` None), or the one in the server state (one module reused as a buffer,
        loaded from ``server`` on every call: the state is the server state, never this object)."""
        if server is None:
            return HyperNetwork(self.shapes, self.ctx.num_clients, self.embed_dim, self.hp.hidden_dim,
                                self.hp.hidden_layers)
        if getattr(self, "_net", None) is None:
            self._net = self.hypernet()
        self._net.load_state_dict(under(server, "hn"))
        return self._net

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.ctx.seed, "pfedhn-init"))
            net = self.hypernet()
        init = dict(self.ctx.build_model().named_parameters())
        with torch.no_grad():
            h = net.mlp(net.embedding.weight)  # (N, hidden)
            for n, head in zip(net.names, net.heads):
                target = init[n].detach().reshape(-1)
                spread = (h @ head.weight.T).std()
                head.weight.mul_(INIT_SPREAD * target.std() / spread if target.numel() > 1 else 0.0)
                head.bias.copy_(target)
        state = {f"hn/{k}": v.detach().clone() for k, v in net.state_dict().items()}
        return state | {f"hn_mom/{n}": torch.zeros_like(p) for n, p in net.named_parameters()}  # SGD momentum buffers

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in self.hypernet(server)(cid).items()}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        net = self.hypernet(server)
        params = list(net.parameters())
        names = [n for n, _ in net.named_parameters()]
        bufs = [server[f"hn_mom/{n}"].clone() for n in names]
        for u in sorted(updates, key=lambda u: u.cid):
            gen = net(u.cid)
            delta = under(u.upload, "delta")
            grads = hypernet_grads([gen[n] for n in net.names], params, [delta[n] for n in net.names])
            bufs = sgd_momentum_step(params, grads, bufs, self.hp.hn_lr, self.hp.momentum, self.hp.weight_decay,
                                     self.hp.max_grad_norm)
        out = {**server, **{f"hn/{k}": v.detach().clone() for k, v in net.state_dict().items()}}
        return out | ({f"hn_mom/{n}": b for n, b in zip(names, bufs)} if bufs is not None else {})

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt) -> State:
        names = set(self.shapes)
        return {k: v for k, v in rt.initial_params().items() if k not in names}  # buffers only (none for most models)

    def local_update(self, rt, msg: Message, state: State) -> Update:
        sent = model_entries(msg)
        rt.load({**sent, **model_entries(state)})
        stats = rt.train()
        trained = rt.model_state()
        delta = {f"delta/{n}": (sent[n].to(trained[n].device) - trained[n]).detach() for n in self.shapes}
        kept = {k: v for k, v in trained.items() if k not in self.shapes}
        return Update(delta, kept, rt.num_train, stats.as_dict())

    def personal_params(self, msg: Message, state: State) -> Message:
        return {**model_entries(msg), **model_entries(state)}
