"""Step equivalence against PFLlib: same weights, same batches, same draws → same update (to 1e-5 relative).

Each case drives PFLlib's own server and client classes (tests/reference/pfllib_shim.py) beside fedforge's hooks
on a tiny MNIST federation (3 clients with 38, 43 and 70 training samples: 3, 4 and 7 batches of 10), for two
rounds (FedALA three): every client's state after its local update and the server after aggregation must agree.
What each algorithm runs is in tests/reference/pfllib_specs.py; docs/faithfulness.md cites these test names.
"""
from __future__ import annotations

import pytest
import torch

from fedforge.core.messages import model_entries
from tests.reference.pfllib_shim import (
    AlgoSpec,
    Harness,
    assert_same,
    check_same_cnn,
    load_pf,
    pf_params,
    pfllib,
    step_equivalence,
    tiny_mnist,
)
from tests.reference.pfllib_specs import (
    RUNS,
    drop_last_pass,
    fedamp_spec,
    fedas_spec,
    fedcac_spec,
    fedcross_spec,
    feddyn_spec,
    fedgc_spec,
    fedlc_spec,
    fedmtl_spec,
    fedntd_spec,
    fedpac_spec,
    fedpcl_spec,
    gpfl_spec,
    held_classes,
    partial_spec,
    pfedme_spec,
    pflda_spec,
)

pytestmark = [pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning"),  # inside PFLlib's APFL client
              pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")]  # PFLlib's FedAS alignment MSE


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



@pytest.mark.parametrize("algo", list(RUNS))
def test_step_equivalence(algo, data):
    RUNS[algo](data)



def test_feddyn_differs_from_pfllib_only_by_the_squared_norm(data):
    """Unpatched, PFLlib's α/2·‖θ − θ_server‖ (not squared) gives another update; with that one term squared
    (test_step_equivalence[feddyn]) the two agree, so it is the only difference."""
    with pytest.raises(AssertionError, match="round 1, client 0 after its local update"):
        step_equivalence(feddyn_spec(squared=False), data)



def test_gpfl_differs_from_pfllib_only_by_the_documented_choices(data):
    """Without the two alignments of gpfl_spec (conditional inputs from the received GCE; per-sample magnitude term)
    PFLlib's GPFL computes another update; with them (test_step_equivalence[gpfl]) the two agree."""
    with pytest.raises(AssertionError, match="round 1, client 0 after its local update"):
        step_equivalence(gpfl_spec(aligned=False), data)



def test_pfedme_differs_from_pfllib_only_by_the_weight_decay(data):
    """Without fedforge's weight_decay = 0.001 (the authors' optimizer's μ·θ, kept by PFLlib) the two differ."""
    spec = pfedme_spec()
    spec.ff_params["weight_decay"] = 0.0
    with pytest.raises(AssertionError, match="after its local update"):
        step_equivalence(spec, data)



def test_pfllib_fedamp_trains_like_local(data):
    """PFLlib's FedAMP (its penalty on .data has no gradient; it never loads u_i) computes fedforge's ``local``."""
    step_equivalence(fedamp_spec("local"), data)



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




# ------------------------------------------------------------------ the eleven algorithms added from PFLlib
def differs(spec, data, where: str) -> None:
    """``spec`` (one documented difference left unaligned) makes the two codes disagree, first at ``where``."""
    with pytest.raises(AssertionError, match=where):
        step_equivalence(spec, data)


def test_fedmtl_regulariser_is_what_pfllib_leaves_out(data):
    """PFLlib's FedMTL regulariser carries no gradient; fedforge's default λ1 = 0.5 pulls each client to the mean."""
    differs(fedmtl_spec(lam1=0.5), data, "round 1, client 0 after its local update")


def test_fedntd_differs_from_pfllib_only_by_the_weighting(data):
    """PFLlib's FedNTD server averages unweighted: the clients agree, the server does not."""
    differs(fedntd_spec(weighted=False), data, "round 1, server after aggregation")


def test_fedlc_margins_are_pfllibs_only_with_global_counts_of_every_sample(data):
    """The paper's local label counts give other margins than PFLlib's summed counts, and so do counts of a drop_last
    pass (PFLlib's own) instead of every sample."""
    differs(fedlc_spec(counts="local"), data, "round 1, client 0 after its local update")
    differs(fedlc_spec(pf_counts=drop_last_pass), data, "round 1, client 0 after its local update")


def test_pflda_penalty_is_what_pfllib_leaves_out(data):
    """PFLlib's penalty on .data has no gradient; fedforge's λ = 1 acts on the personal head (the uploads agree)."""
    differs(pflda_spec(lam=1.0), data, "round 1, client 0 after its local update")


def test_fedcac_differs_from_pfllib_only_by_the_first_customization(data):
    """Left alone, PFLlib skips the customization after its first round (the critical entries then come from the
    initial weights): the clients agree, the customized models do not."""
    differs(fedcac_spec(customize_first=False), data, "round 1, server after aggregation")


def test_fedas_differs_from_pfllib_only_by_the_prototype_pass(data):
    """Prototypes over PFLlib's drop_last pass (batches of 16) instead of every sample: another alignment."""
    differs(fedas_spec(all_samples=False), data, "round 1, client 0 after its local update")


def test_fedcross_in_order_offset(data):
    """In-order collaborators: PFLlib's shadowed round variable gives the offset 1 in every round (round 1 then
    differs); handed fedforge's round t (counted from 1), its cross_aggregation agrees in both rounds."""
    differs(fedcross_spec("in_order"), data, "round 1, server after aggregation")
    step_equivalence(fedcross_spec("in_order", shadowed=False), data)


def test_fedpcl_differs_from_pfllib_only_by_the_documented_choices(data):
    """Without prototypes in class order (round 2 then trains against the wrong columns), or with PFLlib's drop_last
    prototype pass, the two differ; with a class that no client holds PFLlib's client stops at its assertion."""
    held = held_classes(data)
    differs(fedpcl_spec(class_order=False), held, "round 2, client 0 after its local update")
    differs(fedpcl_spec(all_samples=False), held, "round 1, client 0 after its local update")
    h = Harness(fedpcl_spec(), *data)  # 10 classes, 4 of them held by no client
    try:
        h.round(1)
        with pytest.raises(AssertionError) as e:
            h.round(2)
        assert e.traceback[-1].path.name == "clientpcl.py"
    finally:
        h.close()


def test_fedgc_differs_from_pfllib_only_by_the_bias(data):
    """PFLlib's FedGC heads have no bias; fedforge's keep theirs (trained locally): the updates differ."""
    differs(fedgc_spec(bias=False), data, "round 1, client 0 after its local update")


def test_fedpac_differs_from_pfllib_only_by_the_documented_choices(data):
    """PFLlib's in-place head combination (later clients mix heads already combined) makes the combined heads differ;
    its drop_last passes make the statistics and prototypes differ."""
    differs(fedpac_spec(heads_apart=False), data, "round 1, server after aggregation")
    differs(fedpac_spec(all_samples=False), data, "round 1, client 0 after its local update")


def test_fedpac_quadratic_program_against_pfllibs_cvxpy():
    """fedforge's head weights (Clarabel) against PFLlib's solve_quadratic (cvxpy and its default solver) on the same
    statistics: equal on random statistics of four clients, and where a weight falls below 10⁻³ PFLlib zeroes it
    without renormalising (its weights sum to less than 1), fedforge renormalises; then equal up to that scale."""
    import numpy as np

    from fedforge.algorithms.fedpac import combination_weights

    pfllib()
    pytest.importorskip("cvxpy", reason="PFLlib's FedPAC server imports cvxpy; pip install cvxpy")
    pytest.importorskip("clarabel", reason="fedforge's FedPAC solves with Clarabel; pip install clarabel")
    from tests.reference.pfllib_shim import import_pfllib, quiet

    solve = import_pfllib("flcore.servers.serverpac").solve_quadratic
    gen = torch.Generator().manual_seed(0)
    cases = [((torch.rand(4, generator=gen) * 0.5 + 0.1).tolist(), [torch.randn(3, 5, generator=gen) * 0.3 for _ in range(4)])
             for _ in range(3)]
    far = torch.zeros(1, 2)
    far[0, 0] = 1500 ** 0.5  # client 2's H is far from client 0's (‖ΔH‖² = 1500), client 1's equals it
    cases.append(([1.0, 1.0, 1.0], [torch.zeros(1, 2), torch.zeros(1, 2), far]))
    for v, hs in cases:
        with quiet():
            pf = solve(len(v), v, hs)
        for i, a in enumerate(pf):
            ff = combination_weights(np.array(v), np.stack([h.double().numpy() for h in hs]), i)
            a = np.asarray(a, dtype=np.float64)
            np.testing.assert_allclose(a / a.sum(), ff, rtol=1e-5, atol=1e-6)
    first = np.asarray(pf[0], dtype=np.float64)  # the constructed case, client 0: weights ∝ (1, 1, 1/1501)
    assert first[2] == 0 and first.sum() < 1 - 1e-4
    np.testing.assert_allclose(combination_weights(np.ones(3), np.stack([h.double().numpy() for h in hs]), 0),
                               [0.5, 0.5, 0.0], atol=1e-7)
