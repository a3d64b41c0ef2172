"""The project's images for the test session: built by ``images/build.py``, served by a local registry.

* :func:`build_images` runs the build (cached by input hash under
  ``~/.cache/unlearning-operator/images``; a warm run takes about a second).
* :class:`Registry` is Debian's ``docker-registry`` (the CNCF distribution
  registry) on a free 127.0.0.1 port, with filesystem storage in the
  session's temp dir, removed when it stops: a session pushes the images
  once (about 25 s for the 2.8 GB job image) and no old layers pile up.
* ``build_images(push_to=registry)`` also pushes each OCI layout there with
  ``build.py --push`` (``skopeo copy``, what the release does to a public
  registry); :func:`served` checks that the registry serves the built digest.
  The references by digest are what the chart is installed with and what the
  node agent pulls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.controlplane import die_with_parent, free_port, tail

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "images" / "build.py"
IMAGES = ("operator", "job")


class ImagesError(RuntimeError):
    """The images could not be built, served or pushed; the message says what to do."""


@dataclass(frozen=True)
class Built:
    image: str
    name: str
    digest: str
    oci: Path
    pushed: str | None
    """``host/name@sha256:...`` once pushed."""


def build_images(
    images: tuple[str, ...] = IMAGES, push_to: Registry | None = None, timeout: float = 3600
) -> dict[str, Built]:
    """``images/build.py --json``: each image built or found in the cache, and pushed to ``push_to``."""
    push = ["--push", f"docker://{push_to.host}", "--tag", "test"] if push_to is not None else []
    done = subprocess.run(
        [sys.executable, str(BUILD), "--json", *push, *images],
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        raise ImagesError(f"images/build.py failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    out = {}
    for line in done.stdout.splitlines():
        rec = json.loads(line)
        built = Built(rec["image"], rec["name"], rec["digest"], Path(rec["oci"]), rec.get("pushed"))
        if push_to is not None:
            served(push_to, built)
        out[built.image] = built
    return out


class Registry:
    """``docker-registry serve`` on 127.0.0.1, storage under ``workdir`` (removed by :meth:`stop`)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.port = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.log = workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Registry:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise ImagesError(
                "docker-registry not found: install it (apt-get install docker-registry; images/tools.sh)"
            )
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "registry.yml"
        config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "warn", "accesslog": {"disabled": True}},
                    "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
                    "http": {"addr": self.host},
                }
            )
        )
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [*die_with_parent(), binary, "serve", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ImagesError(f"docker-registry exited with {self.popen.returncode}:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise ImagesError(f"docker-registry did not answer on {self.host} in {timeout:.0f}s:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        # Gigabytes of layers that the build cache holds anyway.
        shutil.rmtree(self.storage, ignore_errors=True)


def served(registry: Registry, built: Built) -> None:
    """The registry must serve exactly the digest that was built (no conversion on the way)."""
    req = urllib.request.Request(
        f"http://{registry.host}/v2/{built.name}/manifests/{built.digest}",
        method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            got = resp.headers.get("Docker-Content-Digest")
    except urllib.error.HTTPError as exc:
        raise ImagesError(f"{built.pushed}: the registry does not serve the pushed manifest ({exc.code})") from None
    if got != built.digest:
        raise ImagesError(f"{built.pushed}: the registry serves {got} for it")
