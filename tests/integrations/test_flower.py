"""Flower deployment (`fedforge deploy`): real SuperLink and SuperNode processes on loopback.

* the same numbers as a simulation (FedAvg, Ditto on three CNN nodes; FedProto with a different architecture on the
  third node), bytes up and down included;
* every registered algorithm runs one round on two SuperNodes (all in one Flower run, in lock-step);
* a SuperNode killed mid-round: the round completes with the others and the node is logged as a timeout;
* TLS: a node without the SuperLink's CA cannot connect; SuperNode authentication: an unregistered node is refused;
* bad input (an unreachable SuperLink, a certificate that does not match) gets one sentence and exit code 2.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedforge[flower]')")

import fedforge  # noqa: E402
from fedforge.algorithms import ALGORITHMS  # noqa: E402
from tests.support.flower_cluster import BIN, Cluster, free_port, make_tls  # noqa: E402

pytestmark = pytest.mark.slow
ROUND_TIMEOUT = "300"  # generous: a busy CI machine must never cut off a live node in the parity runs
HETERO = "ht_resnet4"  # the third node's architecture in the heterogeneous run (a ResNet against two CNNs)
# the library's own algorithms: other test modules register test-only ones in this process, which the Flower
# processes (a fresh import of fedforge) do not know
LIBRARY_ALGORITHMS = [e.name for e in ALGORITHMS.entries() if e.obj.__module__.startswith("fedforge.")]
COMPARED = ("global_acc", "personalized_acc", "loss", "global_loss", "personalized_loss", "bytes_up", "bytes_down",
            "params_up", "params_down", "clients")


@pytest.fixture(scope="module")
def pfllib_digits(tmp_path_factory) -> str:
    """digits split over three clients, written in PFLlib's layout: every node reads its own client's files."""
    from fedforge.config import build_config
    from fedforge.core.simulation import build_partition
    from fedforge.data import load_dataset
    from fedforge.data.export import export_pfllib

    folder = tmp_path_factory.mktemp("digits-pfllib") / "digits"
    cfg = build_config(overrides={"dataset": "digits", "clients": 3, "partition": "dirichlet", "alpha": 0.5, "seed": 3})
    ds = load_dataset("digits")
    export_pfllib(ds, build_partition(cfg, ds), folder, batch_size=cfg.batch_size)
    return f"pfllib:{folder}"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _same(flower: list[dict], sim: list[dict], what: str) -> None:
    assert len(flower) == len(sim), f"{what}: {len(flower)} records in Flower mode, {len(sim)} in simulation"
    for a, b in zip(flower, sim):
        for k in COMPARED:
            x, y = a.get(k), b.get(k)
            if isinstance(y, float) and isinstance(x, float):
                assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9), f"{what}, round {b['round']}: {k} {x} != {y}"
            else:
                assert x == y, f"{what}, round {b['round']}: {k} {x!r} != {y!r}"


def _finished(cluster: Cluster, server: subprocess.Popen, timeout: float = 900) -> None:
    code = cluster.wait(server, timeout)
    assert code == 0, f"fedforge deploy server exited {code}:\n{cluster.log(server.name)[-6000:]}"


# --------------------------------------------------------------------------------- a homogeneous federation
@pytest.fixture(scope="module")
def cnn_cluster(tmp_path_factory, pfllib_digits):
    c = Cluster(tmp_path_factory.mktemp("flower-cnn"))
    try:
        c.node(0, pfllib_digits)
        c.node(1, pfllib_digits)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def contract_runs(cnn_cluster, tmp_path_factory):
    """Every registered algorithm, one round on two SuperNodes, in one Flower run (lock-step experiments)."""
    out = tmp_path_factory.mktemp("contract")
    names = LIBRARY_ALGORITHMS
    t0 = time.perf_counter()
    server = cnn_cluster.server(out, "--min-nodes", "2", "--round-timeout", "900", "--algorithm", ",".join(names),
                                "--rounds", "1", "--lr", "0.05", "--batch-size", "32", name="contract")
    code = cnn_cluster.wait(server, 1800)
    print(f"contract: {len(names)} algorithms, one round on 2 SuperNodes: {time.perf_counter() - t0:.0f} s")
    return out, code, cnn_cluster.log("contract")


@pytest.mark.parametrize("name", LIBRARY_ALGORITHMS)
def test_every_algorithm_runs_on_flower(contract_runs, name):
    out, code, log = contract_runs
    run = out / name
    assert (run / "summary.json").is_file(), f"{name} did not finish in Flower mode (server exit {code}):\n{log[-6000:]}"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    recs = _records(run)
    assert [r["round"] for r in recs if r.get("stage") is None] == [0, 1]
    cls = ALGORITHMS.get(name)
    last = recs[-1]
    for view, flag in (("global_acc", cls.has_global), ("personalized_acc", cls.personalized)):
        if flag:
            assert last[view] is not None and math.isfinite(last[view]), f"{name}: {view} is {last[view]}"
    assert recs[1]["clients"] == 2  # both devices' updates arrived (some methods send nothing down in round 1)
    assert not (run / "failures.jsonl").exists() or not (run / "failures.jsonl").read_text().strip()


def test_same_numbers_as_simulation(cnn_cluster, contract_runs, pfllib_digits, tmp_path):
    """FedAvg and Ditto on three CNN SuperNodes, two rounds: every record equals the simulation's (same seed and
    data), bytes up and down included; client states persist on the devices, the server keeps none."""
    cnn_cluster.node(2, pfllib_digits)
    server = cnn_cluster.server(tmp_path / "out", "--min-nodes", "3", "--round-timeout", ROUND_TIMEOUT,
                                "--algorithm", "fedavg,ditto", "--rounds", "2", "--seed", "5", name="parity-cnn")
    _finished(cnn_cluster, server)
    for name in ("fedavg", "ditto"):
        sim = fedforge.run(algorithm=name, dataset=pfllib_digits, model="cnn", rounds=2, seed=5, run_dir=False)
        _same(_records(tmp_path / "out" / name), sim.records, name)
    run = next(cnn_cluster.folder.glob("states-2/run-*")).name  # node 2 joined for this run only
    states = sorted(p.name for p in cnn_cluster.folder.glob(f"states-*/{run}/experiment-1/*.safetensors"))
    assert states == [f"client-{i:07d}.safetensors" for i in range(3)]  # Ditto's personal models, one per device
    ckpt = sorted((tmp_path / "out" / "ditto" / "checkpoints").glob("*"))
    assert ckpt, "the server writes its checkpoints as in simulation"


# ------------------------------------------------------------------------------- a heterogeneous federation
@pytest.fixture(scope="module")
def hetero_cluster(tmp_path_factory, pfllib_digits):
    c = Cluster(tmp_path_factory.mktemp("flower-hetero"))
    try:
        c.node(0, pfllib_digits)
        c.node(1, pfllib_digits)
        c.node(2, pfllib_digits, HETERO)
        yield c
    finally:
        c.close()


def test_heterogeneous_models_same_numbers_as_simulation(hetero_cluster, pfllib_digits, tmp_path):
    """FedProto with a ResNet on the third device and CNNs on the other two (each node's own --model)."""
    server = hetero_cluster.server(tmp_path / "out", "--min-nodes", "3", "--round-timeout", ROUND_TIMEOUT,
                                   "--algorithm", "fedproto", "--rounds", "2", name="parity-hetero")
    _finished(hetero_cluster, server)
    sim = fedforge.run(algorithm="fedproto", dataset=pfllib_digits, model=f"cnn,cnn,{HETERO}", rounds=2,
                       run_dir=False)
    _same(_records(tmp_path / "out"), sim.records, "fedproto")
    cfg = (tmp_path / "out" / "config.yaml").read_text()
    assert f"cnn,cnn,{HETERO}" in cfg


def test_a_lost_node_is_cut_off_and_logged(hetero_cluster, pfllib_digits, tmp_path):
    """A SuperNode killed mid-round: the round completes with the other two, and the lost client is logged in
    failures.jsonl (kind timeout: cut off when the SuperLink reports the node gone, or at --round-timeout, whichever
    comes first); its evaluation is left out of the record."""
    out = tmp_path / "out"
    server = hetero_cluster.server(out, "--min-nodes", "3", "--round-timeout", ROUND_TIMEOUT, "--algorithm", "fedproto",
                                   "--rounds", "1", "--local-epochs", "3", name="lost")
    metrics = out / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.exists() and metrics.read_text().strip()):  # round 0's evaluation is written: round 1 starts
        assert server.poll() is None, hetero_cluster.log("lost")[-4000:]
        assert time.monotonic() - t0 < 600, "round 0 was never recorded"
        time.sleep(0.2)
    victim = next(p for p in hetero_cluster.procs if getattr(p, "name", "") == "node2")
    hetero_cluster.stop(victim, sig=signal.SIGKILL, grace=5)
    _finished(hetero_cluster, server)
    recs = _records(out)
    assert recs[-1]["round"] == 1 and recs[-1]["clients"] == 2 and recs[-1]["failed"] == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    train = [f for f in failures if f.get("task", "train") == "train"]
    assert [(f["round"], f["client"], f["kind"]) for f in train] == [(1, 2, "timeout")]
    assert "did not answer within --round-timeout" in train[0]["error"] or "went away" in train[0]["error"]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


# ------------------------------------------------------------------------------------ TLS and node authentication
@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flower-tls")
    tls = make_tls(folder / "certs", nodes=2)
    c = Cluster(folder, tls=tls, auth=True)
    try:
        c.register(tls["node0.pub"])  # node1's key is never registered
        yield c
    finally:
        c.close()


def _client(cluster: Cluster, *args: str, name: str, timeout: float = 300) -> tuple[int, str]:
    p = cluster.start([str(BIN / "fedforge"), "deploy", "client", "--superlink", cluster.address, "--dataset", "digits",
                       "--client-id", "0", "--model", "cnn", "--max-retries", "1", *args], name)
    return cluster.wait(p, timeout), cluster.log(name)


def test_tls_node_without_the_ca_cannot_connect(secure_cluster):
    tls = secure_cluster.tls
    code, log = _client(secure_cluster, "--root-certificates", str(tls["other_ca"]), "--auth-key", str(tls["node0"]),
                        name="wrong-ca")
    assert code == 2
    assert "does not verify" in log and "--root-certificates" in log
    # Flower's own SuperNode, given the wrong CA, fails its TLS handshake and never joins
    p = secure_cluster.start([str(BIN / "flower-supernode"), "--superlink", secure_cluster.address, "--root-certificates",
                              str(tls["other_ca"]), "--auth-supernode-private-key", str(tls["node0"]), "--port",
                              str(free_port()), "--max-retries", "1"], "raw-wrong-ca")
    assert secure_cluster.wait(p, 300) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in secure_cluster.log("raw-wrong-ca")
    code, log = _client(secure_cluster, "--insecure", name="plaintext")  # plain HTTP to a TLS SuperLink
    assert code == 2 and "SuperNode authentication" not in log


def test_unauthenticated_node_is_refused_registered_node_runs(secure_cluster, tmp_path):
    tls = secure_cluster.tls
    code, log = _client(secure_cluster, "--root-certificates", str(tls["ca"]), "--auth-key", str(tls["node1"]),
                        name="unregistered")
    assert code == 2 and "refused this SuperNode" in log and "flwr supernode register" in log
    code, log = _client(secure_cluster, "--root-certificates", str(tls["ca"]), name="no-key")
    assert code == 2 and "refused this SuperNode" in log
    # the registered node joins over TLS and trains
    secure_cluster.node(0, "digits", "cnn", "--auth-key", str(tls["node0"]), name="registered")
    server = secure_cluster.server(tmp_path / "out", "--min-nodes", "1", "--round-timeout", ROUND_TIMEOUT,
                                   "--algorithm", "fedavg", "--rounds", "1", name="secure-run")
    _finished(secure_cluster, server)
    recs = _records(tmp_path / "out")
    assert recs[-1]["round"] == 1 and recs[-1]["clients"] == 1 and math.isfinite(recs[-1]["global_acc"])


# ------------------------------------------------------------------------------------------------- bad input
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedforge"), "deploy", *args], capture_output=True, text=True, timeout=300)


def test_unreachable_superlink_is_one_sentence_exit_2(tmp_path):
    port = free_port()  # nothing listens there
    r = _cli("server", "--superlink", f"127.0.0.1:{port}", "--insecure", "--min-nodes", "1", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "cannot reach the SuperLink" in r.stderr and r.stderr.count("\n") == 1
    r = _cli("client", "--superlink", f"127.0.0.1:{port}", "--insecure", "--dataset", "digits", "--client-id", "0",
             "--model", "cnn", "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "cannot reach the SuperLink" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "s").exists()  # nothing written before the check


def test_certificate_that_does_not_match_is_one_sentence_exit_2(secure_cluster, tmp_path):
    r = _cli("server", "--superlink", secure_cluster.address, "--root-certificates",
             str(secure_cluster.tls["other_ca"]), "--min-nodes", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "does not verify" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing half-written
