"""Container init for the node agent: mount the volumes, then exec the command.

``python podinit.py SPEC_JSON -- COMMAND...`` where SPEC_JSON is
``{"mounts": [{"source", "target", "readOnly", "isFile"}], "namespace",
"workingDir" (the container's, seen after mounting) or "scratch" (a host dir),
"netns" (optional: the pod's network namespace to join, see podnet.py)}``.

``python podinit.py --sandbox`` is the pod's network sandbox instead: it makes
a network namespace with ``lo`` up, prints ``ready`` and sleeps until killed
(the pause container's job).

With ``namespace`` true it enters a private mount namespace (root only) and
bind-mounts each source at its target, so the command sees the pod's volumes
at their absolute paths and nothing outside the container sees them.

With ``runc`` (a container from an image) it is the container's shim
instead: in a private mount namespace it mounts the container's root
filesystem (an overlay of the image's unpacked layers and a fresh upper
dir), runs ``runc run`` on the bundle and exits with its status. It dies
with the agent's worker thread (SIGTERM as the parent-death signal) and
then kills the container first, so a SIGKILLed agent or test session leaves
no container behind. The overlay mount lives and dies with the namespace.

Every source is opened (``O_PATH``) before the first mount, and mounted via
``/proc/self/fd/N``: a pod that mounts an emptyDir at ``/tmp`` (the Job does)
would otherwise hide the harness's own sources under ``/tmp`` from the later
mounts. ``keep`` lists host paths the command runs from (the venv, the working tree);
one that a mount would hide is bound back at its own path inside that mount,
as if the image contained it. Standard library only, since it runs before
every container starts.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    _check(_libc.mount(src, target.encode(), None, flags, None), f"mount {source} on {target}")


def run_container(spec: dict[str, object]) -> int:
    """Mount the bundle's root filesystem, ``runc run`` it, and kill it if the agent dies."""
    runc, state, cid, bundle = (str(spec[k]) for k in ("binary", "root", "id", "bundle"))
    lower = [str(p) for p in spec["lower"]]  # type: ignore[attr-defined]
    # The agent's worker thread started us; TERM (not KILL) when it dies, so
    # that the handler below can take the container down first.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl")
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    mount(None, "/", MS_REC | MS_PRIVATE)
    # Top layer first, as overlayfs lists lower dirs.
    options = f"lowerdir={':'.join(reversed(lower))},upperdir={spec['upper']},workdir={spec['work']}"
    _check(
        _libc.mount(b"overlay", str(spec["rootfs"]).encode(), b"overlay", 0, options.encode()),
        f"mount overlay on {spec['rootfs']}",
    )

    def child_setup() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    proc = subprocess.Popen([runc, "--root", state, "run", "--bundle", bundle, cid], preexec_fn=child_setup)  # noqa: PLW1509 - single-threaded here

    def stop(_signum: int, _frame: object) -> None:
        subprocess.run([runc, "--root", state, "kill", cid, "KILL"], capture_output=True, check=False)

    signal.signal(signal.SIGTERM, stop)
    code = proc.wait()
    subprocess.run([runc, "--root", state, "delete", "--force", cid], capture_output=True, check=False)
    return code


def sandbox() -> int:
    """Hold a fresh network namespace for a pod: lo up, nothing else."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    _check(_libc.unshare(CLONE_NEWNET), "unshare")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))
    print("ready", flush=True)
    while True:
        signal.pause()


def main(argv: list[str]) -> int:
    if argv[1] == "--sandbox":
        return sandbox()
    spec = json.loads(argv[1])
    if "runc" in spec:
        return run_container(spec["runc"])
    command = argv[argv.index("--") + 1 :]
    # The agent's worker thread forked us: die with it, so a SIGKILLed agent
    # leaves no containers behind.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if spec.get("netns"):
        # The pod's sandbox: every container of a pod shares one network namespace.
        netns = os.open(spec["netns"], os.O_RDONLY)
        _check(_libc.setns(netns, CLONE_NEWNET), "setns")
        os.close(netns)
    if spec["namespace"]:
        _check(_libc.unshare(CLONE_NEWNS), "unshare")
        mount(None, "/", MS_REC | MS_PRIVATE)
    # Opened after unshare (a bind source must be a mount of this namespace:
    # EINVAL otherwise) and before the first mount can hide any of them.
    scratch = os.open(spec["scratch"], os.O_RDONLY | os.O_DIRECTORY) if spec.get("scratch") else None
    if spec["namespace"]:
        fds = [os.open(m["source"], os.O_PATH) for m in spec["mounts"]]
        targets = [m["target"].rstrip("/") for m in spec["mounts"]]
        hidden = [k for k in spec.get("keep", []) if any(k.startswith(t + "/") for t in targets)]
        keep_fds = [os.open(k, os.O_PATH) for k in hidden]
        for m, fd in zip(spec["mounts"], fds, strict=True):
            target = Path(m["target"])
            # Missing host-level targets were made by the agent; these are
            # nested in another volume (created inside it, as the kubelet does).
            if not target.exists():
                if m["isFile"]:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
                else:
                    target.mkdir(parents=True, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", str(target), MS_BIND)
            if m["readOnly"]:
                mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY)
            os.close(fd)
        for path, fd in zip(hidden, keep_fds, strict=True):
            Path(path).mkdir(parents=True, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
            os.close(fd)
    if scratch is not None:
        os.fchdir(scratch)
        os.close(scratch)
    else:
        os.makedirs(spec["workingDir"], exist_ok=True)
        os.chdir(spec["workingDir"])
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        # What a container runtime reports for a missing executable.
        print(f"exec {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126


if __name__ == "__main__":
    sys.exit(main(sys.argv))
