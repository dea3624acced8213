"""Step equivalence against PFLlib: same weights, same batches, same draws → same update (to 1e-5 relative).

Each case drives PFLlib's own server and client classes (tests/reference/pfllib_shim.py) beside fedforge's hooks
on a tiny MNIST federation (3 clients with 55, 68 and 102 training samples: 5, 6 and 10 batches of 10), for two
rounds: every client's state after its local update and the server after aggregation must agree. Each method's
key hyper-parameter is set to a value where its mechanism acts, the same on both sides (PFLlib's defaults switch
several off: -mu 0 for FedProx and MOON). docs/faithfulness.md cites these test names.
"""
from __future__ import annotations

import pytest
import torch

from fedforge.core.messages import model_entries, under
from tests.reference.pfllib_shim import (AlgoSpec, Harness, assert_same, check_same_cnn, import_pfllib, load_pf, pf_params,
                                         pfllib, step_equivalence, tiny_mnist)


@pytest.fixture(scope="module")
def data():
    pfllib()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_mnist()
    torch.set_num_threads(n)


def test_fedavg_cnn_is_pfllibs_fedavgcnn(data):
    h = Harness(AlgoSpec("fedavg", "FedAvg", "serveravg.FedAvg", rounds=1), *data)
    x, _ = h.fed.inputs(h.fed.train_idx[0][:8])
    check_same_cnn(h.pf_model, h.worker.model("cnn"), x)
    assert sum(p.numel() for p in h.pf_model.parameters()) == h.worker.model("cnn").num_parameters() == 582026


def test_harness_detects_a_missing_term(data):
    """The tolerance is far below what a method's term changes: FedProx with mu = 1 against PFLlib with mu = 0."""
    spec = AlgoSpec("fedprox", "FedProx", "serverprox.FedProx", ff_params={"mu": 1.0}, pf_args={"mu": 0.0}, rounds=1)
    with pytest.raises(AssertionError, match="client 0 after its local update"):
        step_equivalence(spec, data)


# ------------------------------------------------------------------------------------------------ views
def prefixed(d: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in d.items()}


def body(d: dict) -> dict:
    return {k: v for k, v in d.items() if k.startswith("features.")}


def ff_whole(h, u):
    """A partial-sharing client's whole model: the shared upload completed by the entries it keeps."""
    return {**model_entries(u.state), **model_entries(u.upload)}


def pf_list(params, model) -> dict:
    """A PFLlib list of tensors aligned with ``model.parameters()`` (SCAFFOLD's control variates), named."""
    return {k: t.detach().clone() for k, t in zip(pf_params(model), params)}


def local_spec():
    # PFLlib's Local: no send_models, no aggregation; each client keeps training its own copy of the initial model
    return AlgoSpec("local", "Local", "serverlocal.Local",
                    pf_send=lambda h, srv, r: None, pf_aggregate=lambda h, srv, r: None,
                    ff_client_view=lambda h, u: model_entries(u.state),
                    pf_server_view=lambda h, srv: {}, ff_server_view=lambda h, st: st, pf_sync=lambda h, srv, st: None)


def scaffold_spec():
    def pf_client(h, c):
        return {**pf_params(c.model), **prefixed(pf_list(c.client_c, c.model), "control")}

    def ff_client(h, u):
        return {**model_entries(u.upload), **u.state}

    def pf_server(h, srv):
        return {**pf_params(srv.global_model), **prefixed(pf_list(srv.global_c, srv.global_model), "control")}

    def pf_sync(h, srv, st):
        load_pf(srv.global_model, model_entries(st))
        c = under(st, "control")
        with torch.no_grad():
            for (n, _), t in zip(pf_params(srv.global_model).items(), srv.global_c):
                t.copy_(c[n])

    return AlgoSpec("scaffold", "SCAFFOLD", "serverscaffold.SCAFFOLD", ff_params={"server_lr": 1.0}, pf_sync=pf_sync,
                    pf_args={"server_learning_rate": 1.0}, pf_client_view=pf_client, ff_client_view=ff_client,
                    pf_server_view=pf_server, ff_server_view=lambda h, st: st)


class _SquaredNorm:
    """``torch`` as PFLlib's clientdyn sees it, except that ``torch.norm(v, 2)`` is the squared norm ‖v‖²: the one
    documented difference of fedforge's FedDyn (the paper's α/2·‖θ − θ_server‖²; PFLlib writes α/2·‖θ − θ_server‖)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def norm(v, p=2):
        assert p == 2
        return v.pow(2).sum()


def feddyn_spec(squared: bool = True):
    def pf_setup(h):
        if squared:
            mod = import_pfllib("flcore.clients.clientdyn")
            h.restore.append((mod, "torch", mod.torch))
            mod.torch = _SquaredNorm()

    def pf_server(h, srv):
        return {**pf_params(srv.global_model), **prefixed(pf_params(srv.server_state), "h")}

    def ff_server(h, st):
        return {**model_entries(st), **prefixed(under(st, "h"), "h")}

    def pf_sync(h, srv, st):
        load_pf(srv.global_model, model_entries(st))
        load_pf(srv.server_state, under(st, "h"))

    # alpha = 1, PFLlib's -al default, on both sides (fedforge's default is the authors' 0.01)
    return AlgoSpec("feddyn", "FedDyn", "serverdyn.FedDyn", ff_params={"alpha": 1.0}, pf_args={"alpha": 1.0}, pf_sync=pf_sync,
                    pf_setup=pf_setup, pf_server_view=pf_server, ff_server_view=ff_server,
                    pf_aggregate=lambda h, srv, r: (srv.receive_models(), srv.update_server_state(),
                                                    srv.aggregate_parameters()))


def partial_spec(name, pf_algorithm, server, pf_part="base", **kw):
    """Partial sharing (FedPer, FedRep, FedBABU, LG-FedAvg): a client's whole model; the server's shared part
    (PFLlib's global_model becomes the uploaded base, or head, after the first aggregation)."""
    keep = (lambda d: body(d)) if pf_part == "base" else (lambda d: {k: v for k, v in d.items() if k.startswith("head.")})
    return AlgoSpec(name, pf_algorithm, server, ff_client_view=ff_whole, pf_part=pf_part,
                    ff_server_view=lambda h, st: keep(model_entries(st)), **kw)


def fedrod_spec():
    def pf_setup(h):
        # PFLlib counts a client's classes over one shuffled pass of its drop_last loader, which leaves out the
        # samples of the incomplete last batch; fedforge counts all training samples. Same counts on both sides:
        for c in h.pf.clients:
            c.sample_per_class = torch.bincount(h.fed.train_labels(c.id), minlength=10).float()

    def pf_client(h, c):
        return {**pf_params(c.model), **prefixed(pf_params(c.head, "head"), "phead")}

    def ff_client(h, u):
        return {**model_entries(u.upload), **{k: v for k, v in u.state.items() if k.startswith("phead/")}}

    return AlgoSpec("fedrod", "FedROD", "serverrod.FedROD", pf_setup=pf_setup, pf_client_view=pf_client,
                    ff_client_view=ff_client)


def ditto_spec():
    def pf_train(h, c, r):
        c.ptrain()
        c.train()

    def pf_client(h, c):
        return {**pf_params(c.model), **prefixed(pf_params(c.model_per), "personal")}

    def ff_client(h, u):
        return {**model_entries(u.upload), **prefixed(model_entries(u.state), "personal")}

    # PFLlib's -mu is Ditto's λ; 1 on both sides (the authors' value, fedforge's default); one personal epoch (-pls 1)
    return AlgoSpec("ditto", "Ditto", "serverditto.Ditto", ff_params={"lamda": 1.0}, pf_args={"mu": 1.0, "plocal_epochs": 1},
                    pf_train=pf_train, pf_client_view=pf_client, ff_client_view=ff_client)


def fedala_spec():
    """FedALA with PFLlib's -et 1, -s 80, -p 2. Two documented differences are aligned, both being draws or stopping
    rules rather than the update: (1) the data ALA learns W on: fedforge draws a uniform random 80% subset cut into
    full batches, PFLlib a random contiguous 80% slice; PFLlib's ALA is handed fedforge's batches (its DataLoader
    replaced for that call). (2) The first ALA's stopping rule (PFLlib: std of the last 10 last-batch losses < 0.1,
    unbounded; fedforge: epoch-mean losses, at most 50 epochs): with the threshold out of reach on both sides and
    num_pre_loss 2, both train W for exactly 3 epochs. Three rounds: round 1 skips ALA (the client has no model yet),
    round 2 runs the first ALA (to convergence), round 3 a single pass."""

    def pf_setup(h):
        for c in h.pf.clients:
            c.ALA.threshold, c.ALA.num_pre_loss = 1e9, 2

    def pf_send(h, srv, r):
        mod = import_pfllib("utils.ALA")
        orig = mod.DataLoader
        try:
            for c in srv.clients:
                ran = h.updates[c.id].metrics.get("ala_epochs", 0) > 0
                ala = h.batches[c.id].pop(0) if ran else []
                mod.DataLoader = lambda *a, _ala=ala, **k: list(_ala)
                c.local_initialization(srv.global_model)
        finally:
            mod.DataLoader = orig

    def pf_client(h, c):
        w = c.ALA.weights or []
        top = list(pf_params(c.model))[-len(w):] if w else []
        return {**pf_params(c.model), **{f"ala/{n}": t.detach().clone() for n, t in zip(top, w)}}

    def ff_client(h, u):
        return {**model_entries(u.upload), **{k: v for k, v in u.state.items() if k.startswith("ala/")}}

    return AlgoSpec("fedala", "FedALA", "serverala.FedALA", rounds=3,
                    ff_params={"eta": 1.0, "rand_percent": 80.0, "layer_idx": 2, "threshold": 1e9, "num_pre_loss": 2},
                    pf_args={"eta": 1.0, "rand_percent": 80, "layer_idx": 2},
                    pf_setup=pf_setup, pf_send=pf_send, pf_client_view=pf_client, ff_client_view=ff_client)


# ------------------------------------------------------------------------------------ injected Gumbel noise
def record_gumbel(h, module):
    """Wrap ``module.gumbel_softmax`` (fedforge's, drawing u ~ U(0,1) from the task's stream, g = −log(−log u)) so
    that every noise tensor it adds is also kept, per client, for PFLlib's side."""
    orig = module.gumbel_softmax

    def recording(logits, tau, generator, dim=-1):
        if generator is not None:
            replay = torch.Generator(device=generator.device)
            replay.set_state(generator.get_state())
            u = torch.rand(logits.shape, generator=replay, dtype=torch.float32, device=generator.device)
            h.draws[h.current_cid].append(-torch.log(-torch.log(u.to(logits.dtype).clamp_(1e-20, 1.0 - 1e-7))))
        return orig(logits, tau, generator, dim)

    h.patch(module, "gumbel_softmax", recording)


class _InjectedGumbel:
    """``torch.nn.functional`` as a PFLlib module sees it, except that ``gumbel_softmax`` adds the noise fedforge
    drew (torch's own definition, softmax((logits + g)/τ), with g given instead of drawn)."""

    def __init__(self, h):
        self.h = h
        self.cid = None

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def gumbel_softmax(self, logits, tau=1, hard=False, eps=1e-10, dim=-1):
        assert not hard
        g = self.h.draws[self.cid].popleft()
        assert g.shape == logits.shape, (g.shape, logits.shape)
        return ((logits + g) / tau).softmax(dim)


def fedcp_spec():
    """FedCP with -lam 5 (the authors' run script) on both sides. Aligned draws: the CPN's initial weights (fedforge's,
    copied into PFLlib's), the Gumbel noise (fedforge's, injected), and the client context before a client's first
    aggregation, which PFLlib draws uniformly at random and fedforge derives from the initial head (documented in
    fedcp.py): PFLlib's clients start from fedforge's. From then on PFLlib derives the context itself, after
    aggregation, from the trained personal head, as fedforge does at the next task's start."""
    from fedforge.algorithms import fedcp as ff_fedcp

    cs_names = {"fc.0.weight": "cpn/fc.weight", "fc.0.bias": "cpn/fc.bias", "fc.1.weight": "cpn/ln.weight",
                "fc.1.bias": "cpn/ln.bias"}

    def cs_view(cs):
        return {cs_names[n]: p.detach().clone() for n, p in cs.named_parameters()}

    def load_cs(cs, st):
        with torch.no_grad():
            for n, p in cs.named_parameters():
                p.copy_(st[cs_names[n]])

    def pf_setup(h):
        servercp = import_pfllib("flcore.servers.servercp")
        h.gumbel = _InjectedGumbel(h)
        h.patch(servercp, "F", h.gumbel)
        record_gumbel(h, ff_fedcp)
        head0 = {k: v for k, v in h.init_weights.items() if k.startswith("head.")}
        for c in h.pf.clients:
            load_cs(c.model.gate.cs, h.server)
            c.context = ff_fedcp.client_context(head0).clone()

    def pf_train(h, c, r):
        h.gumbel.cid = c.id
        c.train_cs_model()
        c.generate_upload_head()
        assert not h.draws[c.id], "PFLlib drew fewer Gumbel samples than fedforge"

    def pf_aggregate(h, srv, r):
        srv.receive_models()
        srv.aggregate_parameters()
        srv.send_models()
        srv.global_head()
        srv.global_cs()

    def pf_client(h, c):
        return {**pf_params(c.model.model.base, "base"), **pf_params(c.model.model.head, "head"),
                **prefixed(pf_params(c.model.head_g, "head"), "upload"), **cs_view(c.model.gate.cs)}

    def ff_client(h, u):
        return {**body(u.upload), **model_entries(u.state),
                **prefixed({k: v for k, v in u.upload.items() if k.startswith("head.")}, "upload"),
                **{k: v for k, v in u.upload.items() if k.startswith("cpn/")}}

    def pf_server(h, srv):
        return {**pf_params(srv.global_modules, "base"), **pf_params(srv.head, "head"), **cs_view(srv.cs)}

    def pf_sync(h, srv, st):
        load_pf(srv.global_modules, st, "base")
        load_pf(srv.head, st, "head")
        load_cs(srv.cs, st)
        srv.send_models()
        for c in srv.clients:
            c.set_head_g(srv.head)
            c.set_cs(srv.cs)

    return AlgoSpec("fedcp", "FedCP", "servercp.FedCP", ff_params={"lam": 5.0, "tau": 1.0}, pf_args={"lamda": 5.0},
                    pf_setup=pf_setup, pf_send=lambda h, srv, r: None, pf_train=pf_train, pf_aggregate=pf_aggregate,
                    pf_client_view=pf_client, ff_client_view=ff_client, pf_server_view=pf_server,
                    ff_server_view=lambda h, st: dict(st), pf_sync=pf_sync)


class _PerSampleNorm:
    """``torch`` as PFLlib's clientgpfl sees it, except that ``torch.norm(F, 2)`` of the (batch × d) difference is the
    batch mean of the per-sample L2 norms: fedforge's magnitude term (documented in gpfl.py)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def norm(v, p=2):
        assert p == 2 and v.dim() == 2
        return v.norm(dim=1).mean()


def gpfl_spec(aligned: bool = True):
    """GPFL with the authors' -lam 0.01 -mu 0.1 on both sides. GCE and CoV start from fedforge's weights, and both
    count a client's classes over all its training samples (PFLlib counts one shuffled drop_last pass). The two
    differences documented in gpfl.py are aligned on PFLlib's side with ``aligned``: (1) the conditional inputs ḡ,
    p_i come from the received GCE (PFLlib's set_GCE computes them from the client's previous GCE, and they are
    zeros before a client's first aggregation): calling PFLlib's own set_GCE a second time with the same GCE gives
    its formula on the received GCE; (2) the magnitude term is the batch mean of per-sample L2 distances (PFLlib: one
    norm over the whole batch)."""
    from fedforge.algorithms import gpfl as ff_gpfl  # noqa: F401

    def cov_name(n):
        branch, idx, leaf = n.split(".")  # Conditional_gamma.0.weight
        return f"cov/{branch.split('_')[1]}.{'fc' if idx == '0' else 'ln'}.{leaf}"

    def named(mod, kind):
        if kind == "gce":
            return {"gce/embedding": mod.embedding.weight.detach().clone()}
        return {cov_name(n): p.detach().clone() for n, p in mod.named_parameters()}

    def load_named(mod, st, kind):
        with torch.no_grad():
            if kind == "gce":
                mod.embedding.weight.copy_(st["gce/embedding"])
            else:
                for n, p in mod.named_parameters():
                    p.copy_(st[cov_name(n)])

    def counts(h, c):
        spc = torch.bincount(h.fed.train_labels(c.id), minlength=10).float()
        return spc / spc.sum()

    def pf_setup(h):
        for c in h.pf.clients:
            c.sample_per_class = counts(h, c)
            load_named(c.GCE, h.server, "gce")
            load_named(c.GCE_frozen, h.server, "gce")
            load_named(c.CoV, h.server, "cov")
            if aligned:
                c.set_GCE(c.GCE)  # conditional inputs from the GCE this first round trains with
        if aligned:
            h.patch(import_pfllib("flcore.clients.clientgpfl"), "torch", _PerSampleNorm())

    def resend_gce(h, srv):
        if aligned:
            for c in srv.clients:
                c.set_GCE(srv.GCE)  # second call: PFLlib's formula on the GCE just received

    def pf_aggregate(h, srv, r):
        srv.receive_models()
        srv.aggregate_parameters()
        srv.send_models()
        srv.global_GCE()
        srv.global_CoV()
        resend_gce(h, srv)

    def pf_client(h, c):
        return {**pf_params(c.model), **named(c.GCE, "gce"), **named(c.CoV, "cov")}

    def ff_client(h, u):
        return {**u.upload, **u.state}

    def pf_server(h, srv):
        return {**pf_params(srv.global_model, "base"), **named(srv.GCE, "gce"), **named(srv.CoV, "cov")}

    def pf_sync(h, srv, st):
        load_pf(srv.global_model, st, "base")
        load_named(srv.GCE, st, "gce")
        load_named(srv.CoV, st, "cov")
        srv.send_models()
        for c in srv.clients:
            c.set_GCE(srv.GCE)
            c.set_CoV(srv.CoV)
        resend_gce(h, srv)

    return AlgoSpec("gpfl", "GPFL", "servergpfl.GPFL", ff_params={"lam": 0.01, "mu": 0.1},
                    pf_args={"lamda": 0.01, "mu": 0.1}, pf_setup=pf_setup, pf_send=lambda h, srv, r: None,
                    pf_aggregate=pf_aggregate, pf_client_view=pf_client, ff_client_view=ff_client,
                    pf_server_view=pf_server, ff_server_view=lambda h, st: dict(st), pf_sync=pf_sync)


SPECS = {
    "fedavg": lambda: AlgoSpec("fedavg", "FedAvg", "serveravg.FedAvg"),
    # mu = 1 (the top of the paper's grid) on both sides; PFLlib's default 0 would make it FedAvg
    "fedprox": lambda: AlgoSpec("fedprox", "FedProx", "serverprox.FedProx", ff_params={"mu": 1.0}, pf_args={"mu": 1.0}),
    "local": local_spec,
    "scaffold": scaffold_spec,
    "feddyn": feddyn_spec,
    # mu = 1, tau = 0.5 (the paper's, fedforge's defaults) on both sides; PFLlib's default mu 0 is FedAvg
    "moon": lambda: AlgoSpec("moon", "MOON", "servermoon.MOON", ff_params={"mu": 1.0, "tau": 0.5},
                             pf_args={"mu": 1.0, "tau": 0.5}),
    # the plain cnn has no normalisation layer: FedBN is FedAvg in both codes
    "fedbn": lambda: AlgoSpec("fedbn", "FedBN", "serverbn.FedBN"),
    "fedper": lambda: partial_spec("fedper", "FedPer", "serverper.FedPer"),
    # two head epochs on both sides (PFLlib's -pls), then the run's one body epoch
    "fedrep": lambda: partial_spec("fedrep", "FedRep", "serverrep.FedRep", ff_params={"head_epochs": 2},
                                   pf_args={"plocal_epochs": 2}),
    "fedbabu": lambda: partial_spec("fedbabu", "FedBABU", "serverbabu.FedBABU"),
    "lgfedavg": lambda: partial_spec("lgfedavg", "LG-FedAvg", "serverlg.LG_FedAvg", pf_part="head"),
    "fedrod": fedrod_spec,
    "ditto": ditto_spec,
    "fedala": fedala_spec,
    "fedcp": fedcp_spec,
    "gpfl": gpfl_spec,
}


@pytest.mark.parametrize("algo", list(SPECS))
def test_step_equivalence(algo, data):
    step_equivalence(SPECS[algo](), data)


def test_feddyn_differs_from_pfllib_only_by_the_squared_norm(data):
    """Unpatched, PFLlib's α/2·‖θ − θ_server‖ (not squared) gives another update; with that one term squared
    (test_step_equivalence[feddyn]) the two agree, so it is the only difference."""
    with pytest.raises(AssertionError, match="round 1, client 0 after its local update"):
        step_equivalence(feddyn_spec(squared=False), data)


def test_fedbabu_finetune_equivalence(data):
    """FedBABU's fine-tuning after the last round (whole model, 2 epochs on both sides). fedforge fine-tunes the
    final global body (the paper's protocol); PFLlib fine-tunes whatever each client holds after its last local
    update, because its server sends no model between the last aggregation and fine_tune(). Sending the global
    model first makes the two the same computation."""
    from fedforge.core.runtime import Task

    spec = partial_spec("fedbabu", "FedBABU", "serverbabu.FedBABU", ff_params={"finetune_epochs": 2},
                        pf_args={"fine_tuning_epochs": 2}, rounds=1)
    h = Harness(spec, *data)
    try:
        r = h.round(1)
        assert_same(*r.server, "fedbabu, server after round 1")
        for cid in range(h.ctx.num_clients):
            msg = h.algo.eval_message(h.server, cid)
            load_pf(h.pf.clients[cid].model, model_entries(msg))  # what send_models() would send, bit for bit
            state = h.worker.run(Task("finetune", cid, 1, msg, h.states[cid]))
            h.feeders[cid].put(h.recorder.take())
            c = h.pf.clients[cid]
            c.fine_tune()
            assert h.feeders[cid].drained
            assert_same(pf_params(c.model), model_entries(state), f"fedbabu, client {cid} after fine-tuning")
    finally:
        h.close()


def test_gpfl_differs_from_pfllib_only_by_the_documented_choices(data):
    """Without the two alignments of gpfl_spec (conditional inputs from the received GCE; per-sample magnitude term)
    PFLlib's GPFL computes another update; with them (test_step_equivalence[gpfl]) the two agree."""
    with pytest.raises(AssertionError, match="round 1, client 0 after its local update"):
        step_equivalence(gpfl_spec(aligned=False), data)


def feddbe_spec():
    """FedDBE with -mo 0.1 (PFLlib's default momentum of the running mean) and -klw 50 (the authors') on both sides."""

    def pf_pre_build(h):
        # PFLlib's constructor runs the warm-up: each client reads one batch (to size its vectors), then trains once
        # without DBE. fedforge's warm-up is its round 1: run it first and hand PFLlib's clients its batches.
        h.warmup = h.ff_round(1)
        clientdbe = import_pfllib("flcore.clients.clientdbe")
        for cid, epochs in h.warmup[1].items():
            h.feeders[cid].put([epochs[0][:1]] + epochs)  # the sizing read, then the warm-up epoch(s)
        h.patch(clientdbe.clientDBE, "load_train_data", lambda self, batch_size=None: h.feeders[self.id].loader())

    def pf_client(h, c):
        return {**pf_params(c.model), "dbe/bias": c.client_mean.detach().clone()}

    def ff_client(h, u):
        return {**model_entries(u.upload), "dbe/bias": u.state["dbe/bias"]}

    return AlgoSpec("feddbe", "FedDBE", "serverdbe.FedDBE", ff_params={"momentum": 0.1, "kappa": 50.0},
                    pf_args={"momentum": 0.1, "kl_weight": 50.0}, pf_pre_build=pf_pre_build,
                    pf_client_view=pf_client, ff_client_view=ff_client)


def test_step_equivalence_feddbe(data):
    """FedDBE: PFLlib's warm-up (in its server's constructor) equals fedforge's warm-up round (round 1: plain
    cross-entropy, uploads of the running means, z̄ᵍ their sample-weighted mean); then PFLlib's first DBE round equals
    fedforge's round 2 once PFLlib starts it from fedforge's averaged warm-up model. That start is the one documented
    difference: PFLlib discards the warm-up models and starts from the initial model."""
    h = Harness(feddbe_spec(), *data)
    try:
        updates, _ = h.warmup
        for c in h.pf.clients:
            assert h.feeders[c.id].drained
            u = updates[c.id]
            assert_same(pf_params(c.model), model_entries(u.upload), f"feddbe warm-up, client {c.id}")
            assert_same({"m": c.running_mean}, {"m": u.upload["dbe/mean"]}, f"feddbe warm-up mean, client {c.id}")
        h.server = h.algo.aggregate(h.server, list(updates.values()), 1)
        for c in h.pf.clients:
            assert_same({"g": c.global_mean}, {"g": h.server["dbe/global_mean"]}, f"feddbe global mean, client {c.id}")
        assert not torch.equal(h.pf.global_model.head.weight, h.server["head.weight"])  # PFLlib: still the initial model
        h.sync()  # the documented difference, aligned: PFLlib's round 0 starts from fedforge's warm-up average
        r = h.round(2)
        for cid, (pf, ff) in r.clients.items():
            assert_same(pf, ff, f"feddbe, round 2, client {cid} after its local update")
            assert ff["dbe/bias"].abs().max() > 0  # the personal bias trained
        assert_same(*r.server, "feddbe, round 2, server after aggregation")
    finally:
        h.close()
