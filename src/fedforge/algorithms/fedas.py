"""FedAS — Yang, Huang & Ye, "FedAS: Bridging Inconsistency in Personalized Federated Learning", CVPR 2024.

Clients share a feature extractor φ and keep their own heads h_k. FedAS adds two alignments to this split:

* parameter alignment (client side): before adopting the received global extractor φ^t, client k fits it to its
  own feature space. With p_c the mean feature of class c under the client's current extractor φ_k (its local
  prototypes), it runs ``align_epochs`` of SGD (rate ``align_lr``, batches of ``align_batch_size``) on

      L_align(φ) = Σ_{c in the batch} MSE(φ(x_{y=c}), p_c),

  then uses the aligned φ as its extractor, trains (φ, h_k) on cross-entropy for the run's local epochs and uploads φ;
* client synchronisation (server side): the uploaded extractors are averaged with weights proportional to the
  trace of each client's Fisher information after training, estimated as Σ_batches ‖∇_w NLL(batch)‖² over one pass
  of its training data (eval mode):  φ^{t+1} = Σ_k (F_k / Σ_j F_j) · φ_k.

A client is judged with (φ_k, h_k), the model it trained last (as PFLlib does; FedPer judges a client with the
current global extractor and its own head). With ``align_epochs = 0`` and ``fim_weighting = false`` the server's
extractor is FedPer's exactly. The defaults are the authors' (their code is PFLlib's ``clientas.py``: one alignment epoch at
rate 0.01 with batches of 16).

Deliberate differences from PFLlib (``clientas.py``/``serveras.py``): only the extractor is uploaded and averaged
(PFLlib uploads and averages whole models, but no client ever loads the averaged head); the Fisher trace is computed
by the round's clients only (PFLlib also computes it for every other client, and only prints it); prototypes are
class means over all the client's training samples in eval mode (PFLlib: a shuffled pass that drops the last
incomplete batch); when every trace is zero the average falls back to sample weights. With PFLlib's prototypes over
every sample, two rounds equal PFLlib's (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedas]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, weighted_average
from ..core.params import HyperParams, hp
from ..core.training import TrainStats
from .mechanics import collect_prototypes, is_body, named_params, select

FIM = "fim"


@dataclass(frozen=True)
class FedASParams(HyperParams):
    align_epochs: int = hp(1, "epochs aligning the received extractor to the local prototypes (0: no alignment)", ge=0)
    align_lr: float = hp(0.01, "learning rate of the alignment", gt=0)
    align_batch_size: int = hp(16, "batch size of the alignment", ge=1)
    fim_weighting: bool = hp(True, "weight the server average by the clients' Fisher-information traces (false: by samples)")


def alignment_loss(z: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Σ over the classes of the batch that have a prototype of the mean squared error between their features and it."""
    loss = z.sum() * 0.0
    for c in torch.unique(y).tolist():
        if bool(has[c]):
            loss = loss + F.mse_loss(z[y == c], protos[c].expand_as(z[y == c]))
    return loss


def fisher_trace(rt, batches) -> torch.Tensor:
    """Σ over batches of ‖∇_w mean NLL‖² of ``rt.model`` in eval mode (an estimate of the trace of its Fisher
    information), as a float64 scalar on the model's device."""
    model = rt.model
    was = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    try:
        for x, y in batches:
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
            for g in grads:
                if g is not None:
                    total += g.detach().double().pow(2).sum()
    finally:
        model.train(was)
    return total


@register_algorithm("fedas", summary="FedAS (Yang et al., CVPR 2024): extractor aligned to local prototypes before use; Fisher-weighted aggregation")
class FedAS(Algorithm):
    paper = "Yang, Huang & Ye, FedAS: Bridging Inconsistency in Personalized Federated Learning, CVPR 2024"
    Params = FedASParams
    personalized = True
    has_global = False

    # ----------------------------------------------------------------------------------- server side
    def init_server(self) -> State:
        return select(super().init_server(), is_body)

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return select(server, is_body)

    def eval_message(self, server: State, cid: int) -> Message:
        return {}  # a client is judged with its own state alone

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        weights = [u.weight for u in updates]
        if self.hp.fim_weighting:
            fims = [float(u.upload[FIM]) for u in updates]
            if sum(fims) > 0:
                weights = fims
        keys = [k for k in updates[0].upload if k != FIM]
        return {**server, **weighted_average([u.upload for u in updates], weights, keys)}

    # ----------------------------------------------------------------------------------- client side
    def init_client(self, rt) -> State:
        return rt.initial_params()

    def align(self, rt, glob: Message, state: State) -> TrainStats:
        """Load the client's model with the received extractor, fitted to the prototypes of the client's own extractor."""
        h = self.hp
        rt.load(model_entries(state))
        if h.align_epochs == 0:
            rt.load(glob)
            return TrainStats()
        protos, counts = collect_prototypes(rt)
        protos, has = protos.to(rt.device), (counts > 0).to(rt.device)
        rt.load(glob)

        def loss_fn(model, x, y):
            return alignment_loss(model.features(x), y, protos, has)

        batches = rt.batches(epochs=h.align_epochs, batch_size=h.align_batch_size)
        return rt.train(loss_fn=loss_fn, params=named_params(rt.model, is_body), lr=h.align_lr, batches=batches)

    def local_update(self, rt, msg: Message, state: State) -> Update:
        align = self.align(rt, select(msg, is_body), state)
        stats = rt.train()
        fim = fisher_trace(rt, rt.batches(epochs=1))
        model = rt.model_state()
        metrics = {**stats.as_dict(), "align_loss": align.loss, "fim_trace": float(fim)}
        return Update({**select(model, is_body), FIM: fim.float()}, model, rt.num_train, metrics)

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)
