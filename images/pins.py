"""Print the exact versions an image installs: the closure of one extra of this project, from a tested venv.

    .venv/bin/python images/pins.py job > job_image/constraints.txt

The tests run against the venv, so its versions are the ones to ship. The
closure follows the markers this venv's platform satisfies (Linux, x86_64,
CPython 3.11), which is the images' platform too.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

# The root pyproject.toml: the development install whose extras the images' constraints mirror.
PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["name"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(extra: str) -> dict[str, str]:
    """Installed version of every distribution ``PROJECT[extra]`` needs, extras of dependencies followed."""
    found: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(PROJECT, frozenset({extra}))]
    while todo:
        name, extras = todo.pop()
        dist = md.distribution(name)
        found[canonical(name)] = dist.version
        for raw in dist.requires or []:
            req = Requirement(raw)
            wanted = extras | {""}
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted):
                continue
            for e in {"", *req.extras}:
                if (canonical(req.name), e) not in done:
                    done.add((canonical(req.name), e))
                    todo.append((req.name, frozenset(req.extras)))
    found.pop(canonical(PROJECT))
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for name, version in sorted(closure(argv[1]).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
