"""``python -m bench NAME [options]``: the bench command; each NAME is a module under bench/.

Modules are imported only when named, so a benchmark's dependencies (torch for
the job benchmarks, a control plane for the operator's) load only when it runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> (module, what it measures); every module has main(argv) -> int
BENCHMARKS: dict[str, tuple[str, str]] = {
    "quality": ("bench.quality", "forgetting quality against retraining (UA, RA, TA, MIA, Avg. Gap, speed-up)"),
    "gpu-throughput": ("bench.gpu_throughput", "ResNet-18 on CIFAR-shaped tensors on a GPU (samples/s, AMP)"),
    "throughput": ("bench.throughput", "the tutorial's loop against the engine on the same work (CPU)"),
    "data-parallel": ("bench.data_parallel", "the engine's training loop on 1 and N ranks (CPU gloo, or GPUs)"),
    "operator-scale": ("bench.operator_scale", "100 and 500 requests at once against the operator"),
    "refusal": ("bench.refusal", "what `unlearn run` costs to refuse a bad request (wall, CPU, peak memory)"),
    "job-time": ("bench.job_time", "the per-request speed-up with everything the Job does: unlearn run vs retrain"),
    "calibration": ("bench.calibration", "the reference bank: likeness to the original vs K, cost, staleness (CPU)"),
}


def usage() -> str:
    lines = ["usage: python -m bench NAME [options]   (python -m bench NAME --help for options)", ""]
    lines += [f"  {name:<16} {what}" for name, (_, what) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"python -m bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
