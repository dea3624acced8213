"""FedGC — Niu & Deng, "Federated Learning for Face Recognition with Gradient Correction", AAAI 2022.

Each client owns the classifier rows (class embeddings) of its own classes only and never sees the others'; the
shared feature extractor φ is averaged as in FedAvg. Because a client's softmax never contrasts its classes with
anyone else's, the server corrects the class embeddings with a softmax regulariser that pushes every client's rows
away from the embeddings of classes it does not hold. In round t

    client k:  (φ_k, W_k) ← SGD on CE over its own classes C_k:  softmax over {w_c · φ(x) + b_c : c ∈ C_k}
    server:    φ^{t+1} = Σ_k (n_k / n) φ_k;
               e_c = mean of the rows w_{k,c} over the clients k that hold c            (held fixed)
               Reg = Σ_k Σ_{c ∈ C_k} −log[ exp(e_c·e_c) / (exp(e_c·e_c) + Σ_{j: c ∉ C_j} Σ_{r ∈ C_j} exp(w_{j,r}·e_c)) ]
               W_j ← W_j − η·λ · ∇_{W_j} Reg   for every client j the server holds rows of (η: the run's rate)

and client k receives φ^{t+1} and its corrected rows W_k. A client is judged with φ and its own rows (the scores
of classes it does not hold are left out). λ = 1 is PFLlib's default (``-lam 1.0``, server rate = local rate); the
paper's face-recognition setting does not transfer. With λ = 0 there is no correction.

The model keeps its full head (one row per class); a client's rows of classes it does not hold are never used or
changed. The server keeps every client's head (``head/<cid>/...``) and class mask from its uploads.

Deliberate differences from PFLlib (``clientgc.py``/``servergc.py``): the regulariser is computed in log-sum-exp
form (PFLlib's exp(e·e) overflows once ‖e‖² > 88); the head keeps its bias, trained locally but not corrected
(PFLlib's FedGC heads have no bias); test samples of classes the client does not hold count as errors (PFLlib maps
them to its first class); only clients that have uploaded take part in the correction (PFLlib knows every client's
classes and initial rows from the start, which only matters before every client has taken part once). PFLlib
finds a client's classes in one shuffled pass of its drop_last loader, so a class whose few samples all fall in the
dropped last batch is missed, and its samples are then trained as the client's first class (``index_classes``
defaults to 0); here a client's classes are those of all its training samples. With the bias aligned, one round's
client and server steps equal PFLlib's (``tests/reference/test_pfllib_step.py``, ``test_step_equivalence[fedgc]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp
from ..errors import ConfigError
from .mechanics import is_body, is_head, select

HEADS, CLASSES = "head", "classes"


@dataclass(frozen=True)
class FedGCParams(HyperParams):
    lam: float = hp(1.0, "server step on the class embeddings as a multiple λ of the local learning rate (0: no correction)", ge=0)


def correction_loss(weights: list[torch.Tensor], holds: list[torch.Tensor]) -> torch.Tensor:
    """FedGC's server regulariser for the clients' (C, d) class-embedding matrices ``weights`` and (C,) masks ``holds``
    of the classes each holds; differentiable in ``weights`` (the class means e_c are held fixed)."""
    w = torch.stack(weights)  # (K, C, d)
    m = torch.stack(holds).to(w.device)  # (K, C)
    count = m.sum(0)  # holders per class
    e = (w.detach() * m.unsqueeze(2)).sum(0) / count.clamp(min=1).unsqueeze(1)  # (C, d)
    total = w.sum() * 0.0
    for c in torch.nonzero(count > 0).flatten().tolist():
        others = ~m[:, c]  # the clients that do not hold c
        self_sim = e[c] @ e[c]
        if bool(others.any()):
            rows = w[others][m[others]]  # every own-class row of those clients
            log_b = torch.logsumexp(rows @ e[c], 0)
            term = torch.logaddexp(self_sim, log_b) - self_sim
        else:
            term = self_sim * 0.0
        total = total + count[c] * term  # one term per holder of c
    return total


@register_algorithm("fedgc", summary="FedGC (Niu & Deng, AAAI 2022): clients train their own classes' rows; the server pushes rows apart across clients")
class FedGC(Algorithm):
    paper = "Niu & Deng, Federated Learning for Face Recognition with Gradient Correction, AAAI 2022"
    Params = FedGCParams
    personalized = True
    has_global = False

    def __init__(self, hp: FedGCParams, ctx):
        super().__init__(hp, ctx)
        head = dict(ctx.build_model().head.named_parameters())
        w = head.get("weight")
        if w is None or w.dim() != 2 or w.shape[0] != ctx.num_classes:
            raise ConfigError(f"fedgc corrects the rows of a linear classifier, but model '{ctx.archs[0]}' has no head "
                              f"whose 'weight' is a (classes × features) matrix; use a model with a linear head, such as "
                              f"cnn, mlp or resnet18.")

    # ----------------------------------------------------------------------------------- server side
    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return {**select(model_entries(server), is_body), **with_prefix(under(server, f"{HEADS}/{cid}"), HEADS)}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        out = dict(server)
        out.update(weighted_average([select(model_entries(u.upload), is_body) for u in updates], [u.weight for u in updates]))
        for u in updates:
            out.update(with_prefix(select(model_entries(u.upload), is_head), f"{HEADS}/{u.cid}"))
            out[f"{CLASSES}/{u.cid}"] = u.upload[CLASSES]
        if self.hp.lam > 0:
            self.correct(out)
        return out

    def correct(self, server: State) -> None:
        """One gradient step of the correction regulariser on every known client's class embeddings (in place)."""
        cids = sorted(int(k.split("/")[1]) for k in server if k.startswith(CLASSES + "/"))
        weights = [server[f"{HEADS}/{c}/head.weight"].detach().clone().requires_grad_(True) for c in cids]
        holds = [server[f"{CLASSES}/{c}"].bool() for c in cids]
        loss = correction_loss(weights, holds)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        step = self.ctx.lr * self.hp.lam
        for c, w, g in zip(cids, weights, grads):
            if g is not None:
                server[f"{HEADS}/{c}/head.weight"] = (w - step * g).detach()

    # ----------------------------------------------------------------------------------- client side
    def client_model(self, rt, msg: Message) -> Message:
        head = under(msg, HEADS) or select(rt.initial_params(), is_head)
        return {**select(model_entries(msg), is_body), **head}

    def local_update(self, rt, msg: Message, state: State) -> Update:
        rt.load(self.client_model(rt, msg))
        absent = (rt.class_counts() == 0).to(rt.device)

        def loss_fn(model, x, y):
            return F.cross_entropy(model(x).masked_fill(absent, float("-inf")), y)

        stats = rt.train(loss_fn=loss_fn)
        upload = {**rt.model_state(), CLASSES: (~absent).to(torch.uint8)}
        return Update(upload, {}, rt.num_train, stats.as_dict())

    def evaluate(self, rt, msg: Message, state: State):
        rt.load(self.client_model(rt, msg))
        model = rt.model
        absent = (rt.class_counts() == 0).to(rt.device)
        if bool(absent.all()):
            return {"personalized": rt.evaluate()}
        def predict(x):  # the classes the client does not hold score lowest (finite, so the loss stays finite)
            logits = model(x)
            return torch.where(absent, logits.detach().min() - 50.0, logits)

        return {"personalized": rt.evaluate(predict)}
