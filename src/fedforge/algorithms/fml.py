"""FML — Shen et al., "Federated Mutual Learning", arXiv:2006.16765, 2020.

Every client owns a private model (any architecture) and a copy of a small shared "meme" model that is averaged
as in FedAvg. On each batch both are trained together by deep mutual learning:

    private   L_loc  = α · CE(p_loc, y) + (1 − α) · KL(p_meme ‖ p_loc)
    meme      L_meme = β · CE(p_meme, y) + (1 − β) · KL(p_loc ‖ p_meme)
    server    θ_meme ← Σ_k (n_k / n) · θ_meme,k

(each KL treats the other model's prediction as a fixed target). Uploads and downloads are the meme's weights
(``meme/*``). A client is judged with its private model (``personalized``); the meme is judged on every client's
test data as the ``global`` model.

The meme architecture is ``shared_model`` (default: the first architecture of the group, as HtFLlib uses
``models[0]`` when a group defines no global model). α = β = 0.5 as in the paper and HtFLlib's benchmark script
(HtFLlib's argparse default α = β = 1 switches mutual learning off). Unlike HtFLlib, the meme is averaged with
sample weights (FedAvg, as the paper) and no gradient clipping is added (HtFLlib clips each model's gradient norm at
10); and each KL is the batch mean of KL against the other model's fixed prediction, where HtFLlib's
``nn.KLDivLoss()`` takes the mean over batch × classes (1/C of the KL) and passes gradients into the other model's
prediction as well. With those three substituted, one round equals HtFLlib's
(``tests/reference/test_htfllib_equivalence.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F

from ..core.algorithm import Algorithm, Update, register_algorithm
from ..core.messages import Message, State, model_entries, under, with_prefix
from ..core.params import HyperParams, hp
from ..errors import ConfigError
from ..models import MODELS
from .mechanics import kl_distill

if TYPE_CHECKING:
    from ..core.runtime import ClientRuntime


@dataclass(frozen=True)
class FMLParams(HyperParams):
    alpha: float = hp(0.5, "α: weight of CE in the private model's loss (1 − α on the KL to the meme)", ge=0, le=1)
    beta: float = hp(0.5, "β: weight of CE in the meme's loss (1 − β on the KL to the private model)", ge=0, le=1)
    shared_model: str = hp("", "registry name of the shared meme model (empty: the first architecture of the group)")


@register_algorithm("fml", summary="FML (Shen et al., 2020): private models and a shared meme model trained by mutual learning")
class FML(Algorithm):
    paper = "Shen et al., Federated Mutual Learning, arXiv:2006.16765, 2020"
    Params = FMLParams
    personalized = True
    has_global = True
    heterogeneous = True

    TAG = "fml-meme"

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.meme_arch = hp.shared_model or ctx.archs[0]
        if self.meme_arch not in MODELS:
            raise ConfigError(f"fml: shared_model '{hp.shared_model}' is not a registered model; see `fedforge list models`.")

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        return with_prefix(self.ctx.build_model(self.meme_arch).state_dict(), "meme")

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return dict(server)

    # ----------------------------------------------------------------------------------------- client
    def init_client(self, rt: ClientRuntime) -> State:
        return rt.initial_params()

    def _meme(self, rt: ClientRuntime, msg: Message):
        meme = rt.aux_model(self.TAG, self.meme_arch)
        rt.load(under(msg, "meme"), model=meme)
        return meme

    def local_update(self, rt: ClientRuntime, msg: Message, state: State) -> Update:
        rt.load(model_entries(state))
        meme = self._meme(rt, msg)
        meme.train()
        a, b = float(self.hp.alpha), float(self.hp.beta)

        def loss_fn(model, x, y):
            out, out_m = model(x), meme(x)
            private = a * F.cross_entropy(out, y) + (1 - a) * kl_distill(out, out_m)
            shared = b * F.cross_entropy(out_m, y) + (1 - b) * kl_distill(out_m, out)
            return private + shared

        params = [p for p in rt.model.parameters()] + [p for p in meme.parameters()]
        stats = rt.train(loss_fn=loss_fn, params=params)
        return Update(with_prefix(rt.model_state(meme), "meme"), rt.model_state(), rt.num_train, stats.as_dict())

    def personal_params(self, msg: Message, state: State) -> Message:
        return model_entries(state)

    def evaluate(self, rt: ClientRuntime, msg: Message, state: State):
        meme = self._meme(rt, msg)
        out = {"global": rt.evaluate(model=meme)}
        rt.load(model_entries(state))
        out["personalized"] = rt.evaluate()
        return out
