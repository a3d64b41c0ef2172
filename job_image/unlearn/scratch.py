"""Scratch space: stop with a clear error before the kubelet evicts the pod for outgrowing /tmp.

In a pod, /tmp (and HOME) is an emptyDir with a ``sizeLimit`` the operator
sets from the chart and passes on as ``UNLEARN_TMP_LIMIT``. Past the limit
the kubelet evicts the pod: the user would see ``Evicted: Usage of EmptyDir
volume "tmp" exceeds the limit`` and the Job would retry the same work until
its backoffLimit. Instead, :func:`guard` measures the folder every few
seconds and at :data:`THRESHOLD` of the limit raises :class:`StorageLimitError`
in the main thread. The job reports it like input it cannot handle as given:
exit code 4 (never retried), and a record saying how much was used, where,
and what to change. Nothing is guarded outside a pod (no ``UNLEARN_TMP_LIMIT``).

It derives from BaseException, as KeyboardInterrupt does, because it can
arrive anywhere: a loader's ``except Exception`` that turns a failure into
"cannot load the model" must not swallow it and blame the wrong thing.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

log = logging.getLogger("unlearn")

ENV_LIMIT = "UNLEARN_TMP_LIMIT"
# Stop here: the kubelet checks every ~10 s, so waiting for 100% would race its eviction.
THRESHOLD = 0.9
INTERVAL_SECONDS = 2.0

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class StorageLimitError(BaseException):
    """The job's scratch folder outgrew its share of the pod's size limit (see the module docstring)."""


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity ("4Gi", "500M") in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?", quantity.strip())
    if match is None:
        raise ValueError(f"{ENV_LIMIT}={quantity!r}: not a storage quantity such as 4Gi")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2) or ""])


def usage(folder: Path) -> int:
    """Bytes of disk the folder's files take (allocated blocks, as du and the kubelet count them)."""
    total = 0
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue  # removed meanwhile, or unreadable: not ours to count
        for entry in entries:
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += stat.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return total


def over_limit(used: int, limit: int, folder: Path, raw: str) -> str | None:
    """The error message when ``used`` is past THRESHOLD of ``limit``; None while it fits."""
    if used < THRESHOLD * limit:
        return None
    return (
        f"scratch space {folder} holds {used / 2**20:.0f} MiB, {used / limit:.0%} of its {raw} limit "
        f"(the pod is evicted past it): raise job.tmpSizeLimit and job.ephemeralStorage in the chart's values, "
        "or find what writes there (library caches: HOME is /tmp in the pod)"
    )


@contextmanager
def guard(env: Mapping[str, str] | None = None, folder: Path | None = None) -> Iterator[None]:
    """Raise StorageLimitError in this (the main) thread if the folder outgrows the limit meanwhile."""
    raw = (env if env is not None else os.environ).get(ENV_LIMIT, "").strip()
    if not raw or threading.current_thread() is not threading.main_thread():
        yield
        return
    limit = quantity_bytes(raw)
    where = folder or Path(tempfile.gettempdir())
    message = over_limit(usage(where), limit, where, raw)
    if message is not None:
        raise StorageLimitError(message)
    tripped: list[str] = []
    stop = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():  # the work is done: a late signal must not turn it into a failure
            raise StorageLimitError(tripped[0])

    def watch() -> None:
        while not stop.wait(INTERVAL_SECONDS):
            found = over_limit(usage(where), limit, where, raw)
            if found is not None:
                log.error("%s", found)
                tripped.append(found)
                # Runs `interrupt` in the main thread at its next bytecode (after the current tensor op).
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=watch, name="scratch-guard", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
