"""What the node agent makes of an image and a pod: references, command lines, users, the runc spec."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import oci

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab" * 32
IMAGE_CONFIG: dict[str, Any] = {
    "User": "65532:65532",
    "Entrypoint": ["/opt/venv/bin/unlearn"],
    "Cmd": ["--help"],
    "Env": ["PATH=/opt/venv/bin:/usr/bin:/bin", "HOME=/tmp"],
    "WorkingDir": "/tmp",
}


def test_references_on_loopback_are_pullable_others_are_not() -> None:
    ref = oci.parse_reference(f"127.0.0.1:5000/unlearn-job@{DIGEST}")
    assert ref == oci.Reference("127.0.0.1:5000", "unlearn-job", None, DIGEST)
    assert ref.name == "127.0.0.1:5000/unlearn-job"
    tagged = oci.parse_reference("localhost:41234/team/unlearning-operator:0.1.0")
    assert tagged == oci.Reference("localhost:41234", "team/unlearning-operator", "0.1.0", None)
    # A public image, a bare name (the venv fast path) and a reference without tag or digest.
    assert oci.parse_reference("ghcr.io/unlearning-operator/unlearn-job:0.1.0") is None
    assert oci.parse_reference("unlearn-job:e2e") is None
    assert oci.parse_reference("127.0.0.1:5000/unlearn-job") is None


def test_command_follows_kubernetes_rules() -> None:
    # Neither: entrypoint + CMD; args only: entrypoint + args; command: command + args, no CMD.
    assert oci.command_line(IMAGE_CONFIG, {}) == ["/opt/venv/bin/unlearn", "--help"]
    assert oci.command_line(IMAGE_CONFIG, {"args": ["run", "x"]}) == ["/opt/venv/bin/unlearn", "run", "x"]
    assert oci.command_line(IMAGE_CONFIG, {"command": ["unlearn"], "args": ["run"]}) == ["unlearn", "run"]
    with pytest.raises(oci.ConfigError, match="no command"):
        oci.command_line({}, {})


def test_user_from_image_then_pod_then_container(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nnonroot:x:65532:65533::/tmp:/sbin/nologin\n")
    (layer / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    assert oci.resolve_user("65532:65532", [layer], {}, {}) == (65532, 65532)
    assert oci.resolve_user("nonroot", [layer], {}, {}) == (65532, 65533)
    assert oci.resolve_user("nonroot:staff", [layer], {}, {}) == (65532, 50)
    assert oci.resolve_user("65532:65532", [layer], {"runAsUser": 1000}, {"runAsGroup": 7}) == (1000, 7)
    assert oci.resolve_user("65532", [layer], {"runAsUser": 1000}, {"runAsUser": 2000}) == (2000, 0)
    with pytest.raises(oci.ConfigError, match="runAsNonRoot"):
        oci.resolve_user("", [layer], {"runAsNonRoot": True}, {})
    with pytest.raises(oci.ConfigError, match="not in the image"):
        oci.resolve_user("nobody", [layer], {}, {})


def spec_for(
    container: dict[str, Any], mounts: list[oci.BindMount], pod_sc: dict[str, Any], netns: str | None = None
) -> dict[str, Any]:
    return oci.runtime_spec(
        image_config=IMAGE_CONFIG,
        layers=[],
        argv=["unlearn", "run"],
        env={"A": "1"},
        pod={"spec": {"securityContext": pod_sc}},
        container=container,
        mounts=mounts,
        rootfs=Path("/bundle/rootfs"),
        hostname="pod-0",
        cgroup="/harness/c1",
        netns=netns,
    )


def test_restricted_container_gets_read_only_root_no_capabilities_and_fs_group() -> None:
    container = {
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    }
    tmp = oci.BindMount(Path("/pods/p/volumes/tmp"), "/tmp", False)
    spec_ = spec_for(container, [tmp], {"runAsNonRoot": True, "fsGroup": 65532, "supplementalGroups": [5]})
    process = spec_["process"]
    assert process["user"] == {"uid": 65532, "gid": 65532, "additionalGids": [5, 65532]}
    assert process["capabilities"]["bounding"] == []
    assert process["noNewPrivileges"] is True
    assert spec_["root"] == {"path": "/bundle/rootfs", "readonly": True}
    assert process["cwd"] == "/tmp"
    # The pod's /tmp volume replaces the private tmpfs; the host's network is kept.
    tmp_mounts = [m for m in spec_["mounts"] if m["destination"] == "/tmp"]
    assert tmp_mounts == [{"destination": "/tmp", "type": "bind", "source": str(tmp.source),
                           "options": ["rbind", "rprivate", "rw"]}]  # fmt: skip
    assert [n for n in spec_["linux"]["namespaces"] if n["type"] == "network"] == []
    assert {"type": "pid"} in spec_["linux"]["namespaces"]


def test_isolated_pod_joins_its_sandbox_network_namespace() -> None:
    # A pod a NetworkPolicy selects: runc joins the sandbox's namespace instead of making one or keeping the host's.
    spec_ = spec_for({}, [], {}, netns="/proc/4242/ns/net")
    network = [n for n in spec_["linux"]["namespaces"] if n["type"] == "network"]
    assert network == [{"type": "network", "path": "/proc/4242/ns/net"}]
    assert {"type": "pid"} in spec_["linux"]["namespaces"]


def test_default_container_is_writable_with_a_private_tmp_and_ordered_mounts() -> None:
    mounts = [
        oci.BindMount(Path("/src/models"), "/volumes/models/sub", True),
        oci.BindMount(Path("/src/volumes"), "/volumes", False),
    ]
    spec_ = spec_for({"workingDir": "/work"}, mounts, {})
    assert spec_["root"]["readonly"] is False
    assert spec_["process"]["cwd"] == "/work"
    assert spec_["process"]["user"] == {"uid": 65532, "gid": 65532}
    # Non-root: the default capabilities bound the process but none is effective.
    assert "CAP_CHOWN" in spec_["process"]["capabilities"]["bounding"]
    assert spec_["process"]["capabilities"]["effective"] == []
    destinations = [m["destination"] for m in spec_["mounts"]]
    assert "/tmp" in destinations
    # Parents before children, so the nested mount lands inside its parent; read-only kept.
    assert destinations.index("/volumes") < destinations.index("/volumes/models/sub")
    nested = next(m for m in spec_["mounts"] if m["destination"] == "/volumes/models/sub")
    assert "ro" in nested["options"]


def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / ".wh.gone").touch()
    (tmp_path / "opaque").mkdir()
    (tmp_path / "opaque" / ".wh..wh..opq").touch()
    oci._whiteouts_to_overlay(tmp_path)
    gone = (tmp_path / "etc" / "gone").lstat()
    assert (gone.st_mode & 0o170000) == 0o020000
    assert gone.st_rdev == 0
    assert not (tmp_path / "etc" / ".wh.gone").exists()
    assert not (tmp_path / "opaque" / ".wh..wh..opq").exists()
    assert os.getxattr(tmp_path / "opaque", "trusted.overlay.opaque") == b"y"
