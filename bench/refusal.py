"""What it costs ``unlearn run`` to refuse a bad request: wall time, CPU time and peak memory.

Two refusals that need no torch to decide (a wrong apiVersion, a model file
that does not exist), each run ``--runs`` times as a fresh process of the
given ``unlearn`` console script; per run the kernel's own accounting of the
child (``wait4``: user + system CPU seconds, peak resident memory) and the
wall time. ``--unlearn`` points at another checkout's script to compare two
versions on the same machine, for example ``/work/main/.venv/bin/unlearn``.

    python -m bench refusal --runs 5
    python -m bench refusal --runs 5 --unlearn ../other-checkout/.venv/bin/unlearn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MANIFEST = """\
apiVersion: {api}
kind: UnlearningRequest
metadata: {{name: refusal}}
spec:
  model: {{name: digits-mlp, source: {{path: {model}}}}}
  forget: {{indices: [3, 17]}}
  output: {{location: {{path: {out}}}}}
"""

CASES = {
    "wrong apiVersion": {"api": "unlearn.dev/v1"},
    "model file missing": {"api": "unlearn.dev/v1alpha1"},
}


def measure(unlearn: str, manifest: Path) -> dict[str, float]:
    started = time.perf_counter()
    child = subprocess.Popen(
        [unlearn, "run", str(manifest), "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    return {
        "exit": float(os.waitstatus_to_exitcode(status)),
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench refusal", description=__doc__.splitlines()[0])
    parser.add_argument("--unlearn", default=str(Path(sys.executable).parent / "unlearn"), help="console script")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"unlearn": args.unlearn, "runs": args.runs, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in CASES.items():
            manifest = Path(tmp) / "request.yaml"
            manifest.write_text(MANIFEST.format(model=Path(tmp) / "absent.pt2", out=Path(tmp) / "out", **fields))
            runs = [measure(args.unlearn, manifest) for _ in range(args.runs)]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            results["cases"][name] = median
            print(
                f"{name:<20} exit {median['exit']:.0f}  wall {median['wall_s']:6.2f} s  "
                f"cpu {median['cpu_s']:6.2f} s  peak RSS {median['max_rss_mb']:7.0f} MB  (median of {args.runs})"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
