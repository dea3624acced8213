"""FedPCL — Tan, Long, Liu, Zhou, Lu, Jiang & Zhang, "Federated Learning from Pre-Trained Models: A Contrastive
Learning Approach", NeurIPS 2022 (without the pre-trained backbones, as in PFLlib: the whole extractor is trained).

Clients exchange class prototypes only. With r = φ(x)/‖φ(x)‖ the normalised feature, a client's prototype of
class c is the mean of r over its samples of c; the server's global prototype ḡ_c is the mean of the round's
client prototypes of c. Client k then trains φ on a prototype-wise contrastive loss against the global prototypes
and against every client's prototypes (a client's missing classes, and clients that never reported, are filled in
with the global prototypes):

    L(x, y) = CE(r · Gᵀ / τ, y) + (1/N) Σ_j CE(r · P_jᵀ / τ, y),     G = [ḡ_c]_c,  P_j = [p_{j,c}]_c,

clipping the gradient norm to ``max_grad_norm``; inference picks the class of the client's own prototype with the
largest r · p_{k,c}. In the first round there are no global prototypes yet: clients only report the prototypes of
the initial model. Every client may own a different architecture as long as the feature dimension is shared.

Defaults: τ = 0.07, the paper's temperature (the authors' ``ConLoss(temperature=0.07)``; PFLlib ships ``-tau 1``);
the gradient-norm clip at 10 is PFLlib's (the authors train frozen pre-trained backbones, where it is not needed).

Deliberate differences from PFLlib (``clientpcl.py``/``serverpcl.py``): similarity columns are in class order
(PFLlib stacks prototypes in the order their classes were first seen, so the cross-entropy targets index the wrong
columns unless that order happens to be 0 … C−1); a class without a global prototype is left out of the softmax
(PFLlib fails then); at inference the classes without a local prototype score lowest (PFLlib scores them 0); a client
evaluated before it has prototypes uses those of its current model (PFLlib reports 0 accuracy); prototypes average
every training sample in eval mode (PFLlib: a shuffled pass that drops the last incomplete batch). The authors' loss is a
supervised contrastive loss over two augmented views; here, as in PFLlib, one view and a prototype cross-entropy.
With PFLlib's prototypes in class order and over every sample, and every class held by a client, two rounds equal
PFLlib's (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedpcl]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from .mechanics import (
    average_prototypes,
    collect_prototypes,
    is_body,
    message_to_prototypes,
    named_params,
    prototype_matrix,
    prototypes_to_message,
    require_common_feature_dim,
)

GLOBAL, CLIENT, OWN = "gproto", "cproto", "proto"


@dataclass(frozen=True)
class FedPCLParams(HyperParams):
    tau: float = hp(0.07, "temperature τ of the prototype-contrastive cross-entropy", gt=0)
    max_grad_norm: float = hp(10.0, "clip of the gradient norm in local training (PFLlib's guard against divergence)", gt=0)


def contrastive_loss(r: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over the prototype sets ``protos`` (S, C, d) of CE(r · P_sᵀ / τ, y); classes not ``valid`` are left out
    of the softmax and samples of such a class out of the mean (0 when no sample is left)."""
    keep = valid[y]
    if not bool(keep.any()):
        return r.sum() * 0.0
    r, y = r[keep], y[keep]
    sims = torch.einsum("bd,scd->sbc", r, protos) / tau
    sims = sims.masked_fill(~valid.view(1, 1, -1), float("-inf"))
    return torch.stack([F.cross_entropy(s, y) for s in sims]).mean()


@register_algorithm("fedpcl", summary="FedPCL (Tan et al., NeurIPS 2022): prototype-contrastive training against global and every client's prototypes")
class FedPCL(Algorithm):
    paper = ("Tan, Long, Liu, Zhou, Lu, Jiang & Zhang, Federated Learning from Pre-Trained Models: A Contrastive "
             "Learning Approach, NeurIPS 2022")
    Params = FedPCLParams
    personalized = True
    has_global = False
    heterogeneous = True

    def __init__(self, hp: FedPCLParams, ctx):
        super().__init__(hp, ctx)
        self.feature_dim = require_common_feature_dim(ctx, self.name)

    # ----------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        return {}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    def eval_message(self, server: State, cid: int) -> Message:
        return {}  # a client is judged with its own state alone

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        out = {k: v for k, v in server.items() if not k.startswith(GLOBAL + "/")}
        glob = average_prototypes([u.upload for u in updates], OWN)
        out.update({f"{GLOBAL}/{c}": v for c, v in glob.items()})
        for u in updates:
            out = {k: v for k, v in out.items() if not k.startswith(f"{CLIENT}/{u.cid}/")}
            out.update(with_prefix(u.upload, f"{CLIENT}/{u.cid}"))
        return out

    def prototype_sets(self, msg: Message, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + N, C, d) prototype sets — the global one, then every client's filled in with it — and the (C,) mask
        of classes with a global prototype."""
        c, d = self.ctx.num_classes, self.feature_dim
        g, valid = prototype_matrix(message_to_prototypes(msg, c, GLOBAL), c, d)
        g, valid = g.to(device), valid.to(device)
        sets = [g]
        for k in range(self.ctx.num_clients):
            p = g.clone()
            for cls, v in message_to_prototypes(under(msg, f"{CLIENT}/{k}"), c, OWN).items():
                p[cls] = v.to(device).float()
            sets.append(p)
        return torch.stack(sets), valid

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt) -> State:
        return rt.initial_params()

    @staticmethod
    def normalized(model):
        return lambda x: F.normalize(model.features(x), dim=1)

    def local_update(self, rt, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        if any(k.startswith(GLOBAL + "/") for k in msg):
            sets, valid = self.prototype_sets(msg, rt.device)
            tau = self.hp.tau

            def loss_fn(model, x, y):  # L_g (the global set) + L_p (the mean over the clients' sets)
                r = F.normalize(model.features(x), dim=1)
                return contrastive_loss(r, y, sets[:1], valid, tau) + contrastive_loss(r, y, sets[1:], valid, tau)

            stats = rt.train(loss_fn=loss_fn, params=named_params(rt.model, is_body), max_grad_norm=self.hp.max_grad_norm)
            metrics = stats.as_dict()
        else:  # first round: only report the prototypes of the initial model
            metrics = {"loss": 0.0, "samples": 0, "steps": 0}
        protos, counts = collect_prototypes(rt, features=self.normalized(rt.model))
        own = prototypes_to_message(protos, counts, OWN)
        return Update(own, {**rt.model_state(), **own}, rt.num_train, metrics)

    def evaluate(self, rt, msg: Message, state: State):
        rt.load(model_entries(state))
        model = rt.model
        own = message_to_prototypes(state, self.ctx.num_classes, OWN)
        if not own:
            protos, counts = collect_prototypes(rt, features=self.normalized(model))
            own = message_to_prototypes(prototypes_to_message(protos, counts, OWN), self.ctx.num_classes, OWN)
        P, mask = prototype_matrix(own, self.ctx.num_classes, self.feature_dim)
        P, mask = P.to(rt.device), mask.to(rt.device)

        def predict(x):
            scores = F.normalize(model.features(x), dim=1) @ P.T
            return torch.where(mask, scores, scores.detach().min() - 50.0)

        return {"personalized": rt.evaluate(predict)}
