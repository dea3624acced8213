"""Real Flower processes on loopback for the deployment tests: a SuperLink, SuperNodes started by `fedforge deploy
client`, runs started by `fedforge deploy server`; TLS material made at test time with `cryptography`.

Every process is started in its own session and ended (with its whole process tree) when the cluster closes, also
when a test fails.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel to kill it when the test process dies (Linux), so that a test
    process killed from outside (a timeout, Ctrl-C twice) leaves no SuperLink or SuperNode running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tls(folder: Path, nodes: int = 2) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, a second unrelated CA, and EC P-384 key pairs
    (OpenSSH format) for SuperNode authentication."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def ca(name: str):
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    pem = serialization.Encoding.PEM
    ca_key, ca_cert = ca("fedforge test CA")
    _, other_cert = ca("an unrelated CA")
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                   .issuer_name(ca_cert.subject).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    out = {"ca": folder / "ca.crt", "other_ca": folder / "other-ca.crt", "cert": folder / "server.pem",
           "key": folder / "server.key"}
    out["ca"].write_bytes(ca_cert.public_bytes(pem))
    out["other_ca"].write_bytes(other_cert.public_bytes(pem))
    out["cert"].write_bytes(server_cert.public_bytes(pem))
    out["key"].write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    for i in range(nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        out[f"node{i}"] = folder / f"node{i}"
        out[f"node{i}"].write_bytes(k.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
        out[f"node{i}.pub"] = folder / f"node{i}.pub"
        out[f"node{i}.pub"].write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH))
    return out


class Cluster:
    """A SuperLink on a free loopback port and the processes attached to it."""

    def __init__(self, folder: Path, tls: dict[str, Path] | None = None, auth: bool = False):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, FLWR_HOME=str(folder / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
                        FLWR_DISABLE_UPDATE_CHECK="1", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []
        cmd = [str(BIN / "flower-superlink"), "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if tls is None:
            cmd += ["--insecure"]
        else:
            cmd += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile",
                    str(tls["key"])]
        if auth:
            cmd += ["--enable-supernode-auth"]
        self.link = self.start(cmd, "superlink")
        self.wait_listening()

    def connection(self) -> list[str]:
        return ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls["ca"])]

    def start(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                             cwd=self.folder, preexec_fn=_die_with_parent)
        log.close()
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_listening(self, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.link.poll() is not None:
                raise RuntimeError(f"the SuperLink exited ({self.link.returncode}):\n{self.log('superlink')[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the SuperLink did not listen within {timeout:g} s:\n{self.log('superlink')[-3000:]}")

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """The Flower CLI against this SuperLink (a connection named `test` in this cluster's FLWR_HOME)."""
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        conn = f'address = "{self.address}"\n' + ("insecure = true\n" if self.tls is None else
                                                   f'root-certificates = "{self.tls["ca"]}"\n')
        (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n[superlink.test]\n{conn}')
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, public_key: Path) -> None:
        r = self.flwr("supernode", "register", str(public_key), "test")
        assert r.returncode == 0, r.stdout + r.stderr

    def node(self, cid: int, dataset: str, model: str = "cnn", *extra: str, name: str | None = None) -> subprocess.Popen:
        cmd = [str(BIN / "fedforge"), "deploy", "client", "--superlink", self.address, *self.connection(),
               "--dataset", dataset, "--client-id", str(cid), "--model", model,
               "--state-dir", str(self.folder / f"states-{name or cid}"), *extra]
        return self.start(cmd, name or f"node{cid}")

    def online(self) -> int:
        """SuperNodes the SuperLink lists as online."""
        r = self.flwr("supernode", "ls", "test", "--format", "json")
        try:
            nodes = json.loads(r.stdout[r.stdout.find("{"):]).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def server(self, out: Path, *args: str, name: str = "server") -> subprocess.Popen:
        cmd = [str(BIN / "fedforge"), "deploy", "server", "--superlink", self.address, *self.connection(),
               "--out", str(out), *args]
        return self.start(cmd, name)

    def wait(self, p: subprocess.Popen, timeout: float) -> int:
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{p.name} did not finish within {timeout:g} s:\n"  # type: ignore[attr-defined]
                                 f"{self.log(p.name)[-4000:]}") from None  # type: ignore[attr-defined]

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
        """End a process with its whole tree (its session; descendants that started their own session too)."""
        tree = [p.pid]
        try:
            import psutil

            tree += [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        except Exception:
            pass
        for pid in tree:
            try:
                os.killpg(pid, sig) if pid == p.pid else os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            try:
                os.killpg(pid, signal.SIGKILL) if pid == p.pid else os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for p in reversed(self.procs):
            if p is not self.link:
                self.stop(p, grace=5)
        self.stop(self.link, grace=5)
