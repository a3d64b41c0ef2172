"""Build the project's OCI images from their definitions: reproducibly, without a container engine.

    python3 images/build.py operator job            # build or reuse; prints "<name> <digest> <oci dir>"
    python3 images/build.py --json operator job     # the same as JSON records
    python3 images/build.py --push docker://REGISTRY/PREFIX --tag 0.1.0 operator job

One definition per image (``operator/image.toml``, ``job_image/image.toml``),
assembled from pinned parts into three layers:

1. ``debian``: a Debian base made by ``mmdebstrap --variant=essential`` with
   the definition's packages (Python 3 and the C++ runtime); its tar is
   reproducible under ``SOURCE_DATE_EPOCH``.
2. ``python``: a venv at ``/opt/venv`` with every pinned wheel of the image's
   constraints file, installed by pip inside a chroot of layer 1 (so the
   venv's interpreter, paths and ``.pyc`` files are the image's own).
3. ``code``: the Python packages of the definition's parts (whole folders of
   this repository) and the console scripts of ``pyproject.toml``.

Layers 1 and 2 are heavy and rarely change (layer 2 of the job image is
torch with its CUDA libraries, about 5.5 GB unpacked): each is cached under
``${XDG_CACHE_HOME:-~/.cache}/unlearning-operator/images/layers/<key>``,
keyed by a hash of exactly its inputs, so a code change rebuilds layer 3 and
the config in seconds. Every tar is written in name order with numeric
owners and mtimes clamped to the layer's epoch, compressed with zstd
(deterministic, whatever the number of threads), and the config and
manifest as canonical JSON: the same inputs give the same
digest on any machine with the same tools and the same Debian archive state
(the release runs this script in ``debian:bookworm`` for that reason).

Epochs: the image's ``created`` date and layer 3 use ``SOURCE_DATE_EPOCH``
(default: the author time of the last commit that changed the image's inputs: its
definition, constraints, parts, pyproject.toml or this script, so a commit
elsewhere leaves the digest as it is); layers 1 and 2 clamp their mtimes to the
fixed ``BASE_EPOCH``, so that their bytes depend on their inputs alone (not
on git history: a new commit, a shallow clone or a source tarball leaves
them as they are), and both images share layer 1.

Needs root (chroot, mounts in a private namespace), ``mmdebstrap``, GNU tar,
``zstd``, ``unshare`` (util-linux) and pip; pushing needs ``skopeo``
(``images/tools.sh`` installs what is missing). Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = {
    "operator": ROOT / "operator" / "image.toml",
    "job": ROOT / "job_image" / "image.toml",
}
# Bump when a step below changes what it writes, so cached layers are rebuilt.
STEP_REVISION = {"debian": 2, "python": 2, "code": 2, "image": 2}
VENV = "/opt/venv"
# 2026-01-01T00:00:00Z: the mtime ceiling of the base layers (see the docstring).
BASE_EPOCH = 1767225600
NONROOT = "nonroot:x:65532:65532:nonroot:/tmp:/usr/sbin/nologin"
NONROOT_GROUP = "nonroot:x:65532:"
# zstd, not gzip: the job's 5.5 GB torch layer compresses in about 30 s instead
# of 5 minutes (gzip -6 on a loaded 2-core machine), and 7% smaller. containerd
# (1.5+), CRI-O and Docker (23+) pull zstd layers (docs/container-images.md). Its
# multi-threaded output does not depend on the number of threads (-T0).
ZSTD = ("zstd", "-3", "-T0", "--quiet", "--stdout")
CHUNK = 1 << 20
LAYER_FILE = "layer.tar.zst"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
# The Debian archive the base comes from; the suite is the definition's.
DEBIAN_MIRRORS = (
    "deb http://deb.debian.org/debian {suite} main",
    "deb http://deb.debian.org/debian {suite}-updates main",
    "deb http://deb.debian.org/debian-security {suite}-security main",
)


class BuildError(RuntimeError):
    """A step failed; the message says which and what to do."""


def log(message: str) -> None:
    print(f"build.py: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "unlearning-operator" / "images"


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def rfc3339(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(argv: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, text=True, capture_output=True, check=False, **kwargs)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-30:]
        raise BuildError(f"{what} failed (exit {done.returncode}):\n  " + "\n  ".join(tail))
    return done


def git_epoch(paths: list[Path]) -> int | None:
    """Author time of the last commit that touched ``paths`` (a rebase keeps it, unlike the commit
    time); None outside git."""
    argv = ["git", "-C", str(ROOT), "log", "-1", "--format=%at", "HEAD", "--"]
    argv += [str(p.relative_to(ROOT)) for p in paths]
    try:
        done = subprocess.run(argv, text=True, capture_output=True, check=False)
    except OSError:
        return None
    out = done.stdout.strip()
    return int(out) if done.returncode == 0 and out else None


# ---- definitions ------------------------------------------------------------------------


@dataclass
class Definition:
    """One image, as its ``image.toml`` declares it."""

    key: str
    path: Path
    name: str
    parts: list[str]
    debian_suite: str
    debian_packages: list[str]
    constraints: Path
    pip: str
    config: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, key: str) -> Definition:
        if key not in DEFINITIONS:
            raise BuildError(f"unknown image {key!r}; pick one of: {', '.join(DEFINITIONS)}")
        path = DEFINITIONS[key]
        raw = tomllib.loads(path.read_text())
        try:
            debian, python, config = raw["debian"], raw["python"], raw["config"]
            return cls(
                key=key,
                path=path,
                name=raw["name"],
                parts=list(raw["parts"]),
                debian_suite=debian["suite"],
                debian_packages=sorted(debian["packages"]),
                constraints=ROOT / python["constraints"],
                pip=python["pip"],
                config=dict(config),
                labels=dict(raw.get("labels", {})),
            )
        except KeyError as missing:
            raise BuildError(f"{path}: missing key {missing}; see operator/image.toml for the layout") from None


def pinned(constraints: Path) -> list[str]:
    """The ``name==version`` lines of a constraints file; anything looser is refused."""
    pins = []
    for number, line in enumerate(constraints.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", text):
            raise BuildError(f"{constraints}:{number}: {text!r} is not an exact pin (name==version)")
        pins.append(text)
    return sorted(pins, key=str.lower)


def project_scripts(parts: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """The console scripts, from ``[project.scripts]`` of each part's own pyproject.toml where it has
    one, else of the root's: one source of truth for what ``pip install`` would write."""
    scripts: dict[str, str] = {}
    for toml in [ROOT / "pyproject.toml", *(ROOT / part / "pyproject.toml" for part in parts)]:
        if toml.is_file():
            scripts.update(tomllib.loads(toml.read_text()).get("project", {}).get("scripts", {}))
    return scripts


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def code_files(defn: Definition) -> list[tuple[Path, str]]:
    """(source, path in the image) of every file the code layer carries.

    Each part is a folder of this repository; every Python package directly
    in it (a directory with ``__init__.py``) is copied whole, without caches.
    """
    site = f"{VENV.lstrip('/')}/lib/python3.11/site-packages"
    files: list[tuple[Path, str]] = []
    for part in defn.parts:
        folder = ROOT / part
        packages = sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()) if folder.is_dir() else []
        if not packages:
            raise BuildError(f"{defn.path}: part {part!r} has no Python package (a folder with __init__.py)")
        for package in packages:
            for source in sorted(package.rglob("*")):
                rel = source.relative_to(folder)
                if "__pycache__" in rel.parts or source.suffix in (".pyc", ".pyo") or not source.is_file():
                    continue
                files.append((source, f"{site}/{rel.as_posix()}"))
    return sorted(set(files), key=lambda f: f[1])


# ---- layers ---------------------------------------------------------------------------------


@dataclass
class Layer:
    """A compressed layer blob in the cache and what the image config says of it."""

    step: str
    key: str
    blob: Path
    digest: str
    diff_id: str
    size: int
    epoch: int
    created_by: str

    def record(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "key": self.key,
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "epoch": self.epoch,
            "created_by": self.created_by,
        }

    @classmethod
    def from_record(cls, directory: Path, rec: dict[str, Any]) -> Layer:
        return cls(
            rec["step"], rec["key"], directory / LAYER_FILE, rec["digest"], rec["diff_id"], rec["size"],
            rec["epoch"], rec["created_by"],
        )  # fmt: skip


def tar_argv(directory: Path, epoch: int, members: list[str]) -> list[str]:
    """GNU tar of ``members`` under ``directory``, byte-stable: name order,
    numeric owners, mtimes clamped to ``epoch``, no atime/ctime, fixed pax
    header names."""
    argv = [
        "tar", "--create", "--file=-", f"--directory={directory}", "--sort=name", "--format=posix",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        f"--mtime=@{epoch}", "--clamp-mtime", "--numeric-owner", "--no-acls", "--no-xattrs", "--no-selinux",
    ]  # fmt: skip
    return [*argv, "--", *members]


def write_layer(cache: Path, step: str, key: str, *, epoch: int, created_by: str, producer: list[str]) -> Layer:
    """Run ``producer`` (a command writing a tar to stdout) into a cached zstd blob, hashing the tar
    (the config's diff_id) on the way and the blob (its digest) after."""
    if shutil.which(ZSTD[0]) is None:
        raise BuildError("zstd not found: install it (apt-get install zstd) or run images/tools.sh")
    directory = cache / "layers" / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{step}-", dir=cache / "layers"))
    try:
        blob = tmp / LAYER_FILE
        raw = hashlib.sha256()
        with blob.open("wb") as out, tempfile.TemporaryFile() as zstd_err:
            proc = subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            zstd = subprocess.Popen(ZSTD, stdin=subprocess.PIPE, stdout=out, stderr=zstd_err)
            assert proc.stdout is not None
            assert proc.stderr is not None
            assert zstd.stdin is not None
            with zstd.stdin:
                while chunk := proc.stdout.read(CHUNK):
                    raw.update(chunk)
                    zstd.stdin.write(chunk)
            err = proc.stderr.read().decode(errors="replace")
            if proc.wait() != 0:
                raise BuildError(f"layer {step}: {producer[0]} failed (exit {proc.returncode}):\n{err[-3000:]}")
            if zstd.wait() != 0:
                zstd_err.seek(0)
                raise BuildError(f"layer {step}: zstd failed: {zstd_err.read().decode(errors='replace')[-2000:]}")
        digest = hashlib.sha256()
        with blob.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        layer = Layer(
            step, key, directory / LAYER_FILE, f"sha256:{digest.hexdigest()}", f"sha256:{raw.hexdigest()}",
            blob.stat().st_size, epoch, created_by,
        )  # fmt: skip
        (tmp / "layer.json").write_text(json.dumps(layer.record(), indent=1) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        return layer
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_layer(cache: Path, key: str) -> Layer | None:
    directory = cache / "layers" / key
    try:
        rec = json.loads((directory / "layer.json").read_text())
    except (OSError, ValueError):
        return None
    layer = Layer.from_record(directory, rec)
    if not layer.blob.is_file() or layer.blob.stat().st_size != layer.size:
        return None
    os.utime(directory / "layer.json")  # marks it used, for pruning
    return layer


@contextlib.contextmanager
def unpacked(layers: list[Layer], cache: Path) -> Iterator[Path]:
    """A scratch root filesystem with ``layers`` extracted in order (no whiteouts: ours add files only)."""
    root = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=cache))
    try:
        for layer in layers:
            run(["tar", "--extract", "--zstd", f"--file={layer.blob}", f"--directory={root}", "--numeric-owner",
                 "--same-permissions"], f"unpacking layer {layer.step}")  # fmt: skip
        yield root
    finally:
        # A chroot with mounts left inside (a killed build) must not be deleted through them.
        run(["rm", "-rf", "--one-file-system", str(root)], f"removing {root}")


def debian_layer(defn: Definition, cache: Path) -> Layer:
    mirrors = [m.format(suite=defn.debian_suite) for m in DEBIAN_MIRRORS]
    dpkg_opts = [
        # Docs, manuals and translations: not needed to run; copyrights stay.
        "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
        "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/locale/*",
    ]  # fmt: skip
    key = (
        "debian-"
        + sha256_text(
            str(STEP_REVISION["debian"]),
            defn.debian_suite,
            *defn.debian_packages,
            *mirrors,
            *dpkg_opts,
            NONROOT,
            NONROOT_GROUP,
        )[:16]
    )
    if (layer := cached_layer(cache, key)) is not None:
        return layer
    epoch = BASE_EPOCH
    log(f"building layer debian ({defn.debian_suite}: {' '.join(defn.debian_packages)}) ...")
    started = time.monotonic()
    argv = [
        "mmdebstrap", "--variant=essential", "--mode=root", "--format=tar", "--quiet",
        f"--include={','.join(defn.debian_packages)}",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        # Device nodes are the runtime's business (it mounts /dev).
        "--skip=output/dev", "--skip=output/mknod",
        # The images' user: the distroless "nonroot" account, so that tools
        # asking for the user's name (getpass, ssh, git) find one.
        f"--customize-hook=echo '{NONROOT}' >> \"$1/etc/passwd\"",
        f"--customize-hook=echo '{NONROOT_GROUP}' >> \"$1/etc/group\"",
        *(f"--dpkgopt={o}" for o in dpkg_opts),
        defn.debian_suite, "-", *mirrors,
    ]  # fmt: skip
    if shutil.which("mmdebstrap") is None:
        raise BuildError("mmdebstrap not found: install it (apt-get install mmdebstrap) or run images/tools.sh")
    env_epoch = {"SOURCE_DATE_EPOCH": str(epoch)}
    with _env(env_epoch):
        created_by = f"mmdebstrap --variant=essential {defn.debian_suite} {' '.join(defn.debian_packages)}"
        layer = write_layer(cache, "debian", key, epoch=epoch, created_by=created_by, producer=argv)
    log(f"built layer debian in {time.monotonic() - started:.0f}s ({layer.size / 2**20:.0f} MiB)")
    return layer


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def download_wheels(pins: list[str], wheels: Path) -> dict[str, str]:
    """Every pinned wheel for the images' platform (Linux x86_64, CPython 3.11) into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write("\n".join(pins) + "\n")
        req.flush()
        argv = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", "--implementation=cp", "--python-version=3.11", "--abi=cp311", "--abi=abi3",
            "--abi=none", *(f"--platform={p}" for p in _platforms()), f"--dest={wheels}", f"--requirement={req.name}",
        ]  # fmt: skip
        run(argv, "pip download of the pinned wheels")
    return {p: _wheel_for(p, wheels).name for p in pins}


def _platforms() -> list[str]:
    # Debian bookworm has glibc 2.36: every manylinux tag up to it, plus pure wheels.
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64", "any"]


def _wheel_for(pin: str, wheels: Path) -> Path:
    name, version = pin.split("==")
    norm = re.sub(r"[-_.]+", "_", name).lower()
    found = [
        w for w in wheels.glob("*.whl")
        if re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() == norm and w.name.split("-")[1] == version
    ]  # fmt: skip
    if len(found) != 1:
        raise BuildError(f"{pin}: expected one downloaded wheel in {wheels}, found {[w.name for w in found]}")
    return found[0]


def python_layer(defn: Definition, cache: Path, debian: Layer) -> Layer:
    pins = pinned(defn.constraints)
    key = "python-" + sha256_text(str(STEP_REVISION["python"]), str(BASE_EPOCH), debian.key, defn.pip, *pins)[:16]
    if (layer := cached_layer(cache, key)) is not None:
        return layer
    epoch = BASE_EPOCH
    started = time.monotonic()
    wheels = cache / "wheels"
    log(f"downloading {len(pins)} pinned wheels for {defn.key} (pip's cache makes a repeat quick) ...")
    files = download_wheels([*pins, f"pip=={defn.pip}"], wheels)
    log(f"downloaded in {time.monotonic() - started:.0f}s; installing into {VENV} in a chroot ...")
    step = time.monotonic()
    with unpacked([debian], cache) as root, tempfile.TemporaryDirectory(dir=cache) as work:
        Path(work, "requirements.txt").write_text("".join(f"/wheels/{files[p]}\n" for p in pins))
        pip = f"/wheels/{files[f'pip=={defn.pip}']}/pip"
        env = f"env -i PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 SOURCE_DATE_EPOCH={epoch} PYTHONHASHSEED=0"
        quiet = "--disable-pip-version-check --no-cache-dir --no-input"
        script = f"""
            set -eu
            mount --make-rprivate /
            mkdir -p "$R/wheels" "$R/build" "$R/dev"
            mount --rbind /dev "$R/dev"
            mount -t proc proc "$R/proc"
            mount --bind "$W" "$R/wheels"; mount -o remount,bind,ro "$R/wheels"
            mount --bind "$B" "$R/build"
            umask 022
            chroot "$R" {env} /usr/bin/python3 -m venv --without-pip {VENV}
            chroot "$R" {env} {VENV}/bin/python {pip} install {quiet} --no-index --no-deps --require-virtualenv \\
                --requirement /build/requirements.txt
            chroot "$R" {env} {VENV}/bin/python {pip} check {quiet}
        """
        # setpriv: a killed build takes its chroot's pip with it.
        die = ["setpriv", "--pdeathsig=KILL", "--"] if shutil.which("setpriv") else []
        run(
            [*die, "unshare", "--mount", "--fork", "sh", "-c", script],
            f"installing the pinned wheels of {defn.constraints.relative_to(ROOT)}",
            env={**os.environ, "R": str(root), "W": str(wheels), "B": work},
        )
        log(f"installed in {time.monotonic() - step:.0f}s; writing the layer ...")
        step = time.monotonic()
        for leftover in ("wheels", "build", "dev"):
            (root / leftover).rmdir()
        layer = write_layer(
            cache, "python", key, epoch=epoch,
            created_by=f"pip install --no-deps {defn.constraints.relative_to(ROOT)} into {VENV}",
            producer=tar_argv(root, epoch, [VENV.lstrip("/")]),
        )  # fmt: skip
    log(
        f"built layer python for {defn.key} in {time.monotonic() - started:.0f}s "
        f"(layer written in {time.monotonic() - step:.0f}s, {layer.size / 2**20:.0f} MiB)"
    )
    return layer


def code_layer(defn: Definition, cache: Path, epoch: int) -> Layer:
    """The project's packages and console scripts: a thin top layer, rebuilt whenever the code changes."""
    files = code_files(defn)
    packages = {image_path.split("/")[5] for _, image_path in files}
    scripts = {
        name: target
        for name, target in sorted(project_scripts(defn.parts).items())
        if target.split(".", 1)[0] in packages
    }
    digest = hashlib.sha256()
    for source, image_path in files:
        digest.update(image_path.encode() + b"\0" + source.read_bytes() + b"\0")
    key = "code-" + sha256_text(str(STEP_REVISION["code"]), str(epoch), digest.hexdigest(), json.dumps(scripts))[:16]
    if (layer := cached_layer(cache, key)) is not None:
        return layer
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        stage = Path(tmp)
        for source, image_path in files:
            target = stage / image_path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            target.chmod(0o644)
        for name, target in scripts.items():
            module, func = target.split(":")
            path = stage / VENV.lstrip("/") / "bin" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            # What pip writes for a console script.
            path.write_text(
                f"#!{VENV}/bin/python\nimport sys\nfrom {module} import {func}\n"
                f"if __name__ == '__main__':\n    sys.exit({func}())\n"
            )
            path.chmod(0o755)
        for d in [stage, *(p for p in stage.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        members = sorted(p.name for p in stage.iterdir())
        # No .pyc here: compiled by this host's Python they could differ from
        # the image's interpreter's; the code is small and compiles at import.
        layer = write_layer(
            cache, "code", key, epoch=epoch,
            created_by=f"parts {', '.join(defn.parts)} and scripts {', '.join(scripts)}",
            producer=tar_argv(stage, epoch, members),
        )  # fmt: skip
    return layer


# ---- the image ------------------------------------------------------------------------------


def image_config(defn: Definition, layers: list[Layer], epoch: int) -> dict[str, Any]:
    cfg = defn.config
    env = [f"{k}={v}" for k, v in cfg.get("env", {}).items()]
    labels = {
        "org.opencontainers.image.title": defn.name,
        "org.opencontainers.image.version": project_version(),
        "org.opencontainers.image.licenses": "Apache-2.0",
        **defn.labels,
    }
    config: dict[str, Any] = {
        "User": cfg["user"],
        "Env": env,
        "Entrypoint": list(cfg["entrypoint"]),
        "WorkingDir": cfg.get("workdir", "/"),
        "Labels": labels,
    }
    if cfg.get("cmd"):
        config["Cmd"] = list(cfg["cmd"])
    if cfg.get("ports"):
        config["ExposedPorts"] = {f"{int(p)}/tcp": {} for p in cfg["ports"]}
    return {
        "created": rfc3339(epoch),
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": rfc3339(layer.epoch), "created_by": layer.created_by} for layer in layers],
    }


@dataclass
class Image:
    key: str
    name: str
    digest: str
    layout: Path
    size: int
    layers: list[Layer]
    seconds: float

    def record(self) -> dict[str, Any]:
        return {
            "image": self.key,
            "name": self.name,
            "digest": self.digest,
            "oci": str(self.layout),
            "compressed_bytes": self.size,
            "layers": [layer.record() for layer in self.layers],
            "seconds": round(self.seconds, 1),
        }


def write_layout(layout: Path, name: str, tag: str, config: bytes, layers: list[Layer]) -> tuple[str, int]:
    """An OCI image layout: blobs (layers hard-linked from the cache), manifest, index."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        (blobs / hexdigest).write_bytes(data)
        return f"sha256:{hexdigest}"

    for layer in layers:
        target = blobs / layer.digest.split(":")[1]
        if not target.exists():
            try:
                os.link(layer.blob, target)
            except OSError:
                shutil.copyfile(layer.blob, target)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    manifest_bytes = canonical_json(manifest)
    digest = put(manifest_bytes)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_bytes(canonical_json(index))
    return digest, len(config) + len(manifest_bytes) + sum(layer.size for layer in layers)


def inputs(defn: Definition) -> list[Path]:
    """Every file or folder the image is made from (for its default epoch)."""
    return [
        defn.path, defn.constraints, ROOT / "pyproject.toml", Path(__file__).resolve(),
        *(ROOT / part for part in defn.parts),
    ]  # fmt: skip


def build(key: str, cache: Path, source_date_epoch: int | None) -> Image:
    started = time.monotonic()
    defn = Definition.load(key)
    epoch = source_date_epoch if source_date_epoch is not None else (git_epoch(inputs(defn)) or 0)
    debian = debian_layer(defn, cache)
    python = python_layer(defn, cache, debian)
    code = code_layer(defn, cache, epoch)
    layers = [debian, python, code]
    config = canonical_json(image_config(defn, layers, epoch))
    layout = cache / "oci" / f"{defn.name}-{hashlib.sha256(config).hexdigest()[:16]}"
    if not (layout / "index.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".oci-", dir=cache / "oci"))
        try:
            write_layout(tmp, defn.name, project_version(), config, layers)
            tmp.rename(layout)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    index = json.loads((layout / "index.json").read_text())
    descriptor = index["manifests"][0]
    size = descriptor["size"] + sum(layer.size for layer in layers) + len(config)
    image = Image(key, defn.name, descriptor["digest"], layout, size, layers, time.monotonic() - started)
    (layout / "build.json").write_text(json.dumps(image.record(), indent=1) + "\n")
    return image


def push(image: Image, destination: str, tag: str) -> str:
    """skopeo copy of the OCI layout to ``destination/<name>:<tag>``; returns the pushed reference by digest."""
    if shutil.which("skopeo") is None:
        raise BuildError("skopeo not found: install it (apt-get install skopeo) or run images/tools.sh")
    dest = f"{destination.rstrip('/')}/{image.name}"
    argv = ["skopeo", "copy", "--quiet", "--preserve-digests"]
    host = dest.removeprefix("docker://").split("/", 1)[0]
    if host.startswith(("127.0.0.1:", "localhost:")):
        argv.append("--dest-tls-verify=false")  # the tests' registry on loopback speaks plain HTTP
    run([*argv, f"oci:{image.layout}", f"{dest}:{tag}"], f"pushing {image.name} to {dest}")
    return f"{dest.removeprefix('docker://')}@{image.digest}"


def prune(cache: Path, days: int = 14) -> None:
    """Drop cached layers and layouts no build has used for ``days``."""
    cutoff = time.time() - days * 86400
    for directory in [*(cache / "layers").glob("*"), *(cache / "oci").glob("*")]:
        marker = directory / ("layer.json" if directory.parent.name == "layers" else "build.json")
        with contextlib.suppress(OSError):
            if marker.stat().st_mtime < cutoff:
                shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", choices=sorted(DEFINITIONS))
    parser.add_argument("--json", action="store_true", help="print one JSON record per image")
    parser.add_argument("--push", metavar="docker://REGISTRY/PREFIX", help="push each image there (skopeo)")
    parser.add_argument("--tag", default=project_version(), help="tag to push (default: the project version)")
    args = parser.parse_args(argv)
    # A TERM (CI's timeout, ^C's cousin) runs the finally blocks: no scratch root filesystem left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("build.py: needs root (mmdebstrap --mode=root, chroot, mounts)", file=sys.stderr)
        return 1
    cache = cache_root()
    for sub in ("layers", "oci"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    env_epoch = os.environ.get("SOURCE_DATE_EPOCH")
    epoch = int(env_epoch) if env_epoch else None
    with (cache / ".lock").open("a") as lock:
        # Two test sessions on one machine wait for each other instead of building twice.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for key in args.images:
                image = build(key, cache, epoch)
                record = image.record()
                if args.push:
                    record["pushed"] = push(image, args.push, args.tag)
                if args.json:
                    print(json.dumps(record), flush=True)
                else:
                    print(f"{image.name} {image.digest} {image.layout}", flush=True)
            prune(cache)
        except BuildError as error:
            print(f"build.py: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
