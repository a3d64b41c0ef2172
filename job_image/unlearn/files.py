"""The files a run reads and writes: inside its claims, regular, bounded, never replaced.

Every location in a request is written by a tenant, and in a pod the claims
it names are mounted under ``--volume-root``. The rules, each with its reason:

1. **Inputs are regular files**, opened with ``O_NONBLOCK`` and checked with
   ``fstat`` before a byte is read: a FIFO would block until the Job's
   deadline and ``/dev/zero`` would be read until the pod runs out of memory
   (with the wrong advice, "raise spec.job.memory"). Reads are bounded by a
   limit the caller derives from the data (``read_bytes``), and anything
   that must be held in memory is checked against ``memory_budget``.
2. **Inside a claim, a symlink may lead anywhere in that claim, never out of
   it.** A location is resolved (``realpath``) and must lie under the real
   path of the claim's mount; the file is then opened component by
   component from the mount with ``O_NOFOLLOW``, so a link swapped in after
   the check is refused too instead of followed. Folders (image folders,
   torchvision datasets, which other libraries read by path) are walked
   first: no link out of the claim and no special file anywhere in them.
3. **Plain paths** (``unlearn run`` locally, no ``claimName``) are the
   user's own files: links are followed, rule 1 still holds.
4. **Outputs** are written to a hidden temporary name in the output folder
   (reached through the same confined walk, created on the way) and
   published with ``link(2)``, which fails instead of replacing an existing
   file: a published version is never overwritten, even by a retry or a
   concurrent run. A full disk is reported with the space needed and free
   (``OutputSpaceError``), before a byte is written when ``statvfs`` can
   tell, and the temporary file is always removed.

Torch-free, so that the CLI can check every location before importing torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from unlearn.errors import InvalidInputError
from unlearning_contracts.safe_yaml import file_kind as kind
from unlearning_contracts.safe_yaml import strerror
from unlearning_contracts.spec import Location

MAX_TREE_ENTRIES = 5_000_000
"""Entries walked in an input folder (a dataset of millions of images is still fine)."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class OutputSpaceError(InvalidInputError):
    """The output location has no room for the new version (not retried: the claim stays full until someone acts)."""


def within(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies under it (both already resolved)."""
    return path == root or root in path.parents


@dataclass(frozen=True)
class Place:
    """A location of the request, resolved: where it is, and the claim it must stay inside."""

    field: str
    """The spec field, for messages (``model.source``, ``data.train``, ...)."""
    uri: str
    """``pvc://claim/path`` or the plain path, as the user wrote it."""
    path: Path
    """The path as mounted (``<volume-root>/<claim>/<path>``) or the plain path."""
    claim: str | None = None
    root: Path | None = None
    """The real path of the claim's mount (None for plain paths)."""

    @property
    def where(self) -> str:
        """``field uri`` for messages; the path looked at is added where it differs from the uri."""
        return f"{self.field} {self.uri}"

    def real(self) -> Path:
        """The resolved path; refused when it leaves the claim (rule 2). It need not exist."""
        try:
            real = Path(os.path.realpath(self.path))
        except OSError as error:  # a symlink loop, a name too long
            raise InvalidInputError(f"{self.where}: cannot resolve the path ({strerror(error)})") from None
        if self.root is not None and not within(real, self.root):
            raise InvalidInputError(
                f"{self.where}: a symlink leads outside the claim {self.claim} (to {real}): "
                "links inside a claim may only point inside it"
            )
        return real

    def stat(self) -> os.stat_result | None:
        """``stat`` of the resolved path, or None when nothing is there."""
        real = self.real()
        try:
            return real.stat()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise InvalidInputError(f"{self.where}: cannot read ({strerror(error)})") from None

    def not_found(self) -> InvalidInputError:
        looked = f" (looked at {self.path})" if str(self.path) != self.uri else ""
        return InvalidInputError(f"{self.where}: not found{looked}: fix the path or the claim")

    def require_file(self) -> os.stat_result:
        info = self.stat()
        if info is None:
            raise self.not_found()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"{self.where}: not a regular file ({kind(info.st_mode)}): name a file")
        return info

    def require_folder(self) -> None:
        info = self.stat()
        if info is None:
            raise self.not_found()
        if not stat.S_ISDIR(info.st_mode):
            raise InvalidInputError(f"{self.where}: not a folder ({kind(info.st_mode)}): name the dataset's folder")

    @contextlib.contextmanager
    def open(self, limit: int | None = None) -> Iterator[BinaryIO]:
        """The regular file, opened without following a link out of the claim and without blocking.

        ``limit``: refuse a file larger than this many bytes (the caller derives it from the data).
        """
        real = self.real()
        try:
            fd = self._open_fd(real)
        except FileNotFoundError:
            raise self.not_found() from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR) and self.root is not None:
                raise InvalidInputError(
                    f"{self.where}: a path component changed into a symlink while being read: leave the claim alone "
                    "while the job runs"
                ) from None
            raise InvalidInputError(f"{self.where}: cannot open ({strerror(error)})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(f"{self.where}: not a regular file ({kind(info.st_mode)}): name a file")
            if limit is not None and info.st_size > limit:
                raise InvalidInputError(
                    f"{self.where}: {info.st_size} bytes, more than the {limit} this input can need: "
                    "is it the right file?"
                )
            os.set_blocking(fd, True)
            handle = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with handle:
            yield handle

    def read_bytes(self, limit: int) -> bytes:
        """The whole file, at most ``limit`` bytes (a file that grows while read is refused too)."""
        with self.open(limit) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise InvalidInputError(f"{self.where}: more than the {limit} bytes this input can need")
        return data

    def _open_fd(self, real: Path) -> int:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        if self.root is None:
            return os.open(real, flags)
        return _open_below(self.root, real, flags | _NOFOLLOW)

    def check_tree(self, limit: int = MAX_TREE_ENTRIES) -> None:
        """An input folder: no link that leaves the claim, no FIFO or device, at most ``limit`` entries."""
        top = self.real()
        seen: set[Path] = set()
        pending = [top]
        count = 0
        while pending:
            folder = pending.pop()
            if folder in seen:
                continue
            seen.add(folder)
            try:
                entries = list(os.scandir(folder))
            except OSError as error:
                raise InvalidInputError(f"{self.where}: cannot list {folder} ({strerror(error)})") from None
            for entry in entries:
                count += 1
                if count > limit:
                    raise InvalidInputError(f"{self.where}: more than {limit} files and folders: is it the right one?")
                target = Path(entry.path)
                if entry.is_symlink():
                    target = Path(os.path.realpath(entry.path))
                    if self.root is not None and not within(target, self.root):
                        raise InvalidInputError(
                            f"{self.where}: {_relative(entry.path, top)} is a symlink leading outside the claim "
                            f"{self.claim}: links inside a claim may only point inside it"
                        )
                try:
                    mode = target.stat().st_mode
                except OSError as error:
                    raise InvalidInputError(
                        f"{self.where}: cannot read {_relative(entry.path, top)} ({strerror(error)})"
                    ) from None
                if stat.S_ISDIR(mode):
                    pending.append(target)
                elif not stat.S_ISREG(mode):
                    raise InvalidInputError(
                        f"{self.where}: {_relative(entry.path, top)} is {kind(mode)}: an input folder may hold only "
                        "regular files and folders"
                    )


def _relative(path: str, top: Path) -> str:
    try:
        return str(Path(path).relative_to(top))
    except ValueError:
        return path


def _open_below(root: Path, real: Path, flags: int, *, created: list[Path] | None = None) -> int:
    """Open ``real`` (under ``root``) walking from ``root`` one component at a time, never following a link.

    ``created``: make missing folders on the way (``real`` is then a folder), and list the ones made.
    """
    parts = real.relative_to(root).parts
    fd = os.open(root, _DIR_FLAGS)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if created is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    created.append(root.joinpath(*parts[: index + 1]))
            step_flags = flags if last else _DIR_FLAGS | _NOFOLLOW
            nxt = os.open(part, step_flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not parts:  # the claim's mount itself
            nxt = os.open(".", flags & ~_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def resolve(location: Location, volume_root: Path, field: str) -> Place:
    """The place of ``location``: a claim mounted at ``<volume_root>/<claimName>``, or a plain path."""
    if location.claim_name is None:
        return Place(field=field, uri=location.uri, path=Path(location.path))
    mount = volume_root / location.claim_name
    try:
        root = Path(os.path.realpath(mount))
    except OSError as error:
        raise InvalidInputError(f"{field} {location.uri}: cannot resolve the claim ({strerror(error)})") from None
    if not root.is_dir():
        raise InvalidInputError(
            f"{field} {location.uri}: the claim {location.claim_name} is not mounted at {mount}: "
            "check claimName (and --volume-root when running locally)"
        )
    return Place(
        field=field, uri=location.uri, path=location.resolve(volume_root), claim=location.claim_name, root=root
    )


def plain(path: Path, field: str) -> Place:
    return Place(field=field, uri=str(path), path=path)


# -- memory -----------------------------------------------------------------------------------------


def memory_budget() -> int:
    """Bytes of memory this process may use: the cgroup's limit in a pod, else the machine's total."""
    candidates = []
    for path, scale in (("/sys/fs/cgroup/memory.max", 1), ("/sys/fs/cgroup/memory/memory.limit_in_bytes", 1)):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            if text != "max":
                candidates.append(int(text) * scale)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                candidates.append(int(line.split()[1]) * 1024)
    if not candidates:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        candidates.append(pages * os.sysconf("SC_PAGE_SIZE") if pages > 0 else 1 << 40)
    return min(candidates)


def gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


# -- outputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputFolder:
    """The folder new versions go to (``spec.output.location``); created only when something is written."""

    place: Place

    def check(self) -> None:
        """Usable as it is now: a folder (or creatable under one) that the job may write, inside its claim."""
        real = self.place.real()
        probe = real
        while True:
            try:
                info = probe.stat()
                break
            except FileNotFoundError:
                if probe.parent == probe:
                    raise InvalidInputError(f"output.location {self.place.uri}: no folder to create it in") from None
                probe = probe.parent
            except OSError as error:
                raise InvalidInputError(f"output.location {self.place.uri}: cannot use ({strerror(error)})") from None
        if not stat.S_ISDIR(info.st_mode):
            raise InvalidInputError(
                f"output.location {self.place.uri}: {probe} is {kind(info.st_mode)}, not a folder: "
                "choose a folder for the new versions"
            )
        if not os.access(probe, os.W_OK | os.X_OK):
            what = "" if probe == real else f" (it would be created in {probe})"
            raise InvalidInputError(
                f"output.location {self.place.uri}: not writable by the job{what}: mount the claim read-write "
                "or choose another folder"
            )

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.place.real() / name)

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """A descriptor of the folder, created (confined) when missing; what it created goes again on failure."""
        real = self.place.real()
        created: list[Path] = []
        try:
            if self.place.root is None:
                missing = [p for p in (real, *real.parents) if not p.exists()]
                real.mkdir(parents=True, exist_ok=True)
                created.extend(reversed(missing))
                fd = os.open(real, _DIR_FLAGS)
            else:
                fd = _open_below(self.place.root, real, _DIR_FLAGS | _NOFOLLOW, created=created)
        except OSError as error:
            _remove_empty(created)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputSpaceError(
                    f"output.location {self.place.uri}: no space left to create the folder: free space in the claim"
                ) from None
            raise InvalidInputError(
                f"output.location {self.place.uri}: cannot create or open the folder ({strerror(error)})"
            ) from None
        try:
            yield fd
        except BaseException:
            os.close(fd)
            _remove_empty(created)  # an invalid run leaves no empty folder behind
            raise
        os.close(fd)

    def publish(self, files: list[tuple[str, bytes]], *, replace: bool = False) -> None:
        """Write each (name, data) under a temporary name, then link them all in; never replace unless ``replace``.

        Either every file is published or none is: a failure after the first
        link removes the names this call linked (they were free before it).
        """
        with self.opened() as folder:
            self._check_space(folder, sum(len(data) for _, data in files))
            temps: list[tuple[str, str]] = []
            linked: list[str] = []
            try:
                for name, data in files:
                    temps.append((_write_temp(folder, name, data, self.place.uri), name))
                for tmp, name in temps:
                    _link(folder, tmp, name, replace=replace, uri=self.place.uri)
                    linked.append(name)
                with contextlib.suppress(OSError):
                    os.fsync(folder)
            except BaseException:
                for name in linked:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=folder)
                raise
            finally:
                for tmp, _ in temps:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=folder)

    def _check_space(self, folder: int, needed: int) -> None:
        try:
            info = os.fstatvfs(folder)
        except OSError:
            return
        free = info.f_bavail * info.f_frsize
        # A little room for the folder entries and the file system's own blocks.
        if needed + 64 * 1024 > free:
            raise OutputSpaceError(
                f"output.location {self.place.uri}: no space for the new version ({needed} bytes needed, {free} "
                "free): free space in the claim or use a larger one"
            )


def _remove_empty(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):  # not empty (someone else wrote there), or already gone
            path.rmdir()


def _write_temp(folder: int, name: str, data: bytes, uri: str) -> str:
    tmp = f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, 0o644, dir_fd=folder)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as error:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            reason = "the file is larger than allowed" if error.errno == errno.EFBIG else "no space left"
            raise OutputSpaceError(
                f"output.location {uri}: {reason} while writing {name} ({len(data)} bytes): "
                "free space in the claim or use a larger one"
            ) from None
        raise
    os.close(fd)
    return tmp


def _link(folder: int, tmp: str, name: str, *, replace: bool, uri: str) -> None:
    if replace:
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        return
    try:
        os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        raise InvalidInputError(
            f"output.location {uri}: {name} already exists: a published version is never replaced"
        ) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # No hard links on this file system: check, then rename (a race with another writer remains).
        try:
            os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            return
        raise InvalidInputError(
            f"output.location {uri}: {name} already exists: a published version is never replaced"
        ) from None


def atomic_write(dest: Path, write: Callable[[Path], None], protect: tuple[Path, ...] = ()) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``dest``, then rename it to ``dest``.

    For the user's own files (``--result``, ``--plot``, the demo's cache): the
    temporary file is removed on any failure, so no partial output is left;
    ``protect`` lists paths (the inputs) that must never be overwritten.
    """
    dest_resolved = dest.resolve()
    for path in protect:
        if path.exists() and path.resolve() == dest_resolved:
            raise InvalidInputError(f"output.location: {dest} is the input model: choose another output folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
