"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) started from locally built binaries, for integration tests.

Design choices:

* Everything listens on 127.0.0.1 only, on ports picked free at start-up; a
  port taken between picking and binding (another test session) is retried on
  fresh ports instead of failing the session.
* Authentication is by client certificates from a throw-away CA generated with
  the ``openssl`` CLI, authorisation is ``Node,RBAC`` as on a real cluster, and
  each component has its own identity (the controller-manager even runs each
  controller under its own service account), so RBAC mistakes in charts show up
  here and not first in production.
* Leader election is off: a single replica per component, and it saves the
  lease acquisition wait at start-up.
* Processes are owned by pid: teardown sends SIGTERM to each process group, then
  SIGKILL after a deadline. Logs stay in the session temp dir and their tails are
  attached to failures.
"""

from __future__ import annotations

import contextlib
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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client, config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# The first address of the service range is the `kubernetes` Service's; the
# serving certificate names it so in-cluster clients could use it too.
KUBERNETES_SERVICE_IP = "10.0.0.1"
LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started, or has died."""


def build_binaries(script: Path = BUILD_SCRIPT, timeout: float = 3 * 3600) -> Path:
    """Run build.sh (seconds when warm) and return the bin dir it prints last."""
    try:
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ControlPlaneError(f"{script} did not finish within {timeout:.0f}s") from exc
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("build.sh:")]
        raise ControlPlaneError(lines[-1] if lines else f"{script} failed: {done.stderr[-500:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def die_with_parent(signame: str = "KILL") -> list[str]:
    """An argv prefix that signals the child when the thread that started it
    exits. A CI job killed with SIGKILL (timeout) runs no teardown; without
    this its etcd, apiserver and pods would outlive it and hold ports. KILL by
    default: an orphaned apiserver's graceful shutdown waits on etcd and open
    watches for a minute. ``setpriv`` (util-linux) execs, so the pid stays
    the child's; where it is missing, children are only ended by teardown."""
    setpriv = shutil.which("setpriv")
    return [setpriv, f"--pdeathsig={signame}", "--"] if setpriv else []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ControlPlaneError(f"openssl {args[0]} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Pki:
    """A CA and the key pairs signed by it, as files in ``directory``."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def sa_key(self) -> Path:
        """Private key that signs service-account tokens."""
        return self.directory / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.directory / "sa.pub"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @classmethod
    def create(cls, directory: Path) -> Pki:
        # EC P-256 keys: generating RSA keys costs most of a second each on a
        # slow CI core and buys nothing here.
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl(
            "req",
            "-x509",
            *ec,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=unlearning-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=directory,
        )
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=directory)
        _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
        return pki

    def issue(self, name: str, subject: str, *, server_sans: Sequence[str] = ()) -> None:
        """Sign a leaf certificate; ``server_sans`` makes it a serving cert."""
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        usage = "serverAuth" if server_sans else "clientAuth"
        exts = ["-addext", f"extendedKeyUsage={usage}", "-addext", "basicConstraints=CA:FALSE"]
        if server_sans:
            exts += ["-addext", "subjectAltName=" + ",".join(server_sans)]
        _openssl(
            "req",
            "-new",
            *ec,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
            *exts,
            cwd=self.directory,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-copy_extensions",
            "copyall",
            "-out",
            f"{name}.crt",
            cwd=self.directory,
        )

    def kubeconfig(self, path: Path, server: str, user: str) -> Path:
        # JSON is valid YAML: no YAML dependency for a file we only write.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(self.ca_cert)}}],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate": str(self.cert(user)),
                        "client-key": str(self.key(user)),
                    },
                }
            ],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config, indent=2))
        return path


@dataclass
class Component:
    """One control-plane process, owned by pid, logging to a file."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [*die_with_parent(), *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own process group: teardown signals it without touching pytest.
                start_new_session=True,
            )

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def describe(self) -> str:
        state = "running" if self.exit_code() is None else f"exited with {self.exit_code()}"
        return f"--- {self.name} ({state}), log {self.log}, last lines:\n{tail(self.log)}"


def _port_clash(log: Path) -> bool:
    return "address already in use" in tail(log, 200)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler.

    Use ``start()``/``stop()`` or the context manager. ``kubeconfig`` is an admin
    (system:masters) kubeconfig; ``kubeconfig_for(user)`` issues others.
    """

    bin_dir: Path
    workdir: Path
    startup_timeout: float = 90.0
    components: dict[str, Component] = field(default_factory=dict)
    server: str = ""
    api_port: int = 0
    pki: Pki | None = None
    kubeconfig: Path = Path()
    startup_seconds: float = 0.0
    first_death: str = ""
    _stopped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- start-up ---------------------------------------------------------
    def start(self) -> None:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        try:
            self.pki = Pki.create(self.workdir / "pki")
            self.pki.issue("admin", "/O=system:masters/CN=admin")
            self.pki.issue("controller-manager", "/CN=system:kube-controller-manager")
            self.pki.issue("scheduler", "/CN=system:kube-scheduler")
            self.pki.issue("front-proxy-client", "/CN=front-proxy-client")
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._start_scheduler()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        threading.Thread(target=self._watchdog, name="control-plane-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        # With etcd gone the apiserver still accepts connections and each
        # request waits for etcd's timeouts; stopping everything turns that
        # into immediate connection errors, and check_alive() names the cause.
        while not self._stopped:
            if dead := self.dead():
                self.first_death = dead[0].describe()
                self.stop()
                return
            time.sleep(0.5)

    def _deadline(self) -> float:
        return time.monotonic() + self.startup_timeout

    def _launch(
        self,
        name: str,
        make_argv: Callable[[], list[str]],
        ready: Callable[[], bool],
        attempts: int = 3,
    ) -> None:
        """Start ``name`` and wait until ``ready()``; retry on port clashes."""
        log = self.workdir / "logs" / f"{name}.log"
        for attempt in range(attempts):
            comp = Component(name, make_argv(), log)
            self.components[name] = comp
            comp.start()
            deadline = self._deadline()
            while time.monotonic() < deadline:
                if comp.exit_code() is not None:
                    break
                if ready():
                    return
                time.sleep(0.2)
            comp.stop()
            if comp.exit_code() is not None and _port_clash(log) and attempt + 1 < attempts:
                continue
            why = "did not become ready" if comp.exit_code() is None else "exited"
            raise ControlPlaneError(f"{name} {why} during start-up\n{self.diagnostics()}")
        raise AssertionError("unreachable")

    def _start_etcd(self) -> None:
        ports: dict[str, int] = {}

        def argv() -> list[str]:
            ports["client"], ports["peer"] = free_port(), free_port()
            data = self.workdir / "etcd"
            shutil.rmtree(data, ignore_errors=True)
            client, peer = f"http://127.0.0.1:{ports['client']}", f"http://127.0.0.1:{ports['peer']}"
            return [
                str(self.bin_dir / "etcd"),
                "--name=test",
                f"--data-dir={data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                # Test data is disposable; fsync dominates API latency on CI disks.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]

        def ready() -> bool:
            body = _get(f"http://127.0.0.1:{ports['client']}/health")
            return body is not None and '"health":"true"' in body.replace(" ", "")

        self._launch("etcd", argv, ready)
        self.etcd_url = f"http://127.0.0.1:{ports['client']}"

    def _start_apiserver(self) -> None:
        assert self.pki is not None
        pki = self.pki
        ctx = self.client_ssl_context("admin")

        def argv() -> list[str]:
            self.api_port = free_port()
            self.server = f"https://127.0.0.1:{self.api_port}"
            pki.issue(
                "apiserver",
                "/CN=kube-apiserver",
                server_sans=[
                    "IP:127.0.0.1",
                    f"IP:{KUBERNETES_SERVICE_IP}",
                    "DNS:localhost",
                    "DNS:kubernetes",
                    "DNS:kubernetes.default",
                    "DNS:kubernetes.default.svc",
                    "DNS:kubernetes.default.svc.cluster.local",
                ],
            )
            return [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.cert('apiserver')}",
                f"--tls-private-key-file={pki.key('apiserver')}",
                f"--client-ca-file={pki.ca_cert}",
                # The aggregation layer's front proxy: without it every client
                # of extension-apiserver-authentication (controller-manager,
                # scheduler, webhooks) logs "missing content for CA bundle".
                f"--requestheader-client-ca-file={pki.ca_cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.cert('front-proxy-client')}",
                f"--proxy-client-key-file={pki.key('front-proxy-client')}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=false",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,NodeRestriction,"
                "LimitRanger,ResourceQuota,DefaultStorageClass,DefaultTolerationSeconds,"
                "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--api-audiences={self.server}",
                "--allow-privileged=true",
                # Endpoints may not hold a loopback address, so the reconciler of
                # the `kubernetes` Service would only log errors every 10 s.
                "--endpoint-reconciler-type=none",
                "--storage-media-type=application/vnd.kubernetes.protobuf",
                "--v=1",
            ]

        def ready() -> bool:
            return _get(f"{self.server}/readyz", ctx) == "ok"

        self._launch("kube-apiserver", argv, ready)
        self.kubeconfig = pki.kubeconfig(self.workdir / "admin.kubeconfig", self.server, "admin")

    def _component_flags(self, user: str) -> tuple[list[str], int]:
        assert self.pki is not None
        kubeconfig = self.pki.kubeconfig(self.workdir / f"{user}.kubeconfig", self.server, user)
        port = free_port()
        return (
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / (user + '-certs')}",
                "--leader-elect=false",
                "--v=1",
            ],
            port,
        )

    def _start_controller_manager(self) -> None:
        assert self.pki is not None
        pki = self.pki
        port = 0

        def argv() -> list[str]:
            nonlocal port
            flags, port = self._component_flags("controller-manager")
            return [
                str(self.bin_dir / "kube-controller-manager"),
                *flags,
                # All default-on controllers (job, garbagecollector, namespace,
                # ttl-after-finished, serviceaccount(-token), root-ca-cert-publisher,
                # nodelifecycle, ...): the fake node must survive nodelifecycle's
                # not-ready taints like a real kubelet does, by heartbeats.
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # GC of finished pods beyond this count; keep test debris bounded.
                "--terminated-pod-gc-threshold=100",
            ]

        self._launch(
            "kube-controller-manager", argv, lambda: _get(f"https://127.0.0.1:{port}/healthz", _insecure()) == "ok"
        )

    def _start_scheduler(self) -> None:
        port = 0

        def argv() -> list[str]:
            nonlocal port
            flags, port = self._component_flags("scheduler")
            return [str(self.bin_dir / "kube-scheduler"), *flags]

        self._launch("kube-scheduler", argv, lambda: _get(f"https://127.0.0.1:{port}/healthz", _insecure()) == "ok")

    # ---- use --------------------------------------------------------------
    def kubeconfig_for(self, user: str, subject: str) -> Path:
        """Issue a client certificate (``subject`` like ``/O=group/CN=user``)."""
        assert self.pki is not None
        with self._lock:
            if not self.pki.cert(user).exists():
                self.pki.issue(user, subject)
            return self.pki.kubeconfig(self.workdir / f"{user}.kubeconfig", self.server, user)

    def client_ssl_context(self, user: str = "admin") -> ssl.SSLContext:
        assert self.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.cert(user)), str(self.pki.key(user)))
        return ctx

    def server_ssl_context(self) -> ssl.SSLContext:
        """Trusts the apiserver, presents no client certificate."""
        assert self.pki is not None
        return ssl.create_default_context(cafile=str(self.pki.ca_cert))

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl as admin; raises with stderr when ``check``."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        # input="" rather than None: kubectl must never read pytest's stdin.
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, input=input or "")
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def helm(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run the built helm against this cluster, with its state in the temp dir."""
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
        }
        argv = [str(self.bin_dir / "helm"), *args]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=env, stdin=subprocess.DEVNULL
        )
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def api_client(self) -> client.ApiClient:
        """A fresh ``kubernetes.client.ApiClient`` authenticated as admin."""
        configuration = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig), client_configuration=configuration
        )
        return client.ApiClient(configuration)

    def dead(self) -> list[Component]:
        return [c for c in self.components.values() if c.exit_code() is not None]

    def check_alive(self) -> None:
        """Raise with the logs of any component that has exited."""
        if self.first_death:
            raise ControlPlaneError(f"control plane died; first to exit:\n{self.first_death}\n{self.diagnostics()}")
        if dead := self.dead():
            names = ", ".join(c.name for c in dead)
            raise ControlPlaneError(f"control plane component(s) died: {names}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        return "\n".join(c.describe() for c in self.components.values())

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        # Reverse start order: clients first, etcd last, so nothing logs
        # connection errors into the tails we keep.
        for comp in reversed(list(self.components.values())):
            comp.stop()


def _insecure() -> ssl.SSLContext:
    # The controller-manager and scheduler serve /healthz with self-signed
    # certificates they generate at start-up; only liveness is checked here.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return str(resp.read().decode())
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return None


def main(argv: Sequence[str] = sys.argv[1:]) -> int:
    """Start a control plane by hand: ``python tests/cluster/controlplane.py [workdir]``."""
    workdir = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="unlearning-cp-"))
    cp = ControlPlane(build_binaries(), workdir)
    with cp:
        print(f"up in {cp.startup_seconds:.1f}s; export KUBECONFIG={cp.kubeconfig}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not cp.dead():
                time.sleep(1)
        print(cp.diagnostics())
    return 0


if __name__ == "__main__":
    sys.exit(main())
