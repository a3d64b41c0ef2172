"""kube-score, as a platform team runs it before admitting a chart: no CRITICAL finding but the ignored ones.

Scored together, as kube-score needs them to match policies to pods: the
chart rendered with each values file under tests/chart/values/ (the
``helm test`` pod included; ``pinned-digests.yaml`` pins both images by
digest, as a release does), and the Job plus its NetworkPolicy that the
operator builds with the settings that rendering gives it. kube-score is
built by tests/cluster/build-kube-score.sh (pinned, cached).

The ignore list is short and every entry says why the check does not apply
here; an entry that no longer matches anything fails the test too, so the
list cannot outlive its reason. WARNINGs are reported, not failed on (see
docs/network.md for the one left: host anti-affinity, where the chart uses
topology spread instead).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import ROOT, VALUES_FILES, Helm, template_args
from tests.chart.test_rendered import operator_env
from tests.cluster.controlplane import ControlPlaneError, build_binaries
from unlearning_contracts.spec import load_manifest
from unlearning_operator.jobs import RequestRef, build_job, build_network_policy, resolve_image
from unlearning_operator.lineage import initial
from unlearning_operator.settings import load_settings

pytestmark = pytest.mark.cluster

SCRIPT = ROOT / "tests" / "cluster" / "build-kube-score.sh"
EXAMPLE = ROOT / "examples" / "requests" / "digits-gdpr.yaml"
CRITICAL, WARNING = 1, 5  # kube-score's scorecard grades


def cluster_version() -> str:
    """The Kubernetes minor the test cluster runs (what kube-score's API checks should assume)."""
    go_mod = (ROOT / "tests" / "cluster" / "tools" / "kubernetes" / "go.mod").read_text()
    found = re.search(r"k8s\.io/kubernetes v1\.(\d+)\.", go_mod)
    assert found is not None
    return f"v1.{found.group(1)}"


@dataclass(frozen=True)
class Finding:
    check: str
    grade: int
    kind: str
    name: str
    summary: str

    def __str__(self) -> str:
        level = "CRITICAL" if self.grade == CRITICAL else "WARNING"
        return f"{level} {self.check}: {self.kind} {self.name}: {self.summary}"


@dataclass(frozen=True)
class Ignored:
    check: str
    summary: str
    """A substring of the finding's summary (kube-score names the container in the path, not here)."""
    kinds: tuple[str, ...]
    why: str

    def covers(self, finding: Finding) -> bool:
        return finding.check == self.check and self.summary in finding.summary and finding.kind in self.kinds


IGNORED = (
    Ignored(
        "container-image-pull-policy",
        "ImagePullPolicy is not set to Always",
        ("Deployment", "Pod", "Job"),
        why="Every image here is the cluster admin's choice (chart values, the job image allow-list), never a "
        "tenant's, and a release pins both by digest (image.digest, job.image.digest; values/pinned-digests.yaml, "
        "as the end-to-end tier installs them): a digest names one image for good, so a copy cached on the node is "
        "what a pull would fetch, and Always would only make every Job start depend on the registry being "
        "reachable. kube-score reports digests too (it reads whatever follows the last ':' as a tag). What Always "
        "adds besides, a per-pod check of pull secrets, is what the AlwaysPullImages admission plugin does, "
        "overriding this field, on clusters that want it.",
    ),
    Ignored(
        "container-resources",
        "CPU limit is not set",
        ("Deployment",),
        why="The operator has a CPU request and deliberately no CPU limit: CFS throttling a reconciler only "
        "delays status writes and Lease renewals (a throttled leader can miss its renew deadline), while its "
        "memory and local disk are capped. The Job and the helm test pod do have CPU limits.",
    ),
)


@pytest.fixture(scope="session")
def kube_score() -> Path:
    try:
        return build_binaries(SCRIPT)
    except ControlPlaneError as exc:
        pytest.fail(f"kube-score: {exc}", pytrace=False)


def score(binary: Path, *files: Path) -> list[Finding]:
    """Every non-skipped finding graded WARNING or CRITICAL."""
    done = subprocess.run(
        [str(binary), "score", "--kubernetes-version", cluster_version(), "-o", "json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Exit 1 means "found something"; anything else, or no JSON, is kube-score failing.
    assert done.returncode in (0, 1), done.stderr
    findings = []
    for scored in json.loads(done.stdout):
        for check in scored["checks"]:
            if check["skipped"] or check["grade"] > WARNING:
                continue
            for comment in check["comments"] or [{}]:
                summary = " ".join(filter(None, (comment.get("path"), comment.get("summary"))))
                findings.append(
                    Finding(
                        check["check"]["id"],
                        check["grade"],
                        scored["type_meta"]["kind"],
                        scored["object_name"],
                        summary,
                    )
                )
    return findings


def operator_objects(objects: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The Job and NetworkPolicy the operator would create for the example, with the chart's settings."""
    settings = load_settings(operator_env(objects))
    manifest = load_manifest(EXAMPLE)
    ref = RequestRef(name=manifest.name, namespace=namespace, uid="3f0c8a4e-5b1d-4c2a-9e77-1d2b3c4d5e6f")
    current = initial(manifest.spec, manifest.name).current
    job = build_job(ref, manifest.spec, settings, current, resolve_image(manifest.spec, settings))
    return [job, build_network_policy(ref, manifest.spec, settings)]


def write(path: Path, objects: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


def render_all(offline_helm: Helm, values_file: str | None, tmp_path: Path) -> tuple[Path, Path]:
    done = offline_helm(*template_args(*([values_file] if values_file else [])))
    assert done.returncode == 0, done.stderr
    chart = [d for d in yaml.safe_load_all(done.stdout) if d]
    return write(tmp_path / "chart.yaml", chart), write(tmp_path / "job.yaml", operator_objects(chart, "team-a"))


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_no_critical_finding_but_the_ignored_ones(
    kube_score: Path, offline_helm: Helm, tmp_path: Path, values_file: str | None
) -> None:
    findings = score(kube_score, *render_all(offline_helm, values_file, tmp_path))
    critical = [f for f in findings if f.grade == CRITICAL and not any(i.covers(f) for i in IGNORED)]
    assert not critical, "kube-score CRITICAL findings:\n" + "\n".join(map(str, critical))
    unused = [i.check for i in IGNORED if not any(i.covers(f) for f in findings)]
    assert not unused, f"ignore-list entries that match nothing any more (remove them): {unused}"


def test_the_ignore_list_is_short_and_says_why() -> None:
    assert len(IGNORED) <= 3
    for entry in IGNORED:
        assert len(entry.why) > 100, entry.check


def test_kube_score_finds_what_the_chart_fixed(kube_score: Path, offline_helm: Helm, tmp_path: Path) -> None:
    # The control: the same objects without the fixes are reported, so the test above can fail.
    chart_file, job_file = render_all(offline_helm, None, tmp_path)
    chart = [d for d in yaml.safe_load_all(chart_file.read_text()) if d["kind"] != "NetworkPolicy"]
    for obj in chart:
        if obj["kind"] == "Deployment":
            container = obj["spec"]["template"]["spec"]["containers"][0]
            del container["readinessProbe"]
            del container["resources"]["limits"]["ephemeral-storage"]
    jobs = [d for d in yaml.safe_load_all(job_file.read_text()) if d["kind"] == "Job"]
    findings = score(kube_score, write(tmp_path / "bare.yaml", chart), write(tmp_path / "bare-job.yaml", jobs))
    critical = {(f.check, f.kind) for f in findings if f.grade == CRITICAL}
    assert {
        ("pod-networkpolicy", "Deployment"),
        ("pod-networkpolicy", "Pod"),
        ("pod-networkpolicy", "Job"),
        ("pod-probes", "Deployment"),
        ("container-ephemeral-storage-request-and-limit", "Deployment"),
    } <= critical, critical
