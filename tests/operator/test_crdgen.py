"""The CRD is generated from the spec models; both written copies must match (drift fails)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from unlearning_contracts.calibration import MAX_CALIBRATION_NAME_LENGTH
from unlearning_contracts.record import columns
from unlearning_contracts.spec import MAX_REQUEST_NAME_LENGTH
from unlearning_operator import crdgen

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("relative", "text"), list(crdgen.expected().items()), ids=str)
def test_written_copy_matches_the_models(relative: Path, text: str) -> None:
    path = ROOT / relative
    assert path.exists(), f"{relative} missing: run `make crds`"
    assert path.read_text() == text, f"{relative} drifted from the models: run `make crds`"


def test_check_flag_detects_drift(tmp_path: Path) -> None:
    (tmp_path / crdgen.RECORD_DOC).parent.mkdir(parents=True)
    (tmp_path / crdgen.RECORD_DOC).write_text(f"# Record\n{crdgen.NUMBERS_START}\nold\n{crdgen.NUMBERS_END}\nmore\n")
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 0
    assert (tmp_path / crdgen.RECORD_DOC).read_text().endswith(f"{crdgen.NUMBERS_END}\nmore\n")
    target = tmp_path / crdgen.REQUEST_CRD.outputs[1]
    target.write_text(target.read_text().replace("maxLength: 63", "maxLength: 64", 1))
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 1


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if "type" in node:
            found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found.extend(walk(value, f"{path}.{key}"))
        if isinstance(node.get("items"), dict) and "properties" in node["items"]:
            found.extend(walk(node["items"], f"{path}[]"))
    return found


def schema() -> dict[str, Any]:
    crd = crdgen.build_crd(crdgen.REQUEST_CRD)
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_structural_and_described() -> None:
    text = crdgen.render()
    for leftover in ("$ref", "anyOf", "allOf", "oneOf", "title:", "$defs", "&id"):
        assert leftover not in text
    for path, node in walk(schema()["properties"]["spec"], "spec"):
        assert node.get("description"), f"{path} has no description"
        assert node["type"] in {"object", "array", "string", "integer", "number", "boolean"}
        if node["type"] == "object":
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path


def test_only_architecture_kwargs_is_free_form() -> None:
    text = yaml.safe_dump(schema()["properties"]["spec"])
    assert text.count("x-kubernetes-preserve-unknown-fields") == 1
    kwargs = schema()["properties"]["spec"]["properties"]["model"]["properties"]["architecture"]["properties"]["kwargs"]
    assert kwargs["x-kubernetes-preserve-unknown-fields"] is True


def test_defaults_enums_bounds_and_nullable_gates() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    assert spec["method"]["properties"]["name"]["default"] == "auto"
    assert "scrub" in spec["method"]["properties"]["name"]["enum"]
    assert spec["method"]["default"] == {}
    lr = spec["method"]["properties"]["forget"]["properties"]["lr"]
    assert (lr["minimum"], lr["exclusiveMinimum"], lr["maximum"]) == (0.0, True, 1.0)
    share = spec["forget"]["properties"]["maxShare"]
    assert (share["maximum"], share["default"]) == (0.5, 0.2)
    mia = spec["gates"]["properties"]["maxMiaClassifierAccuracy"]
    assert (mia["default"], mia["nullable"]) == (0.6, True)
    assert "default" not in spec["gates"]["properties"]["maxMiaAuc"]  # off by default: wrong for mislabelled rows
    assert "nullable" not in spec["gates"]["properties"]["maxForgetAccuracy"]
    assert spec["model"]["properties"]["source"]["properties"]["claimName"]["pattern"].startswith("^[a-z0-9]")
    assert set(schema()["properties"]["spec"]["required"]) == {"model", "forget", "output"}


def test_cel_rules_present() -> None:
    root = schema()
    rules = [r["rule"] for r in root["x-kubernetes-validations"]]
    assert f"self.metadata.name.size() <= {MAX_REQUEST_NAME_LENGTH}" in rules
    assert any("oldSelf.spec" in r and "jobName" in r for r in rules)
    spec = root["properties"]["spec"]["properties"]
    assert "has(self.indices) != has(self.indicesFile)" in [
        r["rule"] for r in spec["forget"]["x-kubernetes-validations"]
    ]
    arch = spec["model"]["properties"]["architecture"]
    assert arch["x-kubernetes-validations"][0]["rule"] == "has(self.torchvision) != has(self.factory)"
    assert "state-dict" in spec["model"]["x-kubernetes-validations"][0]["rule"]


def test_names_status_and_printer_columns() -> None:
    crd = crdgen.build_crd(crdgen.REQUEST_CRD)
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "unlearningrequests.unlearn.dev"
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "UnlearningRequest",
        "unlearningrequests",
        ["ulr"],
        ["unlearning"],
    )
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    numbers = version["additionalPrinterColumns"][3:-3]
    assert names[:3] + names[-3:] == ["Phase", "Model", "Method", "Verdict", "Calibrated", "Age"]
    # One column per summary number that names one, in declaration order (today these three).
    assert [c["name"] for c in numbers] == [shown.column for _, _, shown, _ in columns()]
    assert {"Forget Acc", "Test Acc", "MIA AUC"} <= set(names)
    # The numbers are text at a fixed precision (status.display), so `kubectl get` prints 95.0 beside 96.9.
    assert {c["type"] for c in numbers} == {"string"}
    display = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["display"]["properties"]
    assert [c["jsonPath"].removeprefix(".status.display.") for c in numbers] == list(display)
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_no_plain_scalar_reads_as_a_boolean_to_the_api_server() -> None:
    """The API server parses YAML 1.1: a bare `n` (the intervals' row count) is `false` there, and the CRD is refused.

    PyYAML reads the same text as the string "n", so only a check of the emitted scalars catches it.
    """
    text = crdgen.render()
    plain = [e.value for e in yaml.parse(text) if isinstance(e, yaml.ScalarEvent) and e.style is None]
    assert "n" not in plain
    assert not [v for v in plain if v in crdgen.YAML11_BOOLEANS and v not in ("true", "false")]
    # The calibration CRD goes through the same dumper.
    calibration = crdgen.render(crdgen.CALIBRATION_CRD)
    plain = [e.value for e in yaml.parse(calibration) if isinstance(e, yaml.ScalarEvent) and e.style is None]
    assert not [v for v in plain if v in crdgen.YAML11_BOOLEANS and v not in ("true", "false")]
    assert yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"
    ]["pre"]["properties"]["intervals"]["additionalProperties"]["required"] == ["low", "high", "n"]


def calibration_schema() -> dict[str, Any]:
    crd = crdgen.build_crd(crdgen.CALIBRATION_CRD)
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_calibration_crd_is_structural_and_described() -> None:
    text = crdgen.render(crdgen.CALIBRATION_CRD)
    for leftover in ("$ref", "anyOf", "allOf", "oneOf", "title:", "$defs", "&id"):
        assert leftover not in text
    root = calibration_schema()
    for part in ("spec", "status"):
        for path, node in walk(root["properties"][part], part):
            assert node.get("description"), f"{path} has no description"


def test_calibration_names_columns_and_rules() -> None:
    crd = crdgen.build_crd(crdgen.CALIBRATION_CRD)
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "unlearningcalibrations.unlearn.dev"
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "UnlearningCalibration",
        "unlearningcalibrations",
        ["ulc"],
        ["unlearning"],
    )
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Model", "Folds", "Agreement", "Cost", "Age"]
    display = calibration_schema()["properties"]["status"]["properties"]["display"]["properties"]
    assert {path.removeprefix(".status.display.") for path in columns.values() if "display" in path} == set(display)
    root = calibration_schema()
    rules = [r["rule"] for r in root["x-kubernetes-validations"]]
    assert f"self.metadata.name.size() <= {MAX_CALIBRATION_NAME_LENGTH}" in rules
    assert any("oldSelf.spec" in r and "jobName" in r for r in rules)
    spec = root["properties"]["spec"]
    assert set(spec["required"]) == {"model", "recipe", "output"}
    folds = spec["properties"]["folds"]
    assert (folds["minimum"], folds["maximum"], folds["default"]) == (2, 32, 10)
    recipe = spec["properties"]["recipe"]["properties"]
    assert recipe["optimizer"]["properties"]["name"]["enum"] == ["adam", "adamw", "sgd"]
    assert recipe["augmentations"]["items"]["enum"] == ["random-crop", "horizontal-flip"]
    assert "stepEpochs" in recipe["schedule"]["x-kubernetes-validations"][0]["rule"]
    # The model, data and paths are checked as in a request.
    assert (
        spec["properties"]["model"]["x-kubernetes-validations"]
        == (schema()["properties"]["spec"]["properties"]["model"]["x-kubernetes-validations"])
    )
    location = spec["properties"]["output"]["properties"]["location"]
    assert (
        location["x-kubernetes-validations"][0]["message"] == "path must not contain '..' (it could escape the volume)"
    )


def test_request_crd_has_the_calibration_use_and_a_calibrated_column() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    use = spec["calibration"]
    assert use["default"] == {}
    assert use["properties"]["policy"]["enum"] == ["IfAvailable", "Required", "Disabled"]
    assert use["properties"]["policy"]["default"] == "IfAvailable"
    status = schema()["properties"]["status"]["properties"]["calibration"]["properties"]
    assert set(status) == {"name", "uri", "sha256", "calibrated", "note"}
