"""A fake kubelet: registers a GPU Node and runs its pods as local processes.

Run as ``python tests/cluster/nodeagent.py --kubeconfig K --root DIR`` (the
``gpu_node`` fixture does). It does what the kubelet does, as far as the
operator, the Job controller and the scheduler can tell:

* registers ``Node/<name>`` with ``nvidia.com/gpu`` capacity, keeps it Ready by
  renewing its Lease in ``kube-node-lease`` (the node lifecycle controller
  taints nodes whose lease goes stale) and re-posting its status;
* watches the pods bound to it and runs each container's ``command + args`` as
  a local process, with the container's env, volumes and termination message;
* reports pod status (Pending -> Running -> Succeeded/Failed, container states,
  exit codes, termination messages) and removes deleted pods.

Images: a container whose image is on a loopback registry
(``127.0.0.1:PORT/name@sha256:...``, what the end-to-end tier installs the
chart with) runs from that image, as a kubelet with containerd would run it:
pulled by digest and unpacked once per layer into the user's cache
(``oci.py``), then run by ``runc`` on an overlay of those layers with the
image's entrypoint, user and env unless the pod overrides them, the pod's
``securityContext`` (user, group, fsGroup, read-only root, capabilities,
no-new-privileges), the volumes bound at their mount paths, a private
``/tmp`` when the pod mounts none, and the pod's network (below: the host's,
or the namespace of its sandbox, which runc joins). Its container id is
``runc://<id>``; what /proc said about its credentials, root mount and
network namespace is written to ``<pod dir>/<container>.runtime.json``.

The venv fast path, for the harness's own tests and inner-loop runs: any
other image name is not pulled; the container runs on this host with the
environment of the agent's Python (``PATH`` starts with the directory of
``sys.executable``, the project venv), so ``unlearn ...`` or ``python -m
unlearning_operator`` run the working tree's code. A container without
``command`` takes it from ``--image-command IMAGE=JSON`` (matching the
image name without tag), else it fails like a container whose image has no
entrypoint.

Paths on the fast path: containers expect absolute paths (``/data``, ``/etc/unlearning``,
``/var/run/secrets/kubernetes.io/serviceaccount``, ``/dev/termination-log``).
Each container starts under ``podinit.py``, which enters a private mount
namespace (needs root) and bind-mounts each volume at its mountPath, so
nothing on the host sees them. Mount points that do not exist on the host are created
empty and removed when the last agent on the host exits. Without mount
namespaces (not root) nothing is mounted and the env var
``HARNESS_PATH_MAP`` (JSON: mountPath -> host dir) tells the process where
each volume really is.

Volumes: configMap, secret, downwardAPI, projected (service-account token via
the TokenRequest API, kube-root-ca.crt, namespace), emptyDir (a per-pod dir),
hostPath, persistentVolumeClaim (``<root>/pvcs/<namespace>/<claimName>``,
created on first use; tests pre-populate it).

Networking is the host's (hostNetwork semantics): podIP is 127.0.0.1, the
in-cluster API is ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and the real
apiserver port; except for pods a NetworkPolicy selects, which get a network
namespace of their own and only the traffic the policies allow (podnet.py):
a sandbox process holds the namespace, a container from an image joins it
(a ``network`` entry with its path in the runc config), a venv container
enters it in podinit, and both get the generated ``/etc/hosts``.
Readiness probes (``httpGet``, ``tcpSocket``) are run as the kubelet runs them, to
the pod IP (inside an isolated pod's namespace): a container with one is Ready
once it passes, so a rolling update waits for pods that answer. Liveness,
startup, ``exec`` and ``grpc`` probes are not run: such a container is Ready
once started.
Resource limits are not enforced; GPU pods get ``CUDA_VISIBLE_DEVICES`` from a
pool of ``--gpus`` indices, pods without GPUs get an empty one.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client import ApiException

# Run as a script, this file's directory is on sys.path; imported (tests), the package is.
try:
    import oci
    import podnet
except ImportError:  # pragma: no cover - imported as tests.cluster.nodeagent
    from tests.cluster import oci, podnet

log = logging.getLogger("nodeagent")

LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 5.0
STATUS_SECONDS = 30.0
MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
MOUNT_REGISTRY = Path("/tmp/unlearning-harness-mountpoints")
PODINIT = Path(__file__).resolve().parent / "podinit.py"
# What a container's process runs from: the venv, the working tree its
# editable install points into, and the base interpreter. podinit re-exposes
# any of them that a pod's volume would hide (a checkout under /tmp, where the
# Job and the operator mount an emptyDir).
KEEP_VISIBLE = sorted({sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[2])})


def api_clients(kubeconfig: str) -> tuple[Any, Any, Any]:
    """CoreV1, CoordinationV1 and StorageV1 APIs, typed ``Any`` on purpose: the
    agent reads and writes the API's JSON as plain dicts (what a status patch
    speaks), and the generated models would only add None checks."""
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, client_configuration=configuration
    )
    api_client = client.ApiClient(configuration)
    return client.CoreV1Api(api_client), client.CoordinationV1Api(api_client), client.StorageV1Api(api_client)


def to_dict(api: Any, obj: Any) -> dict[str, Any]:
    return dict(api.api_client.sanitize_for_serialization(obj))


def stream(api: Any, list_func: Any, stop: threading.Event, **kwargs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Watch events as (type, object dict); ends at the server timeout or ``stop``."""
    w = watch.Watch()  # type: ignore[no-untyped-call]
    for event in w.stream(list_func, **kwargs):  # type: ignore[no-untyped-call]
        if stop.is_set():
            w.stop()  # type: ignore[no-untyped-call]
            return
        obj = event["object"]
        yield event["type"], obj if isinstance(obj, dict) else to_dict(api, obj)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def can_unshare() -> bool:
    """Whether podinit can make mount namespaces here (root, or CAP_SYS_ADMIN)."""
    spec = json.dumps({"namespace": True, "scratch": "/", "mounts": []})
    argv = [sys.executable, "-I", "-S", str(PODINIT), spec, "--", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("no mount namespaces: %s", exc)
        return False
    if done.returncode != 0:
        log.warning("no mount namespaces: %s", done.stderr.strip()[-500:])
    return done.returncode == 0


class MountPoints:
    """Host mount points created for containers, shared by agents on a host.

    Each agent holds a shared lock while alive; the last one to exit (the one
    that can take the lock exclusively) removes the empty mount points it finds
    in the registry. Removing one while another agent's container has
    something mounted on it would detach that mount, hence the lock.
    """

    def __init__(self) -> None:
        self._lock_file = open(f"{MOUNT_REGISTRY}.lock", "a+")  # noqa: SIM115 - held for the agent's life
        fcntl.flock(self._lock_file, fcntl.LOCK_SH)
        self._mutex = threading.Lock()

    def ensure(self, target: Path, is_file: bool) -> None:
        if target.exists() or target.is_symlink():
            return
        top = target
        while not top.parent.exists():
            top = top.parent
        with self._mutex, open(MOUNT_REGISTRY, "a") as reg:
            reg.write(f"{top}\n")
        if is_file:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        else:
            target.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        try:
            entries = MOUNT_REGISTRY.read_text().split()
        except FileNotFoundError:
            entries = []
        for entry in sorted(set(entries), key=len, reverse=True):
            _remove_empty_tree(Path(entry))
        with contextlib.suppress(FileNotFoundError):
            MOUNT_REGISTRY.unlink()
        self._lock_file.close()


def _remove_empty_tree(top: Path) -> None:
    if top.is_file():
        if top.stat().st_size == 0:
            top.unlink()
        return
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
        with contextlib.suppress(OSError):
            for f in Path(dirpath).iterdir():
                if f.is_file() and f.stat().st_size == 0:
                    f.unlink()
            os.rmdir(dirpath)


class PodStoppedError(Exception):
    """The pod was deleted while a container was still being prepared."""


class ContainerConfigError(Exception):
    """The container cannot be created as specified (the kubelet's CreateContainerConfigError)."""


def set_volume_ownership(path: Path, gid: int) -> None:
    """The kubelet's fsGroup handling of a writable volume: group ``gid``, group-writable, setgid dirs.

    Only when the volume's root does not already match (fsGroupChangePolicy OnRootMismatch)."""
    st = path.stat()
    if st.st_gid == gid and st.st_mode & 0o2070 == 0o2070:
        return
    for dirpath, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            item = Path(dirpath) / name
            if item.is_symlink():
                continue
            os.chown(item, -1, gid)
            mode = item.stat().st_mode
            item.chmod(mode | (0o2070 if item.is_dir() else 0o060))
    os.chown(path, -1, gid)
    path.chmod(path.stat().st_mode | 0o2070)


def container_facts(pid: int) -> dict[str, Any]:
    """Credentials, root mount and network namespace of a container's process, as /proc shows them."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    root_mount = ""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            root_mount = line  # the last mount on / is the one the process sees
    return {
        "pid": pid,
        "uid": [int(x) for x in status["Uid"].split()],
        "gid": [int(x) for x in status["Gid"].split()],
        "groups": [int(x) for x in status.get("Groups", "").split()],
        "capEff": status["CapEff"].strip(),
        "noNewPrivs": int(status.get("NoNewPrivs", "0").strip()),
        "rootMount": root_mount,
        "rootReadOnly": "ro" in root_mount.split()[5].split(","),
        # Which network namespace it is in (``net:[inode]``): the host's, or its pod's sandbox (podnet.py).
        "netns": os.readlink(f"/proc/{pid}/ns/net"),
    }


@dataclass
class Mount:
    source: Path
    target: str
    read_only: bool


@dataclass
class ContainerRun:
    """One container of one pod: its process and what is reported about it."""

    name: str
    spec: dict[str, Any]
    log_path: Path
    message_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None
    waiting: dict[str, Any] | None = None
    # Set when the container runs from its image (runc), not from the venv.
    container_id: str | None = None
    image_id: str | None = None
    # The readiness prober's state (PodWorker._probe_readiness): which start it probes, the verdict,
    # consecutive successes (> 0) or failures (< 0), and when to probe next (monotonic).
    probed_restart: int | None = None
    probe_ready: bool = False
    probe_streak: int = 0
    next_probe: float = 0.0

    @property
    def readiness_probe(self) -> dict[str, Any] | None:
        """The readinessProbe the agent runs (httpGet, tcpSocket); exec and grpc probes are not run."""
        probe = self.spec.get("readinessProbe") or {}
        return dict(probe) if {"httpGet", "tcpSocket"} & probe.keys() else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.terminated is None

    @property
    def runtime_id(self) -> str:
        """The status' containerID: ``runc://<id>`` from an image, ``harness://<pid>`` from the venv."""
        if self.container_id is not None:
            return f"runc://{self.container_id}"
        return f"harness://{self.popen.pid if self.popen else 0}"

    def status(self, image: str) -> dict[str, Any]:
        if self.terminated is not None:
            state: dict[str, Any] = {"terminated": self.terminated}
        elif self.popen is not None:
            state = {"running": {"startedAt": self.started_at}}
        else:
            state = {"waiting": self.waiting or {"reason": "ContainerCreating"}}
        out: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": self.image_id or f"harness://{image}",
            # Ready once started, or with a readiness probe once it has passed (as the kubelet decides).
            "ready": self.running and (self.probe_ready or self.readiness_probe is None),
            "started": self.running,
            "restartCount": self.restart_count,
            "state": state,
        }
        if self.popen is not None:
            out["containerID"] = self.runtime_id
        if self.last_terminated is not None:
            out["lastState"] = {"terminated": self.last_terminated}
        return out


class GpuPool:
    def __init__(self, count: int) -> None:
        self._free = list(range(count))
        self._lock = threading.Lock()

    def take(self, n: int) -> list[int]:
        with self._lock:
            got, self._free = self._free[:n], self._free[n:]
            return got

    def give(self, ids: list[int]) -> None:
        with self._lock:
            self._free = sorted(set(self._free) | set(ids))


def _quantity_int(value: Any) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _expand(text: str, env: dict[str, str]) -> str:
    # Kubernetes' $(VAR) expansion: $$ escapes, unknown references stay as is.
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


class PodWorker(threading.Thread):
    """Runs one pod from volume set-up to its final status."""

    def __init__(self, agent: Agent, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}-{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = agent.root / "pods" / f"{self.ns}_{self.pod_name}_{self.uid[:8]}"
        self.stop_event = threading.Event()
        self.grace = 30.0
        self.gpus: list[int] = []
        self.runs: dict[str, ContainerRun] = {}
        self.init_runs: dict[str, ContainerRun] = {}
        self._lock = threading.Lock()
        # Status patches come from this thread and the readiness prober: one at a time, the final one last.
        self._report_lock = threading.RLock()
        self.start_time = now()
        self.deadline: float | None = None
        self.api_volumes: set[str] = set()
        # Set once a final phase with its own reason (DeadlineExceeded) is out.
        self.final_reported = False
        # Its own network namespace when a NetworkPolicy selects the pod (podnet.py).
        self.net: podnet.PodNetwork | None = None
        self.ready = False

    @property
    def pod_ip(self) -> str:
        return self.net.pod_ip if self.net is not None else "127.0.0.1"

    # ---- API helpers --------------------------------------------------------
    def _get(self, kind: str, name: str) -> dict[str, Any]:
        reader = {
            "configmap": self.agent.api.read_namespaced_config_map,
            "secret": self.agent.api.read_namespaced_secret,
            "pvc": self.agent.api.read_namespaced_persistent_volume_claim,
        }[kind]
        obj = reader(name, self.ns)
        return to_dict(self.agent.api, obj)

    def _data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        try:
            obj = self._get(kind, name)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            raise
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        simple = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": spec.get("nodeName"),
            "spec.serviceAccountName": spec.get("serviceAccountName"),
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path not in simple:
            raise ValueError(f"unsupported fieldRef {path}")
        return str(simple[path] or "")

    def _token(self, audience: str | None, seconds: int) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": max(seconds, 600),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.pod_name, "uid": self.uid},
        }
        if audience:
            spec["audiences"] = [audience]
        got = self.agent.api.create_namespaced_service_account_token(sa, self.ns, {"spec": spec})
        return str(got.status.token)

    # ---- volumes --------------------------------------------------------------
    @staticmethod
    def _write(directory: Path, files: dict[str, bytes], mode: int | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode if mode is not None else 0o644)

    @staticmethod
    def _select(data: dict[str, bytes], items: list[dict[str, Any]] | None) -> dict[str, bytes]:
        if not items:
            return dict(data)
        return {it.get("path", it["key"]): data[it["key"]] for it in items if it["key"] in data}

    def _projection(self, src: dict[str, Any]) -> dict[str, bytes]:
        if sat := src.get("serviceAccountToken"):
            token = self._token(sat.get("audience"), int(sat.get("expirationSeconds", 3600)))
            return {sat["path"]: token.encode()}
        if cm := src.get("configMap"):
            data = self._data("configmap", cm["name"], bool(cm.get("optional")))
            return self._select(data or {}, cm.get("items"))
        if sec := src.get("secret"):
            data = self._data("secret", sec["name"], bool(sec.get("optional")))
            return self._select(data or {}, sec.get("items"))
        if dapi := src.get("downwardAPI"):
            return self._downward(dapi)
        raise ValueError(f"unsupported projected source {sorted(src)}")

    def _downward(self, dapi: dict[str, Any]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for item in dapi.get("items") or []:
            if "fieldRef" in item:
                out[item["path"]] = self._field(item["fieldRef"]["fieldPath"]).encode()
        return out

    def _volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        fs_group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if {"configMap", "secret", "projected", "downwardAPI"} & vol.keys():
                self.api_volumes.add(name)
            target = self.dir / "volumes" / name
            mode = vol.get(next((k for k in vol if k != "name"), ""), {}) or {}
            default_mode = mode.get("defaultMode") if isinstance(mode, dict) else None
            if "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
                # World-writable, as the kubelet makes it: a non-root container writes there.
                target.chmod(0o777)
            elif cm := vol.get("configMap"):
                data = self._data("configmap", cm["name"], bool(cm.get("optional")))
                self._write(target, self._select(data or {}, cm.get("items")), default_mode)
            elif sec := vol.get("secret"):
                data = self._data("secret", sec["secretName"], bool(sec.get("optional")))
                self._write(target, self._select(data or {}, sec.get("items")), default_mode)
            elif proj := vol.get("projected"):
                files: dict[str, bytes] = {}
                for src in proj.get("sources") or []:
                    files.update(self._projection(src))
                self._write(target, files, default_mode)
            elif dapi := vol.get("downwardAPI"):
                self._write(target, self._downward(dapi), default_mode)
            elif pvc := vol.get("persistentVolumeClaim"):
                # Fails (and is retried) while the claim does not exist yet,
                # as a kubelet waits for it.
                self._get("pvc", pvc["claimName"])
                target = self.agent.pvc_path(self.ns, pvc["claimName"])
                target.mkdir(parents=True, exist_ok=True)
                if fs_group is not None and not pvc.get("readOnly"):
                    set_volume_ownership(target, fs_group)
            elif hp := vol.get("hostPath"):
                target = Path(hp["path"])
                if hp.get("type") in ("DirectoryOrCreate",):
                    target.mkdir(parents=True, exist_ok=True)
            else:
                raise ValueError(f"volume {name}: unsupported type {sorted(k for k in vol if k != 'name')}")
            paths[name] = target
        return paths

    # ---- containers -----------------------------------------------------------
    @property
    def hostname(self) -> str:
        """The pod's host name as the kubelet sets it: spec.hostname when set (an Indexed Job's pods get
        ``<job>-<index>``), else the pod's name, cut to a DNS label."""
        return str(self.pod["spec"].get("hostname") or self.pod_name)[:63]

    def _env(self, spec: dict[str, Any], image_env: dict[str, str] | None = None) -> dict[str, str]:
        """The container's environment: the image's ENV (the venv's for the fast path), what the
        kubelet injects, then the pod's ``envFrom`` and ``env``."""
        injected = {
            "HOSTNAME": self.hostname,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.agent.api_port),
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in self.gpus),
        }
        if image_env is not None:
            base = {**image_env, **injected}
        else:
            base = {
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "HOME": os.environ.get("HOME", "/root"),
                **injected,
                "PYTHONUNBUFFERED": "1",
            }
            for key in ("LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV"):
                if key in os.environ:
                    base[key] = os.environ[key]
        env: dict[str, str] = {}
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if ref := src.get("configMapRef"):
                data = self._data("configmap", ref["name"], bool(ref.get("optional"))) or {}
            elif ref := src.get("secretRef"):
                data = self._data("secret", ref["name"], bool(ref.get("optional"))) or {}
            else:
                continue
            env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
        for var in spec.get("env") or []:
            name = var["name"]
            if "value" in var:
                env[name] = _expand(var["value"] or "", {**base, **env})
                continue
            source = var.get("valueFrom") or {}
            value: str | None = ""
            if ref := source.get("fieldRef"):
                value = self._field(ref["fieldPath"])
            elif ref := source.get("configMapKeyRef"):
                data = self._data("configmap", ref["name"], bool(ref.get("optional"))) or {}
                value = data[ref["key"]].decode() if ref["key"] in data else None
                if value is None and not ref.get("optional"):
                    raise ValueError(f"env {name}: key {ref['key']} not in ConfigMap {ref['name']}")
            elif ref := source.get("secretKeyRef"):
                data = self._data("secret", ref["name"], bool(ref.get("optional"))) or {}
                value = data[ref["key"]].decode() if ref["key"] in data else None
                if value is None and not ref.get("optional"):
                    raise ValueError(f"env {name}: key {ref['key']} not in Secret {ref['name']}")
            elif ref := source.get("resourceFieldRef"):
                resources = spec.get("resources") or {}
                kind, _, res = ref["resource"].partition(".")
                value = str((resources.get(kind) or {}).get(res, "0"))
            if value is not None:
                env[name] = value
        return {**base, **env}

    def _argv(self, spec: dict[str, Any], env: dict[str, str]) -> list[str]:
        command = list(spec.get("command") or [])
        args = list(spec.get("args") or [])
        if not command:
            image = str(spec.get("image", ""))
            default = self.agent.image_command(image)
            if default is None:
                raise ValueError(f"image {image!r} has no entrypoint here: set command, or --image-command")
            command = default
        return [_expand(a, env) for a in command + args]

    def _mounts(self, spec: dict[str, Any], volumes: dict[str, Path], run: ContainerRun) -> list[Mount]:
        mounts: list[Mount] = []
        for vm in spec.get("volumeMounts") or []:
            source = volumes[vm["name"]]
            if sub := vm.get("subPath"):
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True, exist_ok=True)
            # The kubelet mounts these read-only whatever the volumeMount says.
            read_only = bool(vm.get("readOnly")) or vm["name"] in self.api_volumes
            mounts.append(Mount(source, vm["mountPath"], read_only))
        term_path = spec.get("terminationMessagePath") or "/dev/termination-log"
        mounts.append(Mount(run.message_path, term_path, False))
        # Parents before children, so a nested mount lands inside its parent.
        return sorted(mounts, key=lambda m: m.target.count("/"))

    def _spawn(self, run: ContainerRun, volumes: dict[str, Path]) -> None:
        if oci.parse_reference(str(run.spec.get("image", ""))) is not None:
            self._spawn_image(run, volumes)
        else:
            self._spawn_venv(run, volumes)

    def _phase_now(self) -> str:
        return "Running" if any(r.popen is not None for r in self.runs.values()) else "Pending"

    def _pull(self, run: ContainerRun) -> oci.PulledImage:
        """The container's image, pulled (or found in the cache); retried with back-off as the kubelet does."""
        image = str(run.spec["image"])
        delay = 1.0
        while True:
            run.waiting = {"reason": "ContainerCreating", "message": f"pulling image {image}"}
            self._report(self._phase_now())
            try:
                started = time.monotonic()
                pulled = self.agent.store.pull(image)
                seconds = time.monotonic() - started
                log.info("pod %s/%s: image %s ready in %.1fs", self.ns, self.pod_name, image, seconds)
                return pulled
            except oci.ImageError as exc:
                log.warning("pod %s/%s: %s", self.ns, self.pod_name, exc)
                run.waiting = {"reason": "ErrImagePull", "message": str(exc)}
                self._report(self._phase_now())
            if self.stop_event.wait(delay):
                raise PodStoppedError
            delay = min(delay * 2, 30.0)

    def _etc_hosts(self) -> Path:
        """The pod's /etc/hosts, as the kubelet writes it; an isolated pod's also names the namespace's
        Services (podnet.py: there is no cluster DNS here)."""
        if self.net is not None:
            return self.net.hosts
        hosts = self.dir / "etc-hosts"
        hosts.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.0.1\t{self.hostname}\n")
        return hosts

    def _spawn_image(self, run: ContainerRun, volumes: dict[str, Path]) -> None:
        """Run the container from its image with runc: the image's entrypoint, user and env unless the pod
        overrides them, the volumes at their mount paths, the host's network or, for a pod a NetworkPolicy
        selects, the network namespace of its sandbox (podnet.py)."""
        if self.agent.runc is None:
            raise RuntimeError("runc not found: install it (apt-get install runc; images/tools.sh does)")
        spec = run.spec
        pulled = self._pull(run)
        image_config = pulled.config.get("config") or {}
        env = self._env(spec, oci.image_env(image_config))
        cid = re.sub(r"[^\w.-]", "-", f"{self.uid[:8]}-{run.name}-{run.restart_count}")
        bundle = self.dir / "containers" / cid
        shutil.rmtree(bundle, ignore_errors=True)
        for sub in ("rootfs", "upper", "work"):
            (bundle / sub).mkdir(parents=True)
        mounts = [
            oci.BindMount(m.source, m.target, m.read_only)
            for m in [*self._mounts(spec, volumes, run), Mount(self._etc_hosts(), "/etc/hosts", False)]
        ]
        if Path("/etc/resolv.conf").is_file():
            mounts.append(oci.BindMount(Path("/etc/resolv.conf"), "/etc/resolv.conf", True))
        try:
            argv = [_expand(a, env) for a in oci.command_line(image_config, spec)]
            config_json = oci.runtime_spec(
                image_config=image_config, layers=pulled.layers, argv=argv, env=env, pod=self.pod, container=spec,
                mounts=mounts, rootfs=bundle / "rootfs", hostname=self.hostname,
                cgroup=f"/unlearning-harness/{cid}", netns=self.net.netns_path if self.net is not None else None,
            )  # fmt: skip
        except oci.ConfigError as exc:
            # The kubelet keeps such a container waiting; a test sees the reason instead of a hang.
            run.waiting = {"reason": "CreateContainerConfigError", "message": str(exc)}
            raise ContainerConfigError(str(exc)) from None
        (bundle / "config.json").write_text(json.dumps(config_json, indent=1))
        run.message_path.write_bytes(b"")
        # World-writable, as the kubelet creates it: the container's user (65532) writes its message there.
        run.message_path.chmod(0o666)
        shim = {
            "runc": {
                "binary": self.agent.runc, "root": str(self.agent.runc_root), "id": cid, "bundle": str(bundle),
                "rootfs": str(bundle / "rootfs"), "upper": str(bundle / "upper"), "work": str(bundle / "work"),
                "lower": [str(layer) for layer in pulled.layers],
            }
        }  # fmt: skip
        log.info("pod %s/%s container %s: runc %s from %s: %s", self.ns, self.pod_name, run.name, cid,
                 pulled.image_id, shlex.join(argv))  # fmt: skip
        with run.log_path.open("ab") as out:
            run.popen = subprocess.Popen(
                [sys.executable, "-I", "-S", str(PODINIT), json.dumps(shim), "--"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run.container_id, run.image_id = cid, pulled.image_id
        run.started_at = now()
        run.terminated = None
        run.waiting = None
        threading.Thread(target=self._record_runtime, args=(run, cid), name=f"facts-{cid}", daemon=True).start()

    def _record_runtime(self, run: ContainerRun, cid: str) -> None:
        """What the kernel says about the running container (uid, gid, groups, capabilities, root mount),
        read from /proc, into ``<pod dir>/<container>.runtime.json``: evidence that does not rest on the
        spec the agent wrote."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run.popen is not None and run.popen.poll() is None:
            done = subprocess.run(
                [str(self.agent.runc), "--root", str(self.agent.runc_root), "state", cid],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            state = json.loads(done.stdout) if done.returncode == 0 else {}
            if state.get("status") == "running" and state.get("pid"):
                try:
                    facts = container_facts(int(state["pid"]))
                except OSError:
                    return  # exited meanwhile
                facts["id"] = cid
                (self.dir / f"{run.name}.runtime.json").write_text(json.dumps(facts, indent=1))
                return
            time.sleep(0.1)

    def _spawn_venv(self, run: ContainerRun, volumes: dict[str, Path]) -> None:
        """The fast path for inner-loop tests: the container's command runs from this checkout's venv."""
        spec = run.spec
        env = self._env(spec)
        argv = self._argv(spec, env)
        mounts = self._mounts(spec, volumes, run)
        if self.net is not None:
            # Only an isolated pod's: the host's /etc/hosts serves the others on the host network.
            mounts.append(Mount(self._etc_hosts(), "/etc/hosts", True))
        # No image WORKDIR to honour: a per-container scratch dir keeps
        # relative writes out of the host's /.
        scratch = self.dir / "cwd" / run.name
        scratch.mkdir(parents=True, exist_ok=True)
        run.message_path.write_bytes(b"")
        if self.agent.mount_namespaces:
            covered: list[str] = []
            for m in mounts:
                # Targets nested in another mount are made by podinit inside it.
                if not any(m.target == c or m.target.startswith(c.rstrip("/") + "/") for c in covered):
                    self.agent.mountpoints.ensure(Path(m.target), m.source.is_file())
                covered.append(m.target)
        else:
            env["HARNESS_PATH_MAP"] = json.dumps({m.target: str(m.source) for m in mounts})
        init_spec = {
            "namespace": self.agent.mount_namespaces,
            **({"netns": self.net.netns_path} if self.net is not None else {}),
            "keep": KEEP_VISIBLE,
            **({"workingDir": spec["workingDir"]} if spec.get("workingDir") else {"scratch": str(scratch)}),
            "mounts": [
                {"source": str(m.source), "target": m.target, "readOnly": m.read_only, "isFile": m.source.is_file()}
                for m in mounts
            ],
        }
        full = [sys.executable, "-I", "-S", str(PODINIT), json.dumps(init_spec), "--", *argv]
        log.info("pod %s/%s container %s: %s", self.ns, self.pod_name, run.name, shlex.join(argv))
        with run.log_path.open("ab") as out:
            run.popen = subprocess.Popen(
                full,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run.started_at = now()
        run.terminated = None

    def _finish(self, run: ContainerRun, code: int) -> None:
        message = run.message_path.read_bytes()[:MESSAGE_LIMIT].decode(errors="replace")
        policy = run.spec.get("terminationMessagePolicy") or "File"
        if not message and code != 0 and policy == "FallbackToLogsOnError":
            text = run.log_path.read_text(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(text)[-2048:]
        if code < 0:
            # Killed by a signal: report it the way a container runtime does.
            code = 128 - code
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": run.started_at,
            "finishedAt": now(),
            "containerID": run.runtime_id,
        }
        if message:
            term["message"] = message
        run.terminated = term

    def _kill(self, run: ContainerRun, grace: float) -> None:
        if run.popen is None or run.popen.poll() is not None:
            return
        if run.container_id is not None:
            # TERM, then KILL after the grace period, to the container's init, as a runtime does.
            self.agent.runc_kill(run.container_id, "TERM")
            try:
                run.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.agent.runc_kill(run.container_id, "KILL")
                run.popen.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.popen.pid, signal.SIGTERM)
        try:
            run.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.popen.pid, signal.SIGKILL)
            run.popen.wait()

    # ---- status ---------------------------------------------------------------
    def _report(self, phase: str, reason: str | None = None, message: str | None = None) -> None:
        with self._report_lock:
            self._patch_status(phase, reason, message)

    def _patch_status(self, phase: str, reason: str | None, message: str | None) -> None:
        spec = self.pod["spec"]
        images = {c["name"]: c.get("image", "") for c in spec.get("initContainers", []) + spec["containers"]}
        with self._lock:
            statuses = [r.status(images[n]) for n, r in self.runs.items()]
            init_statuses = [r.status(images[n]) for n, r in self.init_runs.items()]
        ready = phase == "Running" and all(s["ready"] for s in statuses)
        self.ready = ready
        init_done = all(r.terminated is not None and r.terminated["exitCode"] == 0 for r in self.init_runs.values())
        t = now()

        def cond(kind: str, ok: bool, why: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": t}
            if why and not ok:
                c["reason"] = why
            return c

        done_reason = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
            "containerStatuses": statuses,
            "conditions": [
                cond("PodReadyToStartContainers", True),
                cond("Initialized", init_done, "ContainersNotInitialized"),
                cond("ContainersReady", ready, done_reason),
                cond("Ready", ready, done_reason),
            ],
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        try:
            self.agent.api.patch_namespaced_pod_status(self.pod_name, self.ns, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, exc.reason)

    # ---- life cycle -----------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except PodStoppedError:
            pass
        except ContainerConfigError as exc:
            self._report("Pending", message=str(exc))
            self.stop_event.wait()
        except Exception as exc:
            # A kubelet reports what went wrong on the pod and carries on.
            log.exception("pod %s/%s failed", self.ns, self.pod_name)
            self._report("Failed", "HarnessError", f"{type(exc).__name__}: {exc}")
        finally:
            for r in [*self.init_runs.values(), *self.runs.values()]:
                self._kill(r, 0)
            if self.net is not None:
                self.net.close()
            self.agent.gpus.give(self.gpus)
            self.agent.worker_done(self)

    def _requested_gpus(self) -> int:
        total = 0
        for c in self.pod["spec"]["containers"]:
            res = c.get("resources") or {}
            total += _quantity_int(
                (res.get("limits") or {}).get("nvidia.com/gpu")
                or (res.get("requests") or {}).get("nvidia.com/gpu")
                or 0
            )
        return total

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.pod["spec"]
        for section, target in (("initContainers", self.init_runs), ("containers", self.runs)):
            for c in spec.get(section) or []:
                target[c["name"]] = ContainerRun(
                    c["name"], c, self.dir / f"{c['name']}.log", self.dir / f"{c['name']}.termination-log"
                )
        self.gpus = self.agent.gpus.take(self._requested_gpus())
        # Before the first status: the API refuses to change a pod IP once reported.
        if self.agent.network is not None:
            self.net = self.agent.network.attach(self.pod, self.dir)
        self._report("Pending")
        volumes = self._prepare_volumes()
        if volumes is None:
            return
        deadline = spec.get("activeDeadlineSeconds")
        self.deadline = time.monotonic() + float(deadline) if deadline else None
        policy = spec.get("restartPolicy", "Always")
        for run in self.init_runs.values():
            self._spawn(run, volumes)
            self._report("Pending")
            code = self._wait([run])
            if code is None:
                return
            if self.init_runs[run.name].terminated and code != 0:
                self._report("Failed")
                return
        for run in self.runs.values():
            self._spawn(run, volumes)
        self._report("Running")
        if any(r.readiness_probe is not None for r in self.runs.values()):
            threading.Thread(target=self._probe_readiness, name=f"probe-{self.pod_name}", daemon=True).start()
        self._supervise(policy, volumes)

    def _prepare_volumes(self) -> dict[str, Path] | None:
        # Missing ConfigMaps/claims are retried, as the kubelet retries mounts.
        while not self.stop_event.is_set():
            try:
                return self._volumes()
            except ApiException as exc:
                if exc.status != 404:
                    raise
                for r in self.runs.values():
                    r.waiting = {"reason": "ContainerCreating", "message": f"waiting for volume: {exc.reason}"}
                self._report("Pending")
            self.stop_event.wait(1.0)
        return None

    def _wait(self, runs: list[ContainerRun]) -> int | None:
        """Wait for one of ``runs`` to exit; None when the pod is being stopped."""
        while True:
            for run in runs:
                assert run.popen is not None
                code = run.popen.poll()
                if code is not None and run.terminated is None:
                    self._finish(run, code)
                    return code
            if self.deadline is not None and time.monotonic() > self.deadline:
                for run in runs:
                    self._kill(run, self.grace)
                    if run.popen is not None and run.terminated is None:
                        self._finish(run, run.popen.wait())
                self._report(
                    "Failed", "DeadlineExceeded", "Pod was active on the node longer than the specified deadline"
                )
                self.final_reported = True
                return None
            if self.stop_event.wait(0.2):
                for run in runs:
                    self._kill(run, self.grace)
                    if run.popen is not None and run.terminated is None:
                        self._finish(run, run.popen.wait())
                return None

    def _supervise(self, policy: str, volumes: dict[str, Path]) -> None:
        backoff: dict[str, float] = {}
        while True:
            live = [r for r in self.runs.values() if r.terminated is None]
            if not live:
                codes = [r.terminated["exitCode"] for r in self.runs.values() if r.terminated]
                self._report("Succeeded" if all(c == 0 for c in codes) else "Failed")
                return
            code = self._wait(live)
            if code is None:
                if self.final_reported:
                    return
                self._report(
                    "Failed" if any((r.terminated or {}).get("exitCode") for r in self.runs.values()) else "Succeeded"
                )
                return
            exited = next(r for r in live if r.terminated is not None)
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                # CrashLoopBackOff, shortened: tests should not wait minutes.
                delay = backoff.get(exited.name, 0.5)
                backoff[exited.name] = min(delay * 2, 10.0)
                exited.last_terminated, exited.terminated = exited.terminated, None
                exited.popen = None
                exited.restart_count += 1
                exited.waiting = {"reason": "CrashLoopBackOff", "message": f"back-off {delay:.1f}s"}
                self._report("Running")
                if self.stop_event.wait(delay):
                    return
                self._spawn(exited, volumes)
            self._report("Running")

    # ---- readiness --------------------------------------------------------------
    def _probe_readiness(self) -> None:
        """The kubelet's readiness prober: each (re)started container is not ready until its probe has
        passed ``successThreshold`` times, probed every ``periodSeconds`` after ``initialDelaySeconds``,
        and not ready again after ``failureThreshold`` failures. So a Deployment's rolling update waits
        for a new pod that answers, as on a real node, instead of one whose process merely started."""
        while self.is_alive() and not self.stop_event.wait(0.2):
            changed = False
            for run in list(self.runs.values()):
                probe = run.readiness_probe
                if probe is None:
                    continue
                if not run.running or run.probed_restart != run.restart_count:
                    changed |= run.probe_ready
                    run.probe_ready, run.probe_streak = False, 0
                    run.probed_restart = run.restart_count if run.running else None
                    run.next_probe = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
                    if not run.running:
                        continue
                if time.monotonic() < run.next_probe:
                    continue
                passed = self._probe(run, probe)
                run.next_probe = time.monotonic() + float(probe.get("periodSeconds", 10))
                if passed:
                    run.probe_streak = max(run.probe_streak, 0) + 1
                    ready = run.probe_ready or run.probe_streak >= int(probe.get("successThreshold", 1))
                else:
                    run.probe_streak = min(run.probe_streak, 0) - 1
                    ready = run.probe_ready and -run.probe_streak < int(probe.get("failureThreshold", 3))
                changed |= ready != run.probe_ready
                run.probe_ready = ready
            if changed:
                with self._report_lock:
                    # Never after the final status: that one is reported once every container has ended.
                    if any(r.running for r in self.runs.values()) and not self.final_reported:
                        self._patch_status("Running", None, None)

    def _probe(self, run: ContainerRun, probe: dict[str, Any]) -> bool:
        """One httpGet (2xx or 3xx passes) or tcpSocket probe, to the pod IP: inside the pod's network
        namespace when it has one (podnet.py), else on the host's."""
        action = probe.get("httpGet") or probe.get("tcpSocket") or {}
        port: Any = action.get("port")
        if isinstance(port, str) and not port.isdigit():
            named = {p.get("name"): p["containerPort"] for p in run.spec.get("ports") or []}
            port = named.get(port)
        if port is None:
            return False
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if self.net is not None:
                sock = self.net.connect_inside(int(port), timeout)
            else:
                sock = socket.create_connection(("127.0.0.1", int(port)), timeout=timeout)
        except OSError:
            return False
        if "httpGet" not in probe:
            sock.close()
            return True
        try:
            sock.settimeout(timeout)
            if action.get("scheme") == "HTTPS":
                # The kubelet does not verify a probe's certificate either.
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                sock = context.wrap_socket(sock)
            request = (
                f"GET {action.get('path') or '/'} HTTP/1.1\r\nHost: {self.pod_ip}:{port}\r\n"
                "User-Agent: kube-probe/harness\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(request.encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError:
            return False
        finally:
            sock.close()
        fields = head.split(b" ", 2)
        return len(fields) > 1 and fields[1].isdigit() and 200 <= int(fields[1]) < 400

    def stop(self, grace: float) -> None:
        self.grace = min(grace, 30.0)
        self.stop_event.set()


STORAGE_CLASS = "standard"
PROVISIONER = "harness.local/hostpath"


class Provisioner:
    """Binds each pending PersistentVolumeClaim to a hostPath PersistentVolume
    at ``<root>/pvcs/<namespace>/<claim>``, which is what pods on this node see.

    The scheduler leaves pods with unbound claims Pending, so claims need a
    real volume; a node cannot create PVs, hence the separate (admin) client.
    A default StorageClass ``standard`` is created, like kind's, so charts
    that leave storageClassName empty work unchanged.
    """

    def __init__(self, kubeconfig: str, agent: Agent) -> None:
        self.api, _, self.storage = api_clients(kubeconfig)
        self.agent = agent

    def ensure_storage_class(self) -> None:
        body = {
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        try:
            self.storage.create_storage_class(body)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _provision(self, pvc: dict[str, Any]) -> None:
        spec, meta = pvc["spec"], pvc["metadata"]
        cls = spec.get("storageClassName")
        if (pvc.get("status") or {}).get("phase") != "Pending" or spec.get("volumeName"):
            return
        if cls not in (None, "", STORAGE_CLASS):
            return
        ns, name = meta["namespace"], meta["name"]
        path = self.agent.pvc_path(ns, name)
        path.mkdir(parents=True, exist_ok=True)
        # World-writable, as kind's local-path provisioner makes its volumes: pods run as non-root.
        path.chmod(0o777)
        size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        body = {
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                "labels": {"harness.local/claim-namespace": ns},
            },
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": cls or "",
                "volumeMode": spec.get("volumeMode") or "Filesystem",
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": ns,
                    "name": name,
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self.api.create_persistent_volume(body)
            log.info("provisioned %s for claim %s/%s", body["metadata"]["name"], ns, name)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _reap(self) -> None:
        # Retain + delete here: the PV controller cannot delete hostPath
        # volumes outside /tmp, and the data stays for the test to inspect.
        for pv in to_dict(self.api, self.api.list_persistent_volume())["items"]:
            annotations = pv["metadata"].get("annotations") or {}
            released = (pv.get("status") or {}).get("phase") == "Released"
            if annotations.get("pv.kubernetes.io/provisioned-by") == PROVISIONER and released:
                with contextlib.suppress(ApiException):
                    self.api.delete_persistent_volume(pv["metadata"]["name"])

    def run(self) -> None:
        while not self.agent.stopping.is_set():
            try:
                events = stream(
                    self.api,
                    self.api.list_persistent_volume_claim_for_all_namespaces,
                    self.agent.stopping,
                    timeout_seconds=30,
                )
                for kind, pvc in events:
                    if kind in ("ADDED", "MODIFIED"):
                        self._provision(pvc)
                self._reap()
            except Exception:
                log.exception("provisioner failed")
                self.agent.stopping.wait(1.0)


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node_name: str = args.node_name
        self.root = Path(args.root)
        self.pvc_root = self.root / "pvcs"
        self.gpu_count: int = args.gpus
        self.gpus = GpuPool(args.gpus)
        self.cpu: str = args.cpu
        self.memory: str = args.memory
        self.images: dict[str, list[str]] = {}
        for item in args.image_command or []:
            image, _, command = item.partition("=")
            self.images[image] = json.loads(command)
        self.api, self.coord, _ = api_clients(args.kubeconfig)
        self.api_port = int(self.api.api_client.configuration.host.rsplit(":", 1)[1])
        self.mount_namespaces = can_unshare()
        # NetworkPolicy as far as a node without a CNI can enforce it: needs root (namespaces) and
        # credentials that may read policies (a node's may not; the provisioner's are an admin's).
        self.network: podnet.Network | None = None
        if args.provisioner_kubeconfig and self.mount_namespaces:
            admin, _, _ = api_clients(args.provisioner_kubeconfig)
            networking = client.NetworkingV1Api(admin.api_client)
            self.network = podnet.Network(admin, networking, self.api_port, self.pod_views)
        self.mountpoints = MountPoints()
        # Containers from images: pulled into a per-user cache, run by runc with this agent's state dir.
        self.store = oci.ImageStore()
        self.store.prune()
        self.runc = shutil.which("runc")
        self.runc_root = self.root / "runc"
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.deleting: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def pvc_path(self, ns: str, claim: str) -> Path:
        return self.pvc_root / ns / claim

    def runc_kill(self, container_id: str, signal_name: str) -> None:
        subprocess.run(
            [str(self.runc), "--root", str(self.runc_root), "kill", container_id, signal_name],
            capture_output=True, check=False,
        )  # fmt: skip

    def pod_views(self) -> list[podnet.PodView]:
        with self.lock:
            workers = list(self.workers.values())
        return [podnet.PodView(w.pod, w.net, w.ready) for w in workers]

    def image_command(self, image: str) -> list[str] | None:
        name = image.rsplit("@", 1)[0]
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        return self.images.get(image) or self.images.get(name)

    # ---- node -----------------------------------------------------------------
    def _node_status(self) -> dict[str, Any]:
        resources = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": "110",
            "ephemeral-storage": "100Gi",
            "nvidia.com/gpu": str(self.gpu_count),
        }
        t = now()

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }

        return {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "harness"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "harness"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "harness"),
                cond("Ready", "True", "KubeletReady", "harness node agent is posting ready status"),
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "harness",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "harness://local-processes",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }

    def register(self) -> None:
        body = {
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.count": str(self.gpu_count),
                },
            },
            "spec": {},
        }
        try:
            self.api.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.api.patch_node_status(self.node_name, {"status": self._node_status()})

    def _renew_lease(self) -> None:
        body = {
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node_name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            # A merge patch, not a replace: kube-apiserver 1.37 refuses a Lease
            # update without metadata.resourceVersion (422), which left the node
            # NotReady and tainted about 40 s into a session.
            self.coord.patch_namespaced_lease(
                self.node_name,
                "kube-node-lease",
                {"spec": body["spec"]},
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    def heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self._renew_lease()
                if time.monotonic() - last_status > STATUS_SECONDS:
                    self.api.patch_node_status(self.node_name, {"status": self._node_status()})
                    last_status = time.monotonic()
            except Exception:
                # Keep beating: one failed renewal must not end the agent.
                log.exception("heartbeat failed")

    # ---- pods -----------------------------------------------------------------
    def worker_done(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.uid, None)
            self.finished.add(worker.uid)

    def _delete(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.api.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _finalize_delete(self, pod: dict[str, Any], worker: PodWorker | None) -> None:
        if worker is not None:
            worker.join()
        self._delete(pod)

    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid: str = meta["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            finished = uid in self.finished
        if kind == "DELETED":
            if worker is not None:
                worker.stop(0)
            return
        if meta.get("deletionTimestamp"):
            with self.lock:
                if uid in self.deleting:
                    return
                self.deleting.add(uid)
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            if worker is not None:
                worker.stop(grace)
            threading.Thread(target=self._finalize_delete, args=(pod, worker), daemon=True).start()
            return
        phase = (pod.get("status") or {}).get("phase")
        if worker is None and not finished and phase not in ("Succeeded", "Failed"):
            worker = PodWorker(self, pod)
            with self.lock:
                self.workers[uid] = worker
            worker.start()

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        resource_version = ""
        while not self.stopping.is_set():
            try:
                if not resource_version:
                    pods = to_dict(self.api, self.api.list_pod_for_all_namespaces(field_selector=selector))
                    for pod in pods["items"]:
                        self.on_pod("ADDED", pod)
                    # Pods deleted while we were not watching get no DELETED event.
                    listed = {p["metadata"]["uid"] for p in pods["items"]}
                    with self.lock:
                        vanished = [w for uid, w in self.workers.items() if uid not in listed]
                    for w in vanished:
                        w.stop(0)
                    resource_version = pods["metadata"]["resourceVersion"]
                events = stream(
                    self.api,
                    self.api.list_pod_for_all_namespaces,
                    self.stopping,
                    field_selector=selector,
                    resource_version=resource_version,
                    timeout_seconds=60,
                    allow_watch_bookmarks=True,
                )
                for kind, obj in events:
                    if kind == "ERROR":
                        resource_version = ""
                        break
                    resource_version = obj["metadata"].get("resourceVersion") or resource_version
                    if kind != "BOOKMARK":
                        self.on_pod(kind, obj)
            except ApiException as exc:
                if exc.status == 410:
                    resource_version = ""
                    continue
                log.warning("pod watch failed: %s", exc)
                self.stopping.wait(1.0)
            except Exception:
                log.exception("pod watch failed")
                resource_version = ""
                self.stopping.wait(1.0)

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.stop(5)
        for w in workers:
            w.join(15)
        self.mountpoints.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True, help="state dir: pods/, pvcs/")
    parser.add_argument("--node-name", default="gpu-node-0")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--cpu", default="8")
    parser.add_argument("--memory", default="32Gi")
    parser.add_argument("--provisioner-kubeconfig", help="admin kubeconfig: also bind PVCs to hostPath PVs")
    parser.add_argument(
        "--image-command", action="append", metavar="IMAGE=JSON", help='e.g. my/job=["unlearn","run"] (repeatable)'
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    agent = Agent(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.register()
    agent._renew_lease()
    log.info("node %s registered (mount namespaces: %s)", agent.node_name, agent.mount_namespaces)
    threading.Thread(target=agent.heartbeat, name="heartbeat", daemon=True).start()
    threading.Thread(target=agent.watch_pods, name="pods", daemon=True).start()
    if args.provisioner_kubeconfig:
        provisioner = Provisioner(args.provisioner_kubeconfig, agent)
        provisioner.ensure_storage_class()
        threading.Thread(target=provisioner.run, name="provisioner", daemon=True).start()
    stop.wait()
    log.info("stopping")
    agent.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
