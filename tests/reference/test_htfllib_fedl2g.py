"""Step equivalence of FedL2G with HtFLlib's own code (the oracle): same weights, same batches → same update.

HtFLlib's ``clientL2G.train``/``meta_study`` and ``FedL2G.aggregate_grads`` (feature and logit variants) run
unchanged on a stand-in object that holds the attributes they read; their file I/O (``load_item``/``save_item``) and
data loading are replaced by in-memory versions that hand over fixed batches. fedforge's functions that
``fedforge.algorithms.fedl2g.FedL2G`` composes (the shared SGD loop with the guided loss, the meta gradient, the
server's guide step) get the same weights and batches; the trained weights, the per-class meta gradients and the
updated guiding vectors must agree to 1e-5. HtFLlib is imported through ``htfllib_shim.import_isolated`` (its own
``flcore``, apart from PFLlib's). Skips when HtFLlib or ``higher`` (its meta-learning dependency) is absent.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fedforge.algorithms.fedl2g import FedL2G, client_loss, guide_step, meta_gradient
from fedforge.core.algorithm import Update
from fedforge.core.training import train_loop
from fedforge.data import load_dataset
from fedforge.models import create_model
from tests.reference.htfllib_shim import import_isolated, require_htfllib

pytest.importorskip("higher", reason="HtFLlib's FedL2G needs the `higher` package (pip install higher)")

L2G = ("flcore.clients.clientl2g_feat", "flcore.clients.clientl2g_logit",
       "flcore.servers.serverl2g_feat", "flcore.servers.serverl2g_logit")


@pytest.fixture(scope="module")
def oracle():
    """HtFLlib's FedL2G modules, imported with its own ``flcore`` (isolated from PFLlib's; see htfllib_shim)."""
    mods = import_isolated(require_htfllib(), L2G)
    return {("client", t): mods[f"flcore.clients.clientl2g_{t}"] for t in ("feat", "logit")} | \
        {("server", t): mods[f"flcore.servers.serverl2g_{t}"] for t in ("feat", "logit")}


LR, BS, EPOCHS, SLR = 0.05, 10, 2, 0.5


class BaseHead(nn.Module):
    """HtFLlib's model interface (``base``/``head``) over a fedforge model, sharing its parameters."""

    def __init__(self, model):
        super().__init__()
        self.base, self.head = model.features, model.head

    def forward(self, x):
        return self.head(self.base(x))


def fixed_loader(data, batch_size, drop_last=True, shuffle=False):
    """Stands in for DataLoader: batches in order (the oracle's shuffles are replaced by a fixed order)."""
    n = len(data) - (len(data) % batch_size if drop_last else 0)
    return [(torch.stack([data[i][0] for i in range(s, min(s + batch_size, n))]),
             torch.stack([data[i][1] for i in range(s, min(s + batch_size, n))])) for s in range(0, n, batch_size)]


def batches_of(data, batch_size):
    return fixed_loader(data, batch_size)


def samples(offset: int, n: int):
    ds = load_dataset("digits", None, False, None)
    x = torch.from_numpy(ds.x[offset:offset + n]).permute(0, 3, 1, 2).float() / 16.0
    y = torch.from_numpy(ds.y[offset:offset + n]).long()
    return [(x[i], y[i]) for i in range(n)]


def run_oracle_client(mod, model: nn.Module, guide: nn.Embedding, data, monkeypatch):
    """HtFLlib's train() then meta_study() for one client; returns its trained model and per-class gradients."""
    store = {("Client_0", "model"): BaseHead(model), ("Server", "guiding_vec"): guide}
    monkeypatch.setattr(mod, "load_item", lambda role, name, folder: store[(role, name)])
    monkeypatch.setattr(mod, "save_item", lambda item, role, name, folder: store.__setitem__((role, name), item))
    monkeypatch.setattr(mod, "read_client_data", lambda dataset, idx, is_train: list(data))
    monkeypatch.setattr(mod, "DataLoader", lambda d, bs, drop_last=True, shuffle=False: fixed_loader(d, bs, drop_last))
    c = mod.clientL2G.__new__(mod.clientL2G)
    c.role, c.save_folder_name, c.dataset, c.id, c.device = "Client_0", "", "digits", 0, "cpu"
    c.learning_rate, c.batch_size, c.local_epochs, c.train_slow = LR, BS, EPOCHS, False
    c.loss, c.loss_mse = nn.CrossEntropyLoss(), nn.MSELoss()
    c.meta_study_batches, c.meta_quiz_batches = 2, 1
    c.num_quiz = c.meta_quiz_batches * BS
    c.train_time_cost = {"num_rounds": 0, "total_cost": 0.0}
    c.train()
    c.meta_study()
    return store[("Client_0", "model")], store[("Client_0", "grads")]


@pytest.mark.parametrize("target, arch", [("feat", "cnn"), ("logit", "mlp"), ("logit", "cnn")])
def test_client_training_and_meta_gradient_match_htfllib(target, arch, monkeypatch, oracle):
    torch.manual_seed(0)
    model = create_model(arch, (1, 8, 8), 10, seed=1)
    dim = model.feature_dim if target == "feat" else 10
    guide = nn.Embedding(10, dim)
    data = samples(0, 75)  # 10 quiz samples, then 65 study samples (6 full batches)
    mine = copy.deepcopy(model)
    theirs, their_grads = run_oracle_client(oracle["client", target], copy.deepcopy(model), copy.deepcopy(guide), data, monkeypatch)

    G = guide.weight.detach().clone()
    quiz, study = data[:BS], data[BS:]
    train_loop(mine, batches_of(study, BS) * EPOCHS, LR, loss_fn=client_loss(target, G), max_grad_norm=100.0)
    for (n, p), q in zip(mine.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    grad = meta_gradient(mine, G, batches_of(study, BS)[:2], batches_of(quiz, BS)[:1], LR, target)
    sent = {c for c in range(10) if bool(grad[c].abs().sum() > 0)}
    assert sent == set(their_grads) and sent, "the same classes get a meta gradient"
    for c in sent:
        torch.testing.assert_close(grad[c], their_grads[c], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["feat", "logit"])
def test_server_guide_step_matches_htfllib(target, monkeypatch, oracle):
    torch.manual_seed(0)
    dim = 16 if target == "feat" else 10
    guide = nn.Embedding(10, dim)
    uploads = [{c: torch.randn(dim) * 40 for c in (0, 1, 2, 5)}, {c: torch.randn(dim) * 40 for c in (1, 5, 7)}]
    server_mod = oracle["server", target]
    srv = server_mod.FedL2G.__new__(server_mod.FedL2G)
    srv.uploaded_ids, srv.uploaded_gs = [0, 1], uploads
    srv.num_classes, srv.feature_dim, srv.device = 10, dim, "cpu"
    srv.guiding_vec = copy.deepcopy(guide)
    srv.optimizer = torch.optim.SGD(srv.guiding_vec.parameters(), lr=SLR)
    srv.role, srv.save_folder_name = "Server", ""
    monkeypatch.setattr(server_mod, "save_item", lambda *a, **k: None)
    server_mod.FedL2G.aggregate_grads(srv)
    grads: dict[int, list] = {}
    for up in uploads:
        for c, g in up.items():
            grads.setdefault(c, []).append(g)
    mine = guide_step(guide.weight.detach().clone(), grads, SLR, 100.0)
    torch.testing.assert_close(mine, srv.guiding_vec.weight.detach(), rtol=1e-5, atol=1e-6)
    # and through the algorithm's aggregate, on uploads in its message format
    algo = FedL2G.__new__(FedL2G)
    algo.hp = FedL2G.Params.from_dict({"target": target, "server_lr": SLR})
    server = {FedL2G.GUIDE: guide.weight.detach().clone()}
    ups = [Update({f"grad/{c}": g for c, g in up.items()}, None, 1.0) for up in uploads]
    torch.testing.assert_close(algo.aggregate(server, ups, 1)[FedL2G.GUIDE], mine, rtol=0, atol=0)
