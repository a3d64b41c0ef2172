"""Reading a manifest a tenant wrote: bounded YAML, strict types, byte bounds (unlearning_contracts.spec, safe_yaml)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from unlearning_contracts.safe_yaml import MAX_ALIASES, MAX_MANIFEST_BYTES, MAX_NODES
from unlearning_contracts.spec import MAX_ERROR_BYTES, SpecError, load_manifest, parse_manifest

pytestmark = pytest.mark.unit

GOOD = """\
apiVersion: unlearn.dev/v1alpha1
kind: UnlearningRequest
metadata:
  name: digits-gdpr
spec:
  model:
    name: digits-mlp
    source: {path: /models/digits-mlp.pt2}
  forget:
    indices: [3, 17]
  output:
    location: {path: /out}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "request.yaml"
    path.write_text(text)
    return path


def refused(path: Path) -> str:
    with pytest.raises(SpecError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert "\n" not in message
    assert len(message.encode()) <= MAX_ERROR_BYTES + 200
    return message


def test_a_plain_manifest_loads(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, GOOD))
    assert manifest.spec.forget.indices == [3, 17]
    assert (manifest.name, manifest.namespace) == ("digits-gdpr", "default")


def test_a_few_anchors_and_a_merge_key_are_fine(tmp_path: Path) -> None:
    text = GOOD.replace("  output:\n    location: {path: /out}\n", "  output:\n    location: &out {path: /out}\n")
    text += "status: {seen: *out}\n"
    text = text.replace(
        "    source: {path: /models/digits-mlp.pt2}", "    source:\n      <<: {path: /models/digits-mlp.pt2}"
    )
    manifest = load_manifest(write(tmp_path, text))
    assert manifest.spec.model.source.path == "/models/digits-mlp.pt2"


def _laughs(levels: int, fan: int) -> str:
    """A flow mapping of anchors, each level ``fan`` aliases of the one before (the billion laughs)."""
    items = ['l0: &a0 "lol"']
    for level in range(1, levels + 1):
        items.append(f"l{level}: &a{level} [{', '.join(f'*a{level - 1}' for _ in range(fan))}]")
    return "{" + ", ".join(items) + "}"


def test_alias_bomb_in_metadata_name_is_refused_before_validation(tmp_path: Path) -> None:
    """The message comes from the node-graph check: nothing was expanded, constructed or validated."""
    # nine levels of ten: 91 aliases, 10^9 values once expanded
    text = GOOD.replace("  name: digits-gdpr\n", f"  annotations: {_laughs(9, 10)}\n  name: *a9\n")
    assert f"more than {MAX_ALIASES} aliases" in refused(write(tmp_path, text))


def test_alias_bomb_in_architecture_kwargs_is_refused_before_validation(tmp_path: Path) -> None:
    # sixteen levels of two: only 32 aliases, but 2^17 values once expanded
    text = GOOD.replace(
        "    source: {path: /models/digits-mlp.pt2}\n",
        "    format: state-dict\n    source: {path: /models/m.pt}\n"
        f"    architecture: {{torchvision: resnet18, kwargs: {_laughs(16, 2)}}}\n",
    )
    assert f"expands to more than {MAX_NODES} values" in refused(write(tmp_path, text))


def test_an_alias_to_itself_is_refused(tmp_path: Path) -> None:
    text = GOOD + "status: &loop {again: *loop}\n"
    assert "an alias refers to itself" in refused(write(tmp_path, text))


def test_a_key_given_twice_is_refused_with_its_path_and_lines(tmp_path: Path) -> None:
    text = GOOD.replace("    indices: [3, 17]\n", "    indices: [3, 17]\n    indices: [3]\n")
    message = refused(write(tmp_path, text))
    assert message.endswith("request.yaml: spec.forget.indices is given twice (lines 10 and 11): keep one")


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path: Path) -> None:
    message = refused(write(tmp_path, GOOD.replace("  forget:\n", "  forget: [\n")))
    assert "not valid YAML at line" in message
    assert "column" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "---\n" + GOOD, "more than one YAML document"),
        ("", "empty: expected one UnlearningRequest document"),
        ("- a\n- b\n", "manifest: expected a YAML mapping"),
        (GOOD + "status: !!python/object:os.system {}\n", "not valid YAML at line 13"),
        (GOOD + "status: {n: " + "9" * 5000 + "}\n", "not valid YAML"),
        ("a: \x07\n", "not valid YAML"),
    ],
)
def test_other_yaml_problems_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in refused(write(tmp_path, text))


def test_not_a_regular_file_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "request.yaml"
    os.mkfifo(fifo)
    assert "not a regular file (a FIFO)" in refused(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    assert "not a regular file (a device)" in refused(zero)
    assert "not a regular file (a folder)" in refused(tmp_path)


def test_size_and_encoding(tmp_path: Path) -> None:
    big = write(tmp_path, GOOD + "status: {pad: '" + "x" * MAX_MANIFEST_BYTES + "'}\n")
    assert f"over the {MAX_MANIFEST_BYTES}-byte limit" in refused(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(GOOD.replace("digits-gdpr", "d\xe9").encode("latin-1"))
    assert "not UTF-8 text" in refused(latin)
    assert "cannot read the manifest (No such file or directory)" in refused(tmp_path / "absent.yaml")


def manifest(**spec: Any) -> dict[str, Any]:
    raw = yaml.safe_load(GOOD)
    for dotted, value in spec.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return dict(raw)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # no coercion
        (
            {"spec__forget__indices": [True, 17]},
            "manifest.spec.forget.indices.0: Input should be a valid integer (got true)",
        ),
        (
            {"spec__forget__indices": [3.0, "17"]},
            "manifest.spec.forget.indices.0: Input should be a valid integer (got 3.0)",
        ),
        ({"spec__method__seed": "1"}, 'manifest.spec.method.seed: Input should be a valid integer (got "1")'),
        (
            {"spec__method__mixedPrecision": "yes"},
            "manifest.spec.method.mixedPrecision: Input should be a valid boolean",
        ),
        # unknown fields at every level
        ({"data": {"source": "npz"}}, "manifest.data: unknown top-level field: the request's fields go under spec"),
        ({"spec__forget__indexes": [1]}, "manifest.spec.forget.indexes: unknown field: check its spelling"),
        # no gate at all
        (
            {
                "spec__gates": {
                    "maxTestAccuracyDrop": None,
                    "maxMiaAuc": None,
                    "maxMiaClassifierAccuracy": None,
                    "maxEstimatedGap": None,
                    "minMembershipPValue": None,
                    "maxClassReadability": None,
                }
            },
            "manifest.spec.gates: every gate is null, so the verdict would be Passed whatever the audit measured",
        ),
        # names and bytes
        ({"metadata__name": "x" * 1_000_000}, "manifest.metadata.name: String should have at most 253 characters"),
        ({"metadata__name": "Digits_GDPR"}, "manifest.metadata.name: String should match pattern"),
        ({"spec__requestId": "é" * 100}, "manifest.spec.requestId: is 200 bytes in UTF-8, over the limit of 128"),
        (
            {"spec__output__location": {"path": "/out/" + "日本" * 200}},
            "is 1205 bytes in UTF-8, over the limit of 1024",
        ),
        (
            {"spec__output__location": {"path": "/out/" + "a" * 256}},
            "a file or folder name of 256 bytes, over the file-system limit of 255",
        ),
        ({"spec__output__location": {"path": "/out/a\nb"}}, "must not contain control characters (found U+000A)"),
        ({"spec__output__location": {"path": "/out/a\x00b"}}, "must not contain control characters (found U+0000)"),
        (
            {"spec__job__image": "r/" + "é" * 300},
            "manifest.spec.job.image: is 602 bytes in UTF-8, over the limit of 512",
        ),
    ],
)
def test_strict_and_bounded(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_manifest(manifest(**changes))
    assert expected in str(caught.value)
    assert len(str(caught.value).encode()) <= MAX_ERROR_BYTES


def test_what_is_harmless_stays_accepted() -> None:
    ok = parse_manifest(
        manifest(
            spec__method={"forget": {"lr": 1}},  # a whole number is a valid float
            status={"phase": "Succeeded"},  # as read back with kubectl get -o yaml
            metadata={"name": "a.b-c", "namespace": "team-a", "labels": {"x": "y"}, "uid": "0f1e2d3c-aaaa"},
        )
    )
    assert ok.spec.method.forget.lr == 1.0
    assert ok.metadata.uid == "0f1e2d3c-aaaa"


def test_many_problems_make_one_bounded_line() -> None:
    raw = manifest(spec__forget={f"k{'x' * 300}{i}": i for i in range(200)})
    with pytest.raises(SpecError) as caught:
        parse_manifest(raw)
    message = str(caught.value)
    assert len(message.encode()) <= MAX_ERROR_BYTES
    assert "more problem(s)" in message
