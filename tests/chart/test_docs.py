"""The operating guide keeps up with the contracts it explains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from unlearning_contracts.record import Attempt, AuditMetrics, CompactRecord, ResultRecord
from unlearning_operator import calibration_status as cal
from unlearning_operator.calibration_status import CalibrationStatus
from unlearning_operator.settings import ENV_VARS
from unlearning_operator.status import RequestStatus

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GUIDE = ("install.md", "upgrade.md", "uninstall.md", "namespaced.md", "monitoring.md", "troubleshooting.md")

pytestmark = pytest.mark.unit


def aliases(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


@pytest.mark.parametrize("model", [ResultRecord, CompactRecord, AuditMetrics, Attempt])
def test_audit_record_doc_explains_every_field(model: type[BaseModel]) -> None:
    text = (DOCS / "audit-record.md").read_text()
    missing = sorted(a for a in aliases(model) if f"`{a}`" not in text)
    assert not missing, f"docs/audit-record.md does not explain {model.__name__} fields {missing}"


def test_operator_doc_explains_every_status_field() -> None:
    text = (DOCS / "operator.md").read_text()
    section = text[text.index("## Status reference") : text.index("### Conditions")]
    missing = sorted(a for a in aliases(RequestStatus) if f"`{a}`" not in section)
    assert not missing, f"docs/operator.md's status reference does not explain {missing}"


def test_operator_doc_explains_the_calibration_status_and_its_reasons() -> None:
    text = (DOCS / "operator.md").read_text()
    section = text[text.index("## Calibrations (UnlearningCalibration)") : text.index("## Metrics")]
    status = section[section.index("### Status reference") : section.index("### Calibration conditions")]
    missing = sorted(a for a in aliases(CalibrationStatus) if f"`{a}`" not in status)
    assert not missing, f"docs/operator.md's calibration status reference does not explain {missing}"
    words = sorted(w for w in (*cal.PHASES, *cal.CONDITION_TYPES, *cal.REASONS) if f"`{w}`" not in section)
    assert not words, f"docs/operator.md's calibration section does not name {words}"


def test_operator_doc_lists_exactly_the_settings() -> None:
    rows = re.findall(r"^\| `(UNLEARNING_\w+)` \|", (DOCS / "operator.md").read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(ENV_VARS), "docs/operator.md's settings table and settings.ENV_VARS differ"


def test_upgrade_doc_gives_the_crd_command() -> None:
    assert "kubectl apply --server-side -f charts/unlearning-operator/crds/" in (DOCS / "upgrade.md").read_text()


@pytest.mark.parametrize("doc", GUIDE)
def test_relative_links_resolve(doc: str) -> None:
    text = (DOCS / doc).read_text()
    for target in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (DOCS / target).exists(), f"docs/{doc} links to {target}, which does not exist"


def test_examples_named_in_the_guide_exist() -> None:
    for doc in GUIDE:
        for path in re.findall(r"examples/[\w/.-]+\.yaml", (DOCS / doc).read_text()):
            assert (ROOT / path).exists(), f"docs/{doc} names {path}, which does not exist"
