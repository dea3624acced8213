"""CCVR — Luo, Chen, Hu, Zhang, Liang & Feng, "No Fear of Heterogeneity: Classifier Calibration for Federated
Learning with Non-IID Data", NeurIPS 2021.

FedAvg trains the global model w = (φ, h). Classifier Calibration with Virtual Representations then fixes the
classifier h, which non-IID data biases most: each client k sends, for every class c it holds, the count n_kc, mean
μ_kc and unbiased covariance Σ_kc of its features φ(x); the server pools them into the global statistics

    μ_c = Σ_k (n_kc / N_c) μ_kc
    Σ_c = Σ_k (n_kc − 1)/(N_c − 1) Σ_kc + Σ_k n_kc/(N_c − 1) μ_kc μ_kcᵀ − N_c/(N_c − 1) μ_c μ_cᵀ

draws ``samples_per_class`` virtual features per class from N(μ_c, Σ_c) and retrains h alone on them with
cross-entropy (SGD, the run's learning rate and batch size, ``calibration_epochs`` passes).

Protocol here. The statistics must be of the model being calibrated, so each client computes them (eval mode, before
training) on the global model it receives in round t and sends them with its FedAvg update; the server then averages
the models as FedAvg (w^{t+1}) and calibrates the classifier of w^t (FL-bench does the same calibration before every
test, after an extra exchange). ``global_acc`` is that calibrated model — the body of w^t with the calibrated
classifier, the model CCVR outputs — and ``uncalibrated_acc`` is FedAvg's w^{t+1} (so at round t it equals FedAvg's
``global_acc``, and the calibrated model lags it by the one round its statistics take). Training is FedAvg's,
step for step; with ``samples_per_class = 0`` the judged model is w^t itself (tested). The statistics cost d² + d + 1
floats per class and client each round.

Defaults: FL-bench's 200 virtual features per class and one calibration pass (the paper draws a number per class
proportional to its share and tunes the calibration steps). FL-bench's clients send the biased covariance (1/n) into
the pooling formula above, which assumes the unbiased one; here the pooled Σ_c equals the covariance of the union of
the clients' features exactly (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.algorithm import Update, register_algorithm
from ..core.context import derive_seed
from ..core.messages import Message, State, model_entries, under, weighted_average, with_prefix
from ..core.params import HyperParams, hp
from ..core.training import train_loop
from .fedavg import FedAvg
from .mechanics import is_head, train_features


@dataclass(frozen=True)
class CCVRParams(HyperParams):
    samples_per_class: int = hp(200, "virtual features drawn per class to calibrate the classifier (0: no calibration)", ge=0)
    calibration_epochs: int = hp(1, "passes of SGD over the virtual features", ge=1)


def class_statistics(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> Message:
    """``stat/count|mean|cov/<c>`` of features ``z`` (n, d) for every class present in ``y`` (unbiased covariance,
    1/(n − 1); zero for a single sample)."""
    out: Message = {}
    for c in torch.unique(y).tolist():
        zc = z[y == c].double()
        mu = zc.mean(0)
        out[f"stat/count/{c}"] = torch.tensor(float(zc.shape[0]), dtype=torch.float64, device=z.device)
        out[f"stat/mean/{c}"] = mu.float()
        out[f"stat/cov/{c}"] = ((zc - mu).T @ (zc - mu) / max(zc.shape[0] - 1, 1)).float()
    return out


def pooled_statistics(uploads: list[Message]) -> dict[int, tuple[float, torch.Tensor, torch.Tensor]]:
    """Per class (N_c, μ_c, Σ_c) pooled from the clients' statistics (Σ_c the unbiased covariance of the union)."""
    out = {}
    classes = sorted({int(k.split("/")[-1]) for u in uploads for k in u if k.startswith("stat/count/")})
    for c in classes:
        parts = [(float(u[f"stat/count/{c}"]), u[f"stat/mean/{c}"].double(), u[f"stat/cov/{c}"].double())
                 for u in uploads if f"stat/count/{c}" in u]
        N = sum(n for n, _, _ in parts)
        mu = sum(n * m for n, m, _ in parts) / N
        if N > 1:
            cov = sum((n - 1) / (N - 1) * S + n / (N - 1) * torch.outer(m, m) for n, m, S in parts)
            cov = cov - N / (N - 1) * torch.outer(mu, mu)
        else:
            cov = torch.zeros(mu.numel(), mu.numel(), dtype=torch.float64, device=mu.device)
        out[c] = (N, mu, cov)
    return out


def sample_gaussian(mu: torch.Tensor, cov: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws from N(μ, Σ) for a positive semi-definite Σ (through its eigendecomposition, so singular Σ is fine)."""
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    eps = torch.randn(n, mu.numel(), generator=gen, dtype=torch.float64, device=gen.device).to(mu.device)
    return mu + (eps * vals.clamp_min(0).sqrt()) @ vecs.T


@register_algorithm("ccvr", summary="CCVR (Luo et al., NeurIPS 2021): FedAvg, classifier calibrated on virtual features from pooled class statistics")
class CCVR(FedAvg):
    paper = ("Luo, Chen, Hu, Zhang, Liang & Feng, No Fear of Heterogeneity: Classifier Calibration for Federated "
             "Learning with Non-IID Data, NeurIPS 2021")
    Params = CCVRParams
    vectorizable = False  # the update also carries feature statistics

    # ----------------------------------------------------------------------------------------- server
    def init_server(self) -> State:
        model = super().init_server()
        return {**model, **with_prefix(model, "calibrated")}

    def broadcast(self, server: State, cid: int, rnd: int) -> Message:
        return model_entries(server)

    def eval_message(self, server: State, cid: int) -> Message:
        return dict(server)

    def calibrate(self, model: State, stats: dict, rnd: int) -> State:
        """``model`` with its classifier retrained on virtual features drawn from the pooled statistics."""
        if self.hp.samples_per_class == 0 or not stats:
            return model
        dev = next(iter(stats.values()))[1].device  # the server's device: the calibration runs there
        gen = torch.Generator(device=dev).manual_seed(derive_seed(self.ctx.seed, rnd, "ccvr"))
        z = torch.cat([sample_gaussian(mu, cov, self.hp.samples_per_class, gen).float() for _, mu, cov in stats.values()])
        y = torch.cat([torch.full((self.hp.samples_per_class,), c, dtype=torch.long, device=dev) for c in stats])
        net = self.ctx.build_model().to(dev)
        net.load_state_dict(model)
        bs = self.ctx.batch_size
        for _ in range(self.hp.calibration_epochs):
            order = torch.randperm(len(y), generator=gen, device=dev)
            batches = [(z[order[i:i + bs]], y[order[i:i + bs]]) for i in range(0, len(y), bs)]
            train_loop(net, batches, self.ctx.lr, params=list(net.head.parameters()),
                       loss_fn=lambda m, x, t: F.cross_entropy(m.head(x), t))
        return {**model, **{k: v.detach().clone() for k, v in net.state_dict().items() if is_head(k)}}

    def aggregate(self, server: State, updates: list[Update], rnd: int) -> State:
        if not updates:
            return server
        current = model_entries(server)
        avg = weighted_average([model_entries(u.upload) for u in updates], [u.weight for u in updates])
        calibrated = self.calibrate(current, pooled_statistics([u.upload for u in updates]), rnd)
        return {**avg, **with_prefix(calibrated, "calibrated")}

    # ----------------------------------------------------------------------------------------- client
    def local_update(self, rt, msg: Message, state: State) -> Update:
        rt.load(model_entries(msg))
        z, y = train_features(rt)
        stats = class_statistics(z.cpu(), y.cpu(), self.ctx.num_classes)
        upd = super().local_update(rt, msg, state)
        return Update({**upd.upload, **stats}, upd.state, upd.weight, upd.metrics)

    def evaluate(self, rt, msg: Message, state: State):
        rt.load(under(msg, "calibrated"))
        out = {"global": rt.evaluate()}
        rt.load(model_entries(msg))
        out["uncalibrated"] = rt.evaluate()
        return out
