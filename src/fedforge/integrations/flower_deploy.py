"""``fedforge deploy server`` and ``fedforge deploy client``: experiments on real devices through Flower.

``deploy client`` (on each device) checks the node's data and model, checks that the SuperLink answers (and, with
TLS, that its certificate is signed by ``--root-certificates``), then starts a Flower SuperNode (``flower-supernode``)
whose node config names the data, the client id and the model; Flower starts fedforge's ClientApp for the messages
it receives. ``deploy server`` writes a Flower App whose run config holds the experiments, submits it to the SuperLink
(``flwr run``), follows its log and reports each experiment's summary. See ``docs/deploy.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..commands import register_command
from ..errors import ConfigError, FedforgeError
from .flower import INSTALL_HINT, NodeSettings, describe, import_flwr, load_node_data

APP_NAME = "fedforge-deploy"
CONNECTION = "fedforge"


# ---------------------------------------------------------------------------------------- checks
def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--superlink '{address}' is not HOST:PORT (for example 127.0.0.1:9093).")
    return host, int(port)


def check_superlink(address: str, root_certificates: str | None, insecure: bool, timeout: float = 10.0) -> None:
    """One clear sentence if the SuperLink cannot be reached, or if its TLS certificate does not match."""
    host, port = parse_address(address)
    context = None
    if not insecure:
        if root_certificates is not None and not Path(root_certificates).is_file():
            raise ConfigError(f"--root-certificates {root_certificates} does not exist; give the CA certificate (PEM) "
                              f"that signed the SuperLink's certificate, or pass --insecure for a SuperLink without TLS.")
        try:
            context = ssl.create_default_context(cafile=root_certificates)
        except (ssl.SSLError, ValueError, OSError) as e:
            raise ConfigError(f"--root-certificates {root_certificates} is not a PEM CA certificate ({e}).") from None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConfigError(f"cannot reach the SuperLink at {address} ({e.strerror or e}); start it (flower-superlink) or "
                          f"fix --superlink.") from None
    with sock:
        if context is None:
            return
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as e:
            which = f"--root-certificates {root_certificates}" if root_certificates else "the system's CA certificates"
            raise ConfigError(f"the SuperLink at {address} presents a TLS certificate that {which} does not verify "
                              f"({e.verify_message}); give the CA certificate that signed its --ssl-certfile.") from None
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"no TLS handshake with the SuperLink at {address} ({e}); if it runs with --insecure, "
                              f"pass --insecure here too.") from None


def flower_bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed; {INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pump(stream: Any, tail: deque, quiet: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        tail.append(line)
        if not quiet:
            sys.stderr.write(line)
            sys.stderr.flush()


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """TOML of nested dicts of strings, numbers, booleans and lists of strings (what Flower's files hold)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def key(k: str) -> str:
        return k if k.replace("-", "").replace("_", "").isalnum() else json.dumps(k)

    lines = [f"{key(k)} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}.{key(k)}" if prefix else key(k)
            body = to_toml(v, name)
            if any(not isinstance(x, dict) for x in v.values()) or not v:
                out += f"\n[{name}]\n"
            out += body
    return out


# ------------------------------------------------------------------------------------------ client
def client_main(args: argparse.Namespace) -> int:
    import_flwr()
    from ..models import create_model

    if not args.insecure and not args.root_certificates:
        raise ConfigError("give --root-certificates CA.pem (the CA that signed the SuperLink's certificate), or "
                          "--insecure for a SuperLink started with --insecure.")
    if args.insecure and args.auth_key:
        raise ConfigError("SuperNode authentication (--auth-key) needs TLS; give --root-certificates instead of --insecure.")
    if args.auth_key and not Path(args.auth_key).is_file():
        raise ConfigError(f"--auth-key {args.auth_key} does not exist; give the node's private key (OpenSSH format).")
    state_dir = args.state_dir or str(Path.home() / ".cache" / "fedforge" / "flower-states" / f"client-{args.client_id}")
    s = NodeSettings(dataset=args.dataset, client_id=args.client_id, model=args.model, state_dir=state_dir,
                     data_root=args.data_root, label_map=args.label_map, num_classes=args.num_classes,
                     train_ratio=args.train_ratio, seed=args.seed, device=args.device, threads=args.threads)
    s = NodeSettings.from_node_config(s.node_config())  # the same checks the ClientApp makes
    data = load_node_data(s)
    desc = describe(s, data)
    create_model(s.model, tuple(data.dataset.input_shape), data.dataset.num_classes, seed=0)
    print(f"fedforge: client {s.client_id}: {desc['dataset']}, {len(data.train)} training and {len(data.test)} test "
          f"samples, {s.model}; client states in {Path(state_dir).expanduser()}", file=sys.stderr)
    check_superlink(args.superlink, args.root_certificates, args.insecure)
    Path(state_dir).expanduser().mkdir(parents=True, exist_ok=True)
    conf = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="fedforge-node-", delete=False)
    with conf:
        conf.write(to_toml(s.node_config()))
    cmd = [flower_bin("flower-supernode"), "--superlink", args.superlink, "--node-config", conf.name,
           "--port", str(args.runtime_port or free_port())]
    cmd += ["--insecure"] if args.insecure else ["--root-certificates", args.root_certificates]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", args.auth_key]
    if args.max_retries is not None:
        cmd += ["--max-retries", str(args.max_retries)]
    env = dict(os.environ)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # the node's own executor: start ClientApps promptly
    try:
        code, tail = _run_forwarding(cmd, env, quiet=getattr(args, "quiet", False))
    finally:
        os.unlink(conf.name)
    if code == 0 or code < 0:
        return 0 if code == 0 else 128 - code
    text = "".join(tail)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        raise ConfigError(f"the SuperLink at {args.superlink} presents a TLS certificate that --root-certificates "
                          f"{args.root_certificates} does not verify; give the CA certificate that signed it.")
    if any(m in text for m in ("Failed to activate SuperNode", "code: 2004", "Failed to register", "code: 2001",
                                "must be registered")):
        how = ("register the node's public key with `flwr supernode register KEY.pub`" if args.auth_key else
               "this SuperLink authenticates its SuperNodes: give --auth-key with a registered key")
        raise ConfigError(f"the SuperLink at {args.superlink} refused this SuperNode; {how}.")
    if "could not establish a connection" in text or "Exit Code: 305" in text:
        raise ConfigError(f"the SuperNode could not connect to the SuperLink at {args.superlink}; see its log above.")
    return code


def _run_forwarding(cmd: list[str], env: dict[str, str], quiet: bool) -> tuple[int, deque]:
    """Run a Flower process with its output forwarded to stderr (and its last lines kept); SIGINT/SIGTERM reach it."""
    tail: deque = deque(maxlen=80)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pump = threading.Thread(target=_pump, args=(proc.stdout, tail, quiet), daemon=True)
    pump.start()
    previous = {}

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        pump.join(timeout=5)
    return code, tail


# ------------------------------------------------------------------------------------------ server
def write_app(folder: Path, spec: dict[str, Any]) -> Path:
    """A Flower App (a pyproject.toml alone) whose components are fedforge's apps and whose run config holds ``spec``."""
    from .._version import __version__

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
           "project": {"name": APP_NAME, "version": __version__, "description": "fedforge experiments on Flower",
                       "license": "Apache-2.0", "dependencies": []},
           "tool": {"flwr": {"app": {"publisher": "fedforge",
                                     "components": {"serverapp": "fedforge.integrations.flower_app:server_app",
                                                    "clientapp": "fedforge.integrations.flower_app:client_app"},
                                     "config": {"fedforge": json.dumps(spec)}}}}}
    (folder / "pyproject.toml").write_text(to_toml(doc))
    return folder


def write_connection(home: Path, address: str, root_certificates: str | None, insecure: bool) -> None:
    conn: dict[str, Any] = {"address": address}
    if insecure:
        conn["insecure"] = True
    elif root_certificates:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(to_toml({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def _flwr(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([flower_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _json_out(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    text = proc.stdout.strip()
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def server_main(args: argparse.Namespace) -> int:
    import_flwr()
    from ..algorithms import ALGORITHMS
    from ..config import config_from_args

    if not args.insecure and not args.root_certificates:
        raise ConfigError("give --root-certificates CA.pem (the CA that signed the SuperLink's certificate), or "
                          "--insecure for a SuperLink started with --insecure.")
    base = config_from_args(args)
    names = [n.strip() for n in str(base.algorithm).split(",") if n.strip()]
    if not names:
        raise ConfigError("--algorithm names no algorithm.")
    out = Path(base.out or Path("runs") / f"flower_{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    experiments = []
    for name in names:
        cls = ALGORITHMS.get(name)
        cls.Params.from_dict(base.params, owner=name)  # unknown or out-of-range hyper-parameters: refused here
        cfg = dataclasses.replace(base, algorithm=name, out=str(out if len(names) == 1 else out / name))
        if getattr(cfg, "new_clients", 0):
            raise ConfigError("--new-clients is not available with Flower deployment yet; leave it out.")
        experiments.append(cfg.validate().to_dict())
    if args.round_timeout is not None and args.round_timeout <= 0:
        raise ConfigError(f"--round-timeout must be > 0 seconds, got {args.round_timeout:g}.")
    spec = {"experiments": experiments, "min_nodes": args.min_nodes, "round_timeout": args.round_timeout,
            "node_timeout": args.node_timeout}
    check_superlink(args.superlink, args.root_certificates, args.insecure)
    work = Path(tempfile.mkdtemp(prefix="fedforge-deploy-"))
    try:
        app = write_app(work / "app", spec)
        env = dict(os.environ, FLWR_HOME=str(work / "home"))
        write_connection(work / "home", args.superlink, args.root_certificates, args.insecure)
        started = _flwr(["run", str(app), CONNECTION, "--format", "json"], env)
        run_id = _json_out(started).get("run-id")
        if started.returncode != 0 or not run_id:
            why = (started.stderr.strip() or started.stdout.strip()).splitlines()[-1:] or ["no answer"]
            raise ConfigError(f"the SuperLink at {args.superlink} did not start the run ({why[0]}).")
        print(f"fedforge: Flower run {run_id}: {len(names)} experiment(s) ({', '.join(names)}) on at least "
              f"{args.min_nodes} SuperNode(s); results in {out}", file=sys.stderr)
        status = _follow(run_id, env, quiet=getattr(args, "quiet", False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    state, details = status.get("status", "unknown"), status.get("status-details", "")
    for exp in experiments:
        _print_summary(Path(exp["out"]), exp["algorithm"])
    if state == "finished:completed":
        return 0
    print(f"fedforge: error: Flower run {run_id} ended as {state}: {details}", file=sys.stderr)
    return 1


def _follow(run_id: str, env: dict[str, str], quiet: bool) -> dict[str, Any]:
    """Stream the run's log until it finishes; its final status (``flwr ls``)."""
    log_proc = subprocess.Popen([flower_bin("flwr"), "log", run_id, CONNECTION, "--stream"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: deque = deque(maxlen=200)
    pump = threading.Thread(target=_pump, args=(log_proc.stdout, tail, quiet), daemon=True)
    pump.start()
    try:
        while True:
            time.sleep(2.0)
            runs = _json_out(_flwr(["ls", "--run-id", run_id, CONNECTION, "--format", "json"], env)).get("runs") or []
            if runs and str(runs[0].get("status", "")).startswith("finished"):
                return dict(runs[0])
    except KeyboardInterrupt:
        _flwr(["stop", run_id, CONNECTION], env, timeout=60)
        raise
    finally:
        time.sleep(1.0)
        if log_proc.poll() is None:
            log_proc.terminate()
        try:
            log_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log_proc.kill()
        pump.join(timeout=5)


def _print_summary(path: Path, algorithm: str) -> None:
    summary = path / "summary.json"
    if not summary.is_file():
        return
    s = json.loads(summary.read_text())

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    last = s.get("last", {})
    print(f"{algorithm}: last global_acc={fmt(last.get('global_acc'))} personalized_acc="
          f"{fmt(last.get('personalized_acc'))}  ({path})")


# ----------------------------------------------------------------------------------------- command
@register_command("deploy", help="run algorithms on real devices through Flower (deploy server / deploy client)")
def cmd_deploy(args: argparse.Namespace) -> int:
    if args.role == "server":
        return server_main(args)
    if args.role == "client":
        return client_main(args)
    raise FedforgeError("choose `fedforge deploy server` or `fedforge deploy client`.")


def _connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection to the SuperLink")
    g.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address (its --port)")
    g.add_argument("--root-certificates", metavar="CA.pem", help="CA certificate that signed the SuperLink's TLS "
                   "certificate")
    g.add_argument("--insecure", action="store_true", help="no TLS (a SuperLink started with --insecure)")


@cmd_deploy.arguments
def _arguments(p: argparse.ArgumentParser) -> None:
    from ..config import add_config_options

    sub = p.add_subparsers(dest="role", metavar="ROLE", required=True)
    s = sub.add_parser("server", help="run experiments on the SuperNodes connected to a SuperLink (one run directory "
                       "each); --algorithm a,b,c runs several in lock-step on the same devices")
    _connection_options(s)
    g = s.add_argument_group("federation")
    g.add_argument("--min-nodes", type=int, required=True, help="SuperNodes to wait for (one client each)")
    g.add_argument("--node-timeout", type=float, default=300.0, help="seconds to wait for them (default 300)")
    g.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for its clients; those "
                   "that have not answered are left out and logged as timeouts (default 600)")
    add_config_options(s)
    c = sub.add_parser("client", help="start a SuperNode on this device that serves one client with its own data and "
                       "architecture")
    _connection_options(c)
    c.add_argument("--auth-key", metavar="KEY", help="this node's private key (OpenSSH, EC) for SuperNode "
                   "authentication (register KEY.pub on the SuperLink with `flwr supernode register`)")
    c.add_argument("--dataset", required=True, help="this node's data: npz:FILE (its samples alone), pfllib:DIR (with "
                   "--client-id picking its client), or any fedforge dataset spec")
    c.add_argument("--client-id", type=int, required=True, help="this client's id in the federation (0..N-1)")
    c.add_argument("--model", required=True, help="this client's architecture (see `fedforge list models`)")
    c.add_argument("--label-map", help="relabel this node's classes into the federation's, e.g. 3:0,7:1")
    c.add_argument("--num-classes", type=int, help="classes of the federation (default: this node's largest label + 1)")
    c.add_argument("--train-ratio", type=float, default=0.75, help="share of a file without its own split used for "
                   "training (default 0.75)")
    c.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    c.add_argument("--data-root", help="dataset cache folder (default $FEDFORGE_DATA)")
    c.add_argument("--state-dir", help="where this client's states persist between rounds (default "
                   "~/.cache/fedforge/flower-states/client-<id>)")
    c.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0: one)")
    c.add_argument("--runtime-port", type=int, help="local port of the SuperNode's runtime API (default: a free one)")
    c.add_argument("--max-retries", type=int, help="times the SuperNode retries a lost connection (default: no limit)")
