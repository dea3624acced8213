"""Partial-sharing methods: FedPer, LG-FedAvg, FedRep, FedBABU, FedBN, FedRoD.

On scikit-learn's `digits` (4 clients, 1-2 rounds, small models) each test checks what the method sends
(`bytes_up` equals the shared part's bytes times the clients), that what it keeps survives between rounds and
is used, that it differs from FedAvg on the same seed, and what it reduces to where the paper says so.
"""
from __future__ import annotations

import pytest
import torch

import fedforge.algorithms  # noqa: F401  (registers the algorithms)
from fedforge.algorithms._partial import norm_entries
from fedforge.algorithms.fedrod import balanced_softmax_loss
from fedforge.core.algorithm import ALGORITHMS
from fedforge.core.messages import model_entries, nbytes, under
from fedforge.core.runtime import Worker, WorkerSpec
from fedforge.errors import ConfigError
from tests.algorithms.helpers import BASE, _one_torch_thread, differ, fedavg, same_tensors, sim, train  # noqa: F401  (fixtures)


def _body(k):
    return k.startswith("features.")


def _head(k):
    return k.startswith("head.")


# name, params, model, which state-dict entries are sent
SENDS = [
    ("fedper", {}, "mlp", _body),
    ("lgfedavg", {}, "mlp", _head),
    ("fedrep", {"head_epochs": 2}, "mlp", _body),
    ("fedbabu", {}, "mlp", _body),
    ("fedrod", {}, "mlp", lambda k: True),
    ("fedbn", {}, "cnn_bn", None),  # every entry but the normalisation layers'
]


@pytest.mark.parametrize("algo,params,model,sent", SENDS, ids=[s[0] for s in SENDS])
def test_bytes_sent_are_the_shared_part_and_kept_state_survives(algo, params, model, sent):
    s = sim(algo, params, model=model, rounds=1)
    net = s.ctx.build_model()
    sd = net.state_dict()
    if sent is None:
        norms = norm_entries(net)
        assert norms and any("running_mean" in k for k in norms)
        sent = lambda k: k not in norms  # noqa: E731
    shared = {k: v for k, v in sd.items() if sent(k)}
    res = s.run()
    last = [r for r in res.records if r.get("stage", "train") == "train"][-1]
    assert last["bytes_up"] == 4 * nbytes(shared)
    assert last["bytes_down"] == 4 * nbytes(shared)
    kept = {k for k in sd if not sent(k)}
    for cid in range(4):
        state = res.store.get(cid)
        assert kept <= set(model_entries(state))
        assert not (set(model_entries(state)) & set(shared)) or algo == "fedbabu"  # FedBABU keeps its fine-tuned model


@pytest.mark.parametrize("algo,params,model", [
    ("fedper", {}, "mlp"), ("lgfedavg", {}, "mlp"), ("fedrep", {"head_epochs": 2}, "mlp"), ("fedbn", {}, "cnn_bn"),
    ("fedrod", {}, "mlp"),
])
def test_personal_state_changes_and_is_used_next_round(algo, params, model):
    s = sim(algo, params, model=model)
    w = Worker(WorkerSpec(s.ds, s.partition, s.algo))
    server = s.algo.init_server()
    ups = [train(s, server, cid, 1, worker=w) for cid in range(4)]
    start = s.algo.init_client(_rt(w, 0))
    assert differ(ups[0].state, start)  # the kept part was trained
    new = s.algo.aggregate(server, ups, 1)
    kept = train(s, new, 0, 2, state=ups[0].state, worker=w)
    fresh = train(s, new, 0, 2, state=None, worker=w)
    assert differ(kept.state, fresh.state)
    if algo == "fedrod":
        # the personal head's loss never reaches the generic model: its upload ignores the personal state
        assert same_tensors(kept.upload, fresh.upload)
    else:
        assert differ(kept.upload, fresh.upload)


def _rt(worker, cid):
    from fedforge.core.runtime import ClientRuntime

    return ClientRuntime(worker, cid, 0, 0)


@pytest.mark.parametrize("algo,params", [("fedper", {}), ("lgfedavg", {}), ("fedrep", {"head_epochs": 2}), ("fedrod", {})])
def test_differs_from_fedavg_on_the_same_seed(algo, params, fedavg):
    res = sim(algo, params).run()
    mine = [(r.get("personalized_loss"), r.get("loss")) for r in res.records[1:]]
    theirs = [(r.get("global_loss"), r.get("loss")) for r in fedavg.records[1:]]
    assert mine != theirs
    assert res.records[-1]["personalized_acc"] is not None


# ---------------------------------------------------------------------------------------------- FedBN
def test_fedbn_without_normalisation_layers_is_fedavg_bit_for_bit(fedavg):
    res = sim("fedbn").run()  # mlp: nothing to keep local
    for a, b in zip(res.records, fedavg.records):
        assert a["personalized_acc"] == b["global_acc"] and a["personalized_loss"] == b["global_loss"]
        assert a["global_acc"] == b["global_acc"]  # nothing kept local: the shared model is a global model
        assert a["loss"] == b["loss"] and a["bytes_up"] == b["bytes_up"]
    assert same_tensors(res.server, fedavg.server)


def test_fedbn_running_statistics_stay_with_their_client():
    s = sim("fedbn", model="cnn_bn", rounds=2)
    res = s.run()
    assert not any("running_mean" in k for k in res.server)
    assert res.records[-1]["global_acc"] is None and res.records[-1]["personalized_acc"] is not None
    steps = {}
    for rec_cid in range(4):
        state = res.store.get(rec_cid)
        counters = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
        steps[rec_cid] = {int(c) for c in counters}
        assert len(steps[rec_cid]) == 1
    # every client took part in both rounds: its BatchNorm counted both rounds' steps
    n_batches = {cid: s.ctx.train_sizes[cid] // BASE["batch_size"] for cid in range(4)}
    for cid in range(4):
        assert steps[cid] == {2 * n_batches[cid]}
    means = [res.store.get(cid)["features.1.running_mean"] for cid in range(4)]
    assert not torch.equal(means[0], means[1])


# ---------------------------------------------------------------------------------------------- FedRep
def test_fedrep_runs_head_epochs_then_body_epochs():
    one, three = sim("fedrep", {"head_epochs": 1}), sim("fedrep", {"head_epochs": 3})
    assert ALGORITHMS.get("fedrep").Params().head_epochs == 10
    server = one.algo.init_server()
    u1, u3 = train(one, server, 0, 1), train(three, server, 0, 1)
    per_epoch = one.ctx.train_sizes[0] // BASE["batch_size"]
    assert u1.metrics["steps"] == (1 + 1) * per_epoch
    assert u3.metrics["steps"] == (3 + 1) * per_epoch
    assert differ(u1.upload, u3.upload)  # the body is trained against a different head
    per = train(sim("fedper"), server, 0, 1)
    assert differ(u1.upload, per.upload)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_head_epochs_on_cached_features_follow_the_path_through_the_frozen_body(model):
    """FedRep's head epochs run on features computed once; the head they give equals (up to float rounding)
    the head trained through the frozen body batch by batch, and the random stream ends in the same state."""
    from fedforge.algorithms.mechanics import frozen_feature_batches, head_loss, head_only_loss, is_head, named_params
    from fedforge.core.runtime import ClientRuntime

    s = sim("fedrep", {"head_epochs": 3}, model=model)
    heads, draws = [], []
    for cached in (True, False):
        rt = ClientRuntime(Worker(WorkerSpec(s.ds, s.partition, s.algo)), 1, 1, 123)
        rt.load(rt.initial_params())
        params = named_params(rt.model, is_head)
        if cached:
            batches = frozen_feature_batches(rt, epochs=3)
            assert batches is not None and len(batches) == 3 * (s.ctx.train_sizes[1] // BASE["batch_size"])
            rt.train(loss_fn=head_loss, params=params, batches=batches)
        else:
            rt.train(loss_fn=head_only_loss, params=params, epochs=3)
        heads.append({k: v.clone() for k, v in rt.model.state_dict().items()})
        draws.append(torch.randint(0, 10**9, (1,), generator=rt.gen).item())
    assert draws[0] == draws[1]  # the body epochs that follow see the same batches
    assert heads[0].keys() == heads[1].keys()
    for k in heads[0]:
        assert torch.allclose(heads[0][k], heads[1][k], atol=1e-5), k
    init = rt.initial_params()
    assert any(not torch.equal(heads[0][k], init[k]) for k in init if k.startswith("head."))  # the head trained
    assert all(torch.equal(heads[0][k], init[k]) for k in init if k.startswith("features."))  # the body did not


def test_frozen_feature_batches_fall_back_where_they_would_not_be_exact():
    from fedforge.algorithms.mechanics import frozen_feature_batches
    from fedforge.core.runtime import ClientRuntime

    for kw, spec_kw in (({"model": "cnn_bn"}, {}), ({}, {"augment": True})):
        s = sim("fedrep", {"head_epochs": 2}, **kw)
        rt = ClientRuntime(Worker(WorkerSpec(s.ds, s.partition, s.algo, **spec_kw)), 0, 1, 5)
        assert frozen_feature_batches(rt, epochs=2) is None


# ------------------------------------------------------------------------------------------- LG-FedAvg
def test_lgfedavg_across_architectures_sends_only_the_head():
    s = sim("lgfedavg", model="cnn,ht_resnet4", rounds=1)
    assert set(s.ctx.archs) == {"cnn", "ht_resnet4"}
    head = {k: v for k, v in s.ctx.build_model("cnn").state_dict().items() if k.startswith("head.")}
    res = s.run()
    assert res.records[-1]["bytes_up"] == 4 * nbytes(head)
    assert set(res.server) == set(head)
    assert set(model_entries(res.store.get(1))) == {k for k in s.ctx.build_model("ht_resnet4").state_dict() if not k.startswith("head.")}


def test_partial_sharing_rejects_mismatched_architectures():
    with pytest.raises(ConfigError, match="feature dimension"):
        sim("lgfedavg", model="cnn,mlp")
    with pytest.raises(ConfigError, match="same architecture"):
        sim("fedper", model="cnn,mlp")


# ---------------------------------------------------------------------------------------------- FedBABU
def test_fedbabu_head_stays_random_then_clients_fine_tune():
    s = sim("fedbabu")
    assert ALGORITHMS.get("fedbabu").Params().finetune_epochs == 5
    init_head = {k: v for k, v in s.ctx.build_model().state_dict().items() if k.startswith("head.")}
    res = s.run()
    assert same_tensors({k: v for k, v in res.server.items() if k.startswith("head.")}, init_head)
    assert differ({k: v for k, v in res.server.items() if k.startswith("features.")},
                  {k: v for k, v in s.ctx.build_model().state_dict().items() if k.startswith("features.")})
    stages = [r.get("stage", "train") for r in res.records]
    assert stages[-1] == "finetune" and stages.count("finetune") == 1
    during, after = res.records[-2], res.records[-1]
    assert during["personalized_acc"] == during["global_acc"]  # nothing is personal before fine-tuning
    assert after["global_acc"] == during["global_acc"]
    assert after["personalized_acc"] != after["global_acc"]
    for cid in range(4):
        tuned = res.store.get(cid)
        assert differ({k: tuned[k] for k in init_head}, init_head)


def test_fedbabu_head_only_fine_tuning_keeps_the_global_body():
    s = sim("fedbabu", {"finetune_part": "head"})
    res = s.run()
    body = {k: v for k, v in res.server.items() if k.startswith("features.")}
    head = {k: v for k, v in res.server.items() if k.startswith("head.")}
    for cid in range(4):
        tuned = res.store.get(cid)
        assert same_tensors({k: tuned[k] for k in body}, body)  # only the head was fine-tuned
        assert differ({k: tuned[k] for k in head}, head)
    assert res.records[-1]["stage"] == "finetune"


# ---------------------------------------------------------------------------------------------- FedRoD
def test_balanced_softmax_shifts_by_log_prior_and_is_ce_for_uniform_prior():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    uniform = torch.full((4,), 0.25).log()
    torch.testing.assert_close(balanced_softmax_loss(logits, y, uniform), torch.nn.functional.cross_entropy(logits, y))
    counts = torch.tensor([30.0, 10.0, 0.0, 0.0])
    prior = torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))
    loss = balanced_softmax_loss(logits.requires_grad_(), y, prior)
    grad, = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.all(grad[:, 2:] == 0)  # absent classes get no push
    # a frequent class needs a larger margin: the loss of its samples is lower than plain CE
    assert balanced_softmax_loss(logits.detach()[y == 0], y[y == 0], prior) < torch.nn.functional.cross_entropy(logits.detach()[y == 0], y[y == 0])


def test_fedrod_uploads_generic_model_and_keeps_personal_head(fedavg):
    s = sim("fedrod")
    res = s.run()
    last = res.records[-1]
    assert last["global_acc"] is not None and last["personalized_acc"] is not None
    assert last["global_acc"] != last["personalized_acc"]
    init_head = {k: v for k, v in s.ctx.build_model().state_dict().items() if k.startswith("head.")}
    for cid in range(4):
        ph = under(res.store.get(cid), "phead")
        assert ph.keys() == init_head.keys() and differ(ph, init_head)
    assert differ(res.server, fedavg.server)  # the balanced softmax changes the generic model


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("algo,params,name,rng,default", [
    ("fedrep", {"head_epochs": 0}, "head_epochs", ">= 1", "10"),
    ("fedbabu", {"finetune_epochs": 0}, "finetune_epochs", ">= 1", "5"),
    ("fedbabu", {"finetune_part": "body"}, "finetune_part", "one of full, head", "full"),
])
def test_bad_hyper_parameter_names_range_and_default(algo, params, name, rng, default):
    with pytest.raises(ConfigError) as e:
        ALGORITHMS.get(algo).Params.from_dict(params, owner=algo)
    msg = str(e.value)
    assert name in msg and rng in msg and f"default is {default}" in msg


def test_unknown_hyper_parameter_is_named():
    with pytest.raises(ConfigError, match="fedper has no hyper-parameter 'mu'"):
        ALGORITHMS.get("fedper").Params.from_dict({"mu": 1}, owner="fedper")
