"""Operator scale: N requests applied at once against the real control plane; and fairness between tenants.

``python -m bench operator-scale [--sizes 100 500] [--caps 4 100] [--write-docs]``
``python -m bench operator-scale --tenants [--queued 100] [--caps 4] [--per-namespace 0 3] [--job-seconds 10]``

Starts etcd, kube-apiserver, controller-manager and scheduler from
tests/cluster, a node agent, and the operator as a subprocess (the same
``python -m unlearning_operator`` a pod runs). Then, for each size, it
creates that many UnlearningRequests (each for its own model, so only the
concurrency cap orders them) from 16 client threads, and measures from two
watches opened before the first create:

* apply -> Job created: from the create call's return to the Job's ADDED
  event, for the requests that started without waiting for a slot (the
  first ``cap`` Jobs; the rest wait by design, so their latency is
  queueing, reported separately as the time to drain the batch);
* Job done -> status written: from the Job's Complete event to the request's
  Succeeded event;
* the operator's peak resident memory (VmHWM from /proc) after each batch.

The pods are not the real job: the node agent runs them with a canned
``unlearn`` that writes a valid compact record to the termination log and
exits 0 within a few milliseconds of Python start-up. This is done without
touching the harness: the agent puts the directory of its own interpreter
first on the pods' PATH, so the benchmark starts it from a throw-away venv
(a pyvenv.cfg and symlinks to the project's site-packages) whose bin/ holds
the canned ``unlearn``. What is measured is the operator and the control
plane, not unlearning.

Everything runs on this machine; on 2 shared cores the API server, etcd, the
scheduler, the controller-manager, the node agent and its pods compete with
the operator, so the figures are upper bounds for a real cluster.

``--tenants`` measures the scheduler's fairness (scheduling.py, rules 3 and 4)
with one operator watching two namespaces. Tenant A applies ``--queued``
requests at once; once A's Jobs hold every slot and the rest of A's requests
wait, tenant B applies one. Each canned job then runs ``--job-seconds`` (so a
slot frees every ``job-seconds / cap`` seconds on average). Measured: B's
apply -> Job created, against the wait for the first slot that freed after
B applied (the first of A's Jobs to end). The claim is that B's first Job
starts within one slot's wait whatever A queued; plain FIFO would make B wait
for all of A's queue (about ``queued / cap`` job durations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from tests.cluster.controlplane import ControlPlane, build_binaries, free_port
from unlearning_contracts.api import API_GROUP, API_VERSION, REQUEST

# Run from the repository root (``python -m bench``), which puts the root, and so tests/, on sys.path.
ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, REQUEST.plural
NODE = "bench-node-0"
DOCS = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- operator-scale:start -->"
END_MARK = "<!-- operator-scale:end -->"
TENANTS_START = "<!-- operator-tenants:start -->"
TENANTS_END = "<!-- operator-tenants:end -->"

CANNED_UNLEARN = '''#!{python}
"""Canned job for the operator benchmark: a valid compact record, no unlearning."""
import json, pathlib, sys, time
import yaml
from unlearning_contracts.record import SUMMARY_KEYS
# How long each canned job runs: the number in job-seconds beside this script (the benchmark writes it).
seconds = pathlib.Path(__file__).with_name("job-seconds")
time.sleep(float(seconds.read_text()) if seconds.exists() else 0.0)
args = sys.argv[1:]
manifest = yaml.safe_load(open(args[1]))
version = int(args[args.index("--model-version") + 1])
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
spec = manifest["spec"]
record = {{
    "schemaVersion": 1, "requestId": spec.get("requestId") or manifest["metadata"]["name"],
    "model": spec["model"]["name"], "modelVersion": version, "method": spec["method"]["name"],
    "verdict": "Passed", "reasons": [], "exitCode": 0, "forgetSamples": len(spec["forget"]["indices"]),
    # Every summary number the record declares, so the operator parses it whatever they are.
    "pre": {{**dict.fromkeys(SUMMARY_KEYS, 0.5), "forgetAccuracy": 100.0, "retainAccuracy": 99.0,
             "testAccuracy": 97.0, "confidenceGap": 0.1, "miaAuc": 0.7}},
    "post": {{**dict.fromkeys(SUMMARY_KEYS, 0.5), "forgetAccuracy": 80.0, "retainAccuracy": 98.8,
              "testAccuracy": 96.5, "confidenceGap": 0.0, "miaAuc": 0.51}},
    "outputModel": {{"uri": "pvc://models/out/v%d.pt2" % version, "sha256": "0" * 64, "format": "exported"}},
    "startedAt": now, "finishedAt": now,
}}
open("/dev/termination-log", "w").write(json.dumps(record))
'''


def fake_venv(directory: Path) -> Path:
    """A venv that shares the project's site-packages but has the canned ``unlearn`` on its bin/."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    real = Path(sys.executable)
    (bin_dir / "python").symlink_to(real)
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    shutil.copy(cfg, directory / "pyvenv.cfg")
    purelib = Path(sysconfig.get_paths()["purelib"])
    target = directory / purelib.relative_to(sys.prefix)
    target.parent.mkdir(parents=True)
    target.symlink_to(purelib)
    script = bin_dir / "unlearn"
    script.write_text(CANNED_UNLEARN.format(python=bin_dir / "python"))
    script.chmod(0o755)
    return bin_dir / "python"


@dataclass
class Observed:
    applied: dict[str, float] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)
    job_added: dict[str, float] = field(default_factory=dict)
    job_done: dict[str, float] = field(default_factory=dict)
    succeeded: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    """When the request first showed phase Running: the scheduler chose it and the launch recorded its Job."""
    phases: dict[str, str] = field(default_factory=dict)
    watch_restarts: int = 0


def _keep_watching(
    watch_once: Callable[[client.ApiClient, str, Observed, threading.Event], None],
    api: client.ApiClient,
    namespace: str,
    seen: Observed,
    stop: threading.Event,
) -> None:
    """Run a watch until ``stop``; a watch that breaks (an expired version, a dropped connection on a
    saturated host) starts again with a fresh list, whose events only ever add later first-seen times."""
    while not stop.is_set():
        try:
            watch_once(api, namespace, seen, stop)
        except Exception:
            seen.watch_restarts += 1
            time.sleep(0.5)


def watch_jobs(api: client.ApiClient, namespace: str, seen: Observed, stop: threading.Event) -> None:
    _keep_watching(_watch_jobs, api, namespace, seen, stop)


def watch_requests(api: client.ApiClient, namespace: str, seen: Observed, stop: threading.Event) -> None:
    _keep_watching(_watch_requests, api, namespace, seen, stop)


def _watch_jobs(api: client.ApiClient, namespace: str, seen: Observed, stop: threading.Event) -> None:
    batch = client.BatchV1Api(api)
    w = watch.Watch()
    for event in w.stream(batch.list_namespaced_job, namespace, timeout_seconds=3600):
        now = time.monotonic()
        job = event["object"]
        request = (job.metadata.labels or {}).get("unlearn.dev/request")
        if request:
            seen.job_added.setdefault(request, now)
            if any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or []):
                seen.job_done.setdefault(request, now)
        if stop.is_set():
            w.stop()


def _watch_requests(api: client.ApiClient, namespace: str, seen: Observed, stop: threading.Event) -> None:
    custom = client.CustomObjectsApi(api)
    w = watch.Watch()
    for event in w.stream(
        custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, timeout_seconds=3600
    ):
        now = time.monotonic()
        obj = event["object"]
        name = obj["metadata"]["name"]
        phase = (obj.get("status") or {}).get("phase", "")
        seen.phases[name] = phase
        if phase == "Succeeded":
            seen.succeeded.setdefault(name, now)
        if phase == "Running":
            seen.running.setdefault(name, now)
        if stop.is_set():
            w.stop()


def manifest(name: str, index: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "UnlearningRequest",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": f"model-{index}", "source": {"claimName": "models", "path": "m.pt2"}},
            "forget": {"indices": [1, 2, 3]},
            "output": {"location": {"claimName": "models", "path": "out"}},
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare_namespace(cp: ControlPlane, namespace: str) -> None:
    """The namespace with a `models` claim, once its default ServiceAccount exists (pods need it)."""
    core = client.CoreV1Api(cp.api_client())
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    deadline = time.monotonic() + 60
    while not core.list_namespaced_service_account(namespace, field_selector="metadata.name=default").items:
        if time.monotonic() > deadline:
            raise RuntimeError(f"namespace {namespace}: no default ServiceAccount after 60 s")
        time.sleep(0.2)


def start_operator(
    cp: ControlPlane, python: Path, namespaces: list[str], settings: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """The operator as a subprocess watching ``namespaces``, once its liveness endpoint answers."""
    env = {
        **os.environ,
        "KUBECONFIG": str(cp.kubeconfig),
        "UNLEARNING_WATCH_NAMESPACES": ",".join(namespaces),
        "UNLEARNING_JOB_IMAGE": "bench/canned:1",
        "UNLEARNING_JOB_GPUS": "0",
        "UNLEARNING_JOB_CPU": "10m",
        "UNLEARNING_JOB_MEMORY": "32Mi",
        "UNLEARNING_METRICS_PORT": str(free_port()),
        "UNLEARNING_HEALTH_PORT": str(health := free_port()),
        **settings,
    }
    with log.open("wb") as out:
        operator = subprocess.Popen(
            [str(python), "-m", "unlearning_operator"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2):
                return operator
        except OSError:
            if operator.poll() is not None or time.monotonic() > deadline:
                stop_process(operator)
                raise RuntimeError(f"operator did not start; see {log}") from None
            time.sleep(0.2)


def stop_process(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()


def run_batch(cp: ControlPlane, python: Path, size: int, cap: int, workdir: Path) -> dict[str, Any]:
    namespace = f"bench-{size}-cap-{cap}"
    api = cp.api_client()
    prepare_namespace(cp, namespace)
    log = workdir / f"operator-{size}-cap-{cap}.log"
    operator = start_operator(cp, python, [namespace], {"UNLEARNING_MAX_CONCURRENT_JOBS": str(cap)}, log)
    try:
        seen = Observed()
        stop = threading.Event()
        for target in (watch_jobs, watch_requests):
            threading.Thread(target=target, args=(cp.api_client(), namespace, seen, stop), daemon=True).start()
        time.sleep(1.0)  # both watches established

        custom = client.CustomObjectsApi(api)
        names = [f"req-{i:04d}" for i in range(size)]

        def apply(item: tuple[int, str]) -> None:
            index, name = item
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(name, index))
            seen.applied[name] = time.monotonic()
            seen.wall[name] = time.time()

        began = time.monotonic()
        cpu_before = cpu_seconds(operator.pid)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(apply, enumerate(names)))
        applied_in = time.monotonic() - began
        deadline = time.monotonic() + max(300.0, size * 2.0)
        while len(seen.succeeded) < size:
            if time.monotonic() > deadline or operator.poll() is not None:
                phases: dict[str, int] = {}
                for phase in seen.phases.values():
                    phases[phase] = phases.get(phase, 0) + 1
                raise RuntimeError(f"{len(seen.succeeded)}/{size} Succeeded; phases {phases}; see {log}")
            time.sleep(0.2)
        drained_in = time.monotonic() - began
        stop.set()
        (workdir / f"applied-{size}-cap-{cap}.json").write_text(json.dumps(seen.wall))
        rss = peak_rss_mib(operator.pid)
        cpu = cpu_seconds(operator.pid) - cpu_before
    finally:
        stop_process(operator)

    # The requests that started without waiting for a slot: the first `cap` Jobs.
    first = sorted(seen.job_added, key=seen.job_added.__getitem__)[: min(cap, size)]
    create_latency = [seen.job_added[n] - seen.applied[n] for n in first if n in seen.applied]
    status_latency = [seen.succeeded[n] - seen.job_done[n] for n in names if n in seen.job_done and n in seen.succeeded]
    jobs = client.BatchV1Api(api).list_namespaced_job(namespace).items
    per_request = {}
    for job in jobs:
        request = job.metadata.labels["unlearn.dev/request"]
        per_request[request] = per_request.get(request, 0) + 1
    return {
        "size": size,
        "cap": cap,
        "applied_in_s": applied_in,
        "drained_in_s": drained_in,
        "create_p50_s": percentile(create_latency, 50),
        "create_p99_s": percentile(create_latency, 99),
        "create_n": len(create_latency),
        "status_p50_s": percentile(status_latency, 50),
        "status_p99_s": percentile(status_latency, 99),
        "status_n": len(status_latency),
        "peak_rss_mib": rss,
        "operator_cpu_s": cpu,
        "jobs": len(jobs),
        "max_jobs_per_request": max(per_request.values(), default=0),
        "watch_restarts": seen.watch_restarts,
    }


def run_tenants(
    cp: ControlPlane, python: Path, workdir: Path, *, queued: int, cap: int, per_namespace: int, job_seconds: float
) -> dict[str, Any]:
    """Tenant A queues ``queued`` requests; then tenant B applies one. How long does B wait?"""
    tag = f"{queued}-cap-{cap}-ns-{per_namespace}"
    first, second = f"tenant-a-{tag}", f"tenant-b-{tag}"
    for namespace in (first, second):
        prepare_namespace(cp, namespace)
    (python.parent / "job-seconds").write_text(str(job_seconds))
    settings = {
        "UNLEARNING_MAX_CONCURRENT_JOBS": str(cap),
        "UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE": str(per_namespace),
    }
    operator = start_operator(cp, python, [first, second], settings, workdir / f"operator-tenants-{tag}.log")
    done = threading.Event()
    a, b = Observed(), Observed()
    try:
        for namespace, seen in ((first, a), (second, b)):
            for target in (watch_jobs, watch_requests):
                threading.Thread(target=target, args=(cp.api_client(), namespace, seen, done), daemon=True).start()
        time.sleep(1.0)  # the watches are established
        custom = client.CustomObjectsApi(cp.api_client())

        def apply(item: tuple[int, str]) -> None:
            index, name = item
            custom.create_namespaced_custom_object(GROUP, VERSION, first, PLURAL, manifest(name, index))
            a.applied[name] = time.monotonic()

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(apply, enumerate(f"a-{i:04d}" for i in range(queued))))
        # A holds every slot it may, and every other request of A has been placed (Queued behind them).
        holds = min(queued, cap, per_namespace or cap)
        deadline = time.monotonic() + 300
        while (
            len(a.job_added) < holds or len(a.phases) < queued or any(p in ("", "Pending") for p in a.phases.values())
        ):
            if time.monotonic() > deadline or operator.poll() is not None:
                raise RuntimeError(f"tenant A never filled its slots: {len(a.job_added)} Jobs; see {workdir}")
            time.sleep(0.1)
        waiting_before = sum(1 for p in a.phases.values() if p == "Queued")
        began = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, second, PLURAL, manifest("b-first", 0))
        deadline = began + max(120.0, 4 * job_seconds)
        while "b-first" not in b.job_added:
            if time.monotonic() > deadline or operator.poll() is not None:
                raise RuntimeError(f"tenant B's first Job did not start within {deadline - began:.0f} s; see {workdir}")
            time.sleep(0.05)
        started = b.job_added["b-first"]
        chosen = b.running.get("b-first", started)
        freed = sorted(t for t in a.job_done.values() if t >= began)
        held = [a.job_done[n] - a.job_added[n] for n in a.job_done if n in a.job_added]
    finally:
        done.set()
        stop_process(operator)
        (python.parent / "job-seconds").unlink(missing_ok=True)
    return {
        "queued": queued,
        "cap": cap,
        "per_namespace": per_namespace,
        "job_seconds": job_seconds,
        "slot_held_p50_s": percentile(held, 50),
        "a_waiting_when_b_applied": waiting_before,
        "b_wait_s": started - began,
        "b_chosen_after_s": chosen - began,
        # None: a slot was free for B at once (the per-namespace cap kept one).
        "first_slot_freed_after_s": (freed[0] - began) if freed and freed[0] <= started else None,
        # Slots that freed before B was chosen, and Jobs of A started in that time: both 0 or 1 and 0 when B
        # got the first slot that freed.
        "slots_freed_before_b": sum(1 for t in freed if t < chosen),
        "a_jobs_before_b": sum(1 for n, t in a.running.items() if began <= t < chosen and n in a.job_added),
    }


def render_tenants(results: list[dict[str, Any]], machine: str) -> str:
    lines = [
        TENANTS_START,
        "## Fairness between tenants",
        "",
        "`python -m bench operator-scale --tenants --write-docs` (bench/operator_scale.py): one operator watching two",
        "namespaces on the same control plane and node agent as above; each canned job runs for `job s`. Tenant A",
        "applies `A queued` requests at once; when A's Jobs hold every slot they may and the rest of A's requests",
        "wait, tenant B applies one request. From B's create call: `first slot freed` (the first of A's Jobs",
        "to end; none: a slot was free for B at once), `B chosen` (B's phase Running: the scheduler gave it a",
        "slot) and `B's Job` (its ADDED event). `slots freed / A started before B` count the slots that freed",
        "and A's requests that started between B's create call and B being chosen. `slot held` is how long",
        "one of A's Jobs held its slot (pod start, the canned job, the status). Under plain first-in-first-out",
        "B would wait for A's whole queue: about `A waiting / cap` times `slot held` (the FIFO column).",
        "",
        f"Machine: {machine}, shared as above.",
        "",
        "| A queued | cap | per-namespace cap | job s | slot held p50 | A waiting when B applied "
        "| first slot freed | B chosen | B's Job | slots freed / A started before B | FIFO would wait |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        freed = r["first_slot_freed_after_s"]
        held = r["slot_held_p50_s"]
        fifo = r["a_waiting_when_b_applied"] / r["cap"] * held
        lines.append(
            f"| {r['queued']} | {r['cap']} | {r['per_namespace'] or 'none'} | {r['job_seconds']:.0f} "
            f"| {'-' if math.isnan(held) else f'{held:.1f} s'} | {r['a_waiting_when_b_applied']} "
            f"| {'none' if freed is None else f'{freed:.2f} s'} | {r['b_chosen_after_s']:.2f} s "
            f"| {r['b_wait_s']:.2f} s | {r['slots_freed_before_b']} / {r['a_jobs_before_b']} "
            f"| {'-' if math.isnan(fifo) else f'~{fifo:.0f} s'} |"
        )
    lines += [
        "",
        "Claim (issue 9): B's first Job starts within one slot's wait, whatever A queued. Without a per-namespace",
        "cap A holds every slot, and the first slot that frees goes to B (the namespace with fewer Jobs) before",
        "any of A's older requests: B is chosen right after `first slot freed`, and no request of A starts",
        "before it (`1 / 0`). (A's first Jobs start together, so they end together: when a second one ends",
        "while B's launch is in flight, that slot goes to A, and the row reads `2 / 1` though B took the first;",
        "one run out of three showed it.) With a per-namespace cap below the global one a slot is always left",
        "for another tenant, and B starts at once (`0 / 0`).",
        TENANTS_END,
    ]
    return "\n".join(lines) + "\n"


def render(results: list[dict[str, Any]], machine: str) -> str:
    lines = [
        START_MARK,
        "## Operator scale",
        "",
        "`python -m bench operator-scale --write-docs` (bench/operator_scale.py): N UnlearningRequests created at once",
        "from 16 client threads against the real control plane of tests/cluster (kube-apiserver, etcd,",
        "controller-manager, scheduler) and one node agent whose pods run a canned `unlearn` (a valid compact",
        "record in milliseconds: this measures the operator, not unlearning). Each request names its own model,",
        "so only the concurrency cap orders them. Latencies are from client-side watch events. Job creation is",
        "measured for the requests that started without waiting for a slot (the first `cap` Jobs); the rest",
        "wait by design and are covered by the drain time.",
        "",
        f"Machine: {machine}. Everything (control plane, node agent, pods, operator, client) shares these cores,",
        "so these are upper bounds for a real cluster.",
        "",
        "| requests | cap | apply -> Job created p50 / p99 | Job done -> status p50 / p99 "
        "| all Succeeded after | operator CPU | operator peak RSS | Jobs per request |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['size']} | {r['cap']} | {r['create_p50_s']:.2f} s / {r['create_p99_s']:.2f} s (n={r['create_n']}) "
            f"| {r['status_p50_s']:.2f} s / {r['status_p99_s']:.2f} s (n={r['status_n']}) "
            f"| {r['drained_in_s']:.0f} s | {r['operator_cpu_s']:.1f} s | {r['peak_rss_mib']:.0f} MiB "
            f"| {r['max_jobs_per_request']} |"
        )
    lines += [
        "",
        "Targets (issue 3): Job creation p99 under 1 s at 100 requests, status within 1 s of the Job ending,",
        "under 200 MB resident at 500 requests. At the default cap (4) they hold. With cap 100 the whole burst",
        "(100 launches of five API writes each, plus every other request's Pending and Queued writes, while 100",
        "pods start on the same host) saturates the two shared cores. The operator is not CPU-bound there (its",
        "CPU for the whole batch is in the table); the tails are queueing for the cores, the API server and the",
        "operator's API threads, not broken down further. Jobs per request is the most Jobs any one request got",
        "(1: never a second Job).",
        END_MARK,
    ]
    return "\n".join(lines) + "\n"


def write_docs(section: str, start: str = START_MARK, end: str = END_MARK) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench operator-scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument(
        "--caps",
        type=int,
        nargs="+",
        help="UNLEARNING_MAX_CONCURRENT_JOBS values (4: the default); default 4 100, with --tenants 4",
    )
    parser.add_argument("--write-docs", action="store_true", help="write the figures into docs/benchmarks.md")
    parser.add_argument("--tenants", action="store_true", help="measure fairness between two tenants instead")
    parser.add_argument(
        "--queued", type=int, nargs="+", default=[100, 300], help="--tenants: requests tenant A applies at once"
    )
    parser.add_argument(
        "--per-namespace",
        type=int,
        nargs="+",
        default=[0, 3],
        help="--tenants: UNLEARNING_MAX_CONCURRENT_JOBS_PER_NAMESPACE values (0: none)",
    )
    parser.add_argument("--job-seconds", type=float, default=10.0, help="--tenants: how long each canned job runs")
    args = parser.parse_args(argv)

    # Not under /tmp: the Job mounts an emptyDir at /tmp, which would hide the
    # canned `unlearn` from the pods the node agent runs on this host.
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unlearning-operator"
    cache.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-", dir=cache))
    python = fake_venv(workdir / "venv")
    cp = ControlPlane(build_binaries(), workdir / "cluster")
    cp.start()
    agent = None
    try:
        kubeconfig = cp.kubeconfig_for(NODE, f"/O=system:nodes/CN=system:node:{NODE}")
        with (workdir / "nodeagent.log").open("wb") as out:
            agent = subprocess.Popen(
                [
                    str(python),
                    str(ROOT / "tests" / "cluster" / "nodeagent.py"),
                    f"--kubeconfig={kubeconfig}",
                    f"--root={workdir / 'node'}",
                    f"--node-name={NODE}",
                    "--gpus=0",
                    "--cpu=1000",
                    "--memory=1000Gi",
                    f"--provisioner-kubeconfig={cp.kubeconfig}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        cp.kubectl("apply", "-f", str(ROOT / "crds" / "unlearningrequests.unlearn.dev.yaml"))
        cp.kubectl("wait", "--for=condition=Established", "crd/unlearningrequests.unlearn.dev", "--timeout=60s")
        core = client.CoreV1Api(cp.api_client())
        deadline = time.monotonic() + 120
        while True:
            nodes = core.list_node(field_selector=f"metadata.name={NODE}").items
            conditions = {c.type: c.status for node in nodes for c in node.status.conditions or []}
            if conditions.get("Ready") == "True" and not nodes[0].spec.taints:
                break
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError(f"node {NODE} not Ready; see {workdir / 'nodeagent.log'}")
            time.sleep(0.5)
        machine = (
            f"{os.cpu_count()} CPU cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB"
        )
        results = []
        if args.tenants:
            for queued in args.queued:
                for cap in args.caps or [4]:
                    for per_namespace in args.per_namespace:
                        result = run_tenants(
                            cp,
                            python,
                            workdir,
                            queued=queued,
                            cap=cap,
                            per_namespace=per_namespace,
                            job_seconds=args.job_seconds,
                        )
                        print(json.dumps(result), flush=True)
                        results.append(result)
            section = render_tenants(results, machine)
            print(section)
            if args.write_docs:
                write_docs(section, TENANTS_START, TENANTS_END)
        else:
            for size in args.sizes:
                for cap in args.caps or [4, 100]:
                    result = run_batch(cp, python, size, cap, workdir)
                    print(json.dumps(result), flush=True)
                    results.append(result)
            section = render(results, machine)
            print(section)
            if args.write_docs:
                write_docs(section)
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
        cp.stop()
    print(f"logs under {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
