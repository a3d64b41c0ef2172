"""Images for the node agent: pull by digest from a loopback registry, unpack each layer once, and the
OCI runtime spec that ``runc`` runs a pod's container with.

Standard library only: it runs in the node agent's process (``nodeagent.py``).

* :class:`ImageStore` pulls ``127.0.0.1:PORT/repo@sha256:...`` (or ``:tag``)
  over plain HTTP with the registry API, checks every digest, and unpacks
  each layer into its own directory under
  ``${XDG_CACHE_HOME:-~/.cache}/unlearning-operator/node/layers/sha256-<hex>``,
  reused by every later pull of any image that has the layer (the job
  image's 5.5 GB torch layer is unpacked once per machine, not per run).
  Whiteouts are turned into overlayfs ones, as containerd's overlay
  snapshotter does; the container's root is an overlay of those
  directories with a per-container upper dir.
* :func:`runtime_spec` turns the image config and the pod's container into
  the ``config.json`` of a runc bundle, with what a kubelet and containerd
  apply: the image's entrypoint, user, env and working dir unless the pod
  overrides them, ``securityContext`` (user, group, fsGroup,
  readOnlyRootFilesystem, capabilities, allowPrivilegeEscalation), the
  pod's volumes at their mount paths, ``/etc/hosts``, and the host's
  network (no network namespace of its own) or, for a pod a NetworkPolicy
  selects, its sandbox's network namespace (``podnet.py``), which every
  container of the pod joins as under a kubelet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
CHUNK = 1 << 20
# What Docker and containerd grant a container by default; the pod's
# securityContext.capabilities add to or drop from it.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)  # fmt: skip
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
)  # fmt: skip
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


class ImageError(RuntimeError):
    """The image cannot be pulled or run; the message is the container's waiting message."""


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "unlearning-operator" / "node"


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(image: str) -> Reference | None:
    """``host:port/repo[:tag][@sha256:...]`` on loopback, else None (not something this node can pull)."""
    m = re.fullmatch(
        r"(?P<reg>(?:127\.0\.0\.1|localhost):\d+)/(?P<repo>[a-z0-9._/-]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?"
        r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?",
        image,
    )
    if m is None or not (m.group("tag") or m.group("digest")):
        return None
    return Reference(m.group("reg"), m.group("repo"), m.group("tag"), m.group("digest"))


@dataclass
class PulledImage:
    reference: Reference
    digest: str
    config: dict[str, Any]
    layers: list[Path]
    """Unpacked layer directories, bottom first."""

    @property
    def image_id(self) -> str:
        return f"{self.reference.name}@{self.digest}"


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()
        (self.root / "layers").mkdir(parents=True, exist_ok=True)
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)

    # ---- registry ---------------------------------------------------------------------
    def _get(self, ref: Reference, path: str, accept: tuple[str, ...] = ()) -> Any:
        req = urllib.request.Request(f"http://{ref.registry}/v2/{ref.repository}/{path}")
        if accept:
            req.add_header("Accept", ", ".join(accept))
        try:
            return urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as exc:
            raise ImageError(f"pull {ref}: {path}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ImageError(f"pull {ref}: registry {ref.registry} unreachable: {exc}") from None

    def _manifest(self, ref: Reference) -> tuple[str, dict[str, Any]]:
        cached = self.root / "manifests" / f"{(ref.digest or '').replace(':', '-')}.json"
        if ref.digest and cached.is_file():
            return ref.digest, dict(json.loads(cached.read_bytes()))
        with self._get(ref, f"manifests/{ref.digest or ref.tag}", MANIFEST_TYPES + INDEX_TYPES) as resp:
            body = resp.read()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest and digest != ref.digest:
            raise ImageError(f"pull {ref}: the registry served a manifest with digest {digest}")
        manifest = json.loads(body)
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            picked = [
                m for m in manifest["manifests"]
                if m.get("platform", {}).get("os") == "linux" and m.get("platform", {}).get("architecture") == "amd64"
            ]  # fmt: skip
            if not picked:
                raise ImageError(f"pull {ref}: no linux/amd64 image in the index")
            return self._manifest(Reference(ref.registry, ref.repository, None, picked[0]["digest"]))
        cached = self.root / "manifests" / f"{digest.replace(':', '-')}.json"
        cached.write_bytes(body)
        return digest, dict(manifest)

    def _blob(self, ref: Reference, digest: str) -> bytes:
        with self._get(ref, f"blobs/{digest}") as resp:
            body: bytes = resp.read()
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise ImageError(f"pull {ref}: blob {digest} does not match its digest")
        return body

    # ---- layers ---------------------------------------------------------------------------
    def _layer(self, ref: Reference, descriptor: dict[str, Any]) -> Path:
        digest: str = descriptor["digest"]
        target = self.root / "layers" / digest.replace(":", "-")
        if (target / ".complete").is_file():
            return target
        with (self.root / "layers" / f".{target.name}.lock").open("a") as lock:
            # Another agent (a second test session) may be unpacking the same layer.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (target / ".complete").is_file():
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=self.root / "layers"))
            try:
                self._unpack(ref, descriptor, tmp / "fs")
                _whiteouts_to_overlay(tmp / "fs")
                (tmp / "fs" / ".complete").touch()
                shutil.rmtree(target, ignore_errors=True)
                (tmp / "fs").rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _unpack(self, ref: Reference, descriptor: dict[str, Any], target: Path) -> None:
        target.mkdir()
        media = str(descriptor.get("mediaType", ""))
        flag = "--gzip" if media.endswith("gzip") else "--zstd" if media.endswith("zstd") else None
        argv = ["tar", "--extract", "--file=-", f"--directory={target}", "--numeric-owner", "--same-permissions"]
        proc = subprocess.Popen([*argv, *([flag] if flag else [])], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        assert proc.stderr is not None
        blob = hashlib.sha256()
        try:
            with self._get(ref, f"blobs/{descriptor['digest']}") as resp:
                while chunk := resp.read(CHUNK):
                    blob.update(chunk)
                    proc.stdin.write(chunk)
        finally:
            proc.stdin.close()
            err = proc.stderr.read().decode(errors="replace")
            code = proc.wait()
        if code != 0:
            raise ImageError(f"pull {ref}: unpacking layer {descriptor['digest']} failed: {err[-1000:]}")
        if "sha256:" + blob.hexdigest() != descriptor["digest"]:
            raise ImageError(f"pull {ref}: layer {descriptor['digest']} does not match its digest")

    def pull(self, image: str) -> PulledImage:
        ref = parse_reference(image)
        if ref is None:
            raise ImageError(f"{image}: not an image on a loopback registry (127.0.0.1:PORT/repo@sha256:...)")
        digest, manifest = self._manifest(ref)
        config_cache = self.root / "manifests" / f"{manifest['config']['digest'].replace(':', '-')}.config.json"
        if config_cache.is_file():
            config = json.loads(config_cache.read_bytes())
        else:
            body = self._blob(ref, manifest["config"]["digest"])
            config = json.loads(body)
            config_cache.write_bytes(body)
        layers = [self._layer(ref, d) for d in manifest["layers"]]
        for layer in layers:
            with contextlib.suppress(OSError):
                os.utime(layer / ".complete")  # marks it used, for pruning
        return PulledImage(ref, digest, config, layers)

    def prune(self, days: int = 14) -> None:
        """Drop unpacked layers no pull has used for ``days``."""
        cutoff = time.time() - days * 86400
        for layer in (self.root / "layers").glob("sha256-*"):
            with contextlib.suppress(OSError):
                if (layer / ".complete").stat().st_mtime < cutoff:
                    shutil.rmtree(layer, ignore_errors=True)


def _whiteouts_to_overlay(root: Path) -> None:
    """OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``) as overlayfs expects them (char 0/0, opaque xattr)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.startswith(".wh."):
                continue
            path = Path(dirpath) / name
            path.unlink()
            if name == ".wh..wh..opq":
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            else:
                os.mknod(Path(dirpath) / name.removeprefix(".wh."), 0o600 | 0o020000, os.makedev(0, 0))


# ---- the runtime spec -------------------------------------------------------------------------


@dataclass
class BindMount:
    source: Path
    target: str
    read_only: bool


class ConfigError(ValueError):
    """The pod asks for something the image cannot give (CreateContainerConfigError)."""


def _lookup(layers: list[Path], path: str, name: str, field: int = 2) -> int | None:
    """The numeric id of ``name`` in the image's /etc/passwd or /etc/group (the top layer's copy wins)."""
    for layer in reversed(layers):
        file = layer / path.lstrip("/")
        if file.is_file():
            for line in file.read_text(errors="replace").splitlines():
                parts = line.split(":")
                if len(parts) > field and parts[0] == name:
                    return int(parts[field])
            return None
    return None


def resolve_user(image_user: str, layers: list[Path], pod_sc: dict[str, Any], sc: dict[str, Any]) -> tuple[int, int]:
    """(uid, gid): the container's securityContext, else the pod's, else the image's USER."""
    user, _, group = (image_user or "0").partition(":")
    if user.isdigit():
        uid = int(user)
    elif (found := _lookup(layers, "/etc/passwd", user)) is not None:
        uid = found
    else:
        raise ConfigError(f"image user {user!r} is not in the image's /etc/passwd")
    if group.isdigit():
        gid = int(group)
    else:
        # A group name, or no group: the user's primary group from /etc/passwd.
        found = _lookup(layers, "/etc/group", group) if group else _lookup(layers, "/etc/passwd", user, 3)
        gid = found if found is not None else 0
    uid = int(sc.get("runAsUser", pod_sc.get("runAsUser", uid)))
    gid = int(sc.get("runAsGroup", pod_sc.get("runAsGroup", gid)))
    if (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True) and uid == 0:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    return uid, gid


def command_line(image_config: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Kubernetes' rule: ``command`` replaces the entrypoint and drops the image's CMD; ``args`` replace CMD."""
    entrypoint = list(image_config.get("Entrypoint") or [])
    cmd = list(image_config.get("Cmd") or [])
    if spec.get("command"):
        return list(spec["command"]) + list(spec.get("args") or [])
    argv = entrypoint + (list(spec["args"]) if spec.get("args") else cmd)
    if not argv:
        raise ConfigError("no command specified: the image has no entrypoint and the pod sets no command")
    return argv


def runtime_spec(
    *,
    image_config: dict[str, Any],
    layers: list[Path],
    argv: list[str],
    env: dict[str, str],
    pod: dict[str, Any],
    container: dict[str, Any],
    mounts: list[BindMount],
    rootfs: Path,
    hostname: str,
    cgroup: str,
    netns: str | None = None,
) -> dict[str, Any]:
    """The OCI runtime ``config.json`` for one container of ``pod``; ``netns`` is the path of the pod's
    network namespace (``/proc/<sandbox pid>/ns/net``), None for the host's."""
    pod_sc = pod["spec"].get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid, gid = resolve_user(str(image_config.get("User") or ""), layers, pod_sc, sc)
    groups = [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if "fsGroup" in pod_sc:
        groups.append(int(pod_sc["fsGroup"]))
    caps_sc = sc.get("capabilities") or {}
    drop = {f"CAP_{c.upper()}" for c in caps_sc.get("drop") or []}
    add = {f"CAP_{c.upper()}" for c in caps_sc.get("add") or []}
    caps = sorted(set() if "CAP_ALL" in drop else (set(DEFAULT_CAPABILITIES) - drop) | add)
    # A non-root process gets no effective capabilities on exec (no ambient set), as under containerd.
    effective = caps if uid == 0 else []
    spec_mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime",
                                                                               "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip
    targets = {m.target.rstrip("/") or "/" for m in mounts}
    if "/tmp" not in targets:
        # A private /tmp when the pod brings none (the chart and the Job mount an emptyDir there).
        spec_mounts.append(
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        )
    for m in sorted(mounts, key=lambda m: m.target.rstrip("/").count("/")):
        options = ["rbind", "rprivate", "ro" if m.read_only else "rw"]
        spec_mounts.append({"destination": m.target, "type": "bind", "source": str(m.source), "options": options})
    cwd = container.get("workingDir") or image_config.get("WorkingDir") or "/"
    # Never above the agent's own hard limit: raising it is refused here (EPERM), so the
    # container gets what containerd would give on this host, capped at what a process here may have.
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    no_new_privs = sc.get("allowPrivilegeEscalation") is False
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, **({"additionalGids": sorted(set(groups))} if groups else {})},
            "args": argv,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": effective,
                "permitted": effective,
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile_hard, "soft": min(nofile_hard, 65536)}],
            "noNewPrivileges": no_new_privs,
        },
        "root": {"path": str(rootfs), "readonly": bool(sc.get("readOnlyRootFilesystem"))},
        "hostname": hostname,
        "mounts": spec_mounts,
        "linux": {
            "cgroupsPath": cgroup,
            # Without a network entry runc leaves the container on the host's network (this node's default);
            # with a path it joins that namespace, as containerd joins a container to its pod's sandbox.
            "namespaces": [
                *({"type": t} for t in ("pid", "ipc", "uts", "mount")),
                *([{"type": "network", "path": netns}] if netns is not None else []),
            ],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def image_env(image_config: dict[str, Any]) -> dict[str, str]:
    """The image's ENV as a dict (the pod's env is applied over it)."""
    out: dict[str, str] = {}
    for item in image_config.get("Env") or []:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out
