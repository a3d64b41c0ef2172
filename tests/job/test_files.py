"""The job's file rules (unlearn.files): regular files, confined to their claim, published without replacing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unlearn import files
from unlearn.errors import InvalidInputError
from unlearn.files import OutputFolder, Place, resolve, within
from unlearning_contracts.spec import Location

pytestmark = pytest.mark.unit


@pytest.fixture
def claim(tmp_path: Path) -> Path:
    (tmp_path / "volumes" / "c" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    return tmp_path / "volumes" / "c"


def place(claim: Path, path: str) -> Place:
    return resolve(Location(claim_name="c", path=path), claim.parent, "data.train")


@pytest.mark.parametrize(
    ("path", "root", "inside"),
    [("/a/b", "/a", True), ("/a", "/a", True), ("/ab", "/a", False), ("/", "/a", False), ("/a/../b", "/a", True)],
)
def test_within_compares_whole_components(path: str, root: str, inside: bool) -> None:
    assert within(Path(path), Path(root)) is inside  # callers pass resolved paths; "/a/../b" is never one


def test_a_link_inside_the_claim_is_followed(claim: Path) -> None:
    (claim / "sub" / "data.bin").write_bytes(b"12345")
    (claim / "link.bin").symlink_to("sub/data.bin")
    assert place(claim, "link.bin").read_bytes(100) == b"12345"


def test_a_link_out_of_the_claim_is_refused(claim: Path) -> None:
    (claim / "link.bin").symlink_to(claim.parent.parent / "outside" / "secret")
    with pytest.raises(InvalidInputError, match="a symlink leads outside the claim c"):
        place(claim, "link.bin").read_bytes(100)


@pytest.mark.parametrize("swapped", ["file", "folder"])
def test_a_link_swapped_in_after_the_check_is_not_followed(
    claim: Path, monkeypatch: pytest.MonkeyPatch, swapped: str
) -> None:
    """The check resolves the path; the open walks it again with O_NOFOLLOW, so a later swap is refused."""
    outside = claim.parent.parent / "outside"
    (claim / "sub" / "secret").write_bytes(b"ours")
    target = place(claim, "sub/secret")
    monkeypatch.setattr(files.os.path, "realpath", str)  # as resolved before the swap
    if swapped == "file":
        (claim / "sub" / "secret").unlink()
        (claim / "sub" / "secret").symlink_to(outside / "secret")
    else:
        (claim / "sub" / "secret").unlink()
        (claim / "sub").rmdir()
        (claim / "sub").symlink_to(outside)
    with pytest.raises(InvalidInputError, match="changed into a symlink while being read"):
        target.read_bytes(100)


def test_special_files_and_size_limits(claim: Path) -> None:
    os.mkfifo(claim / "fifo")
    with pytest.raises(InvalidInputError, match=r"not a regular file \(a FIFO\)"):
        place(claim, "fifo").read_bytes(100)
    (claim / "big").write_bytes(b"x" * 101)
    with pytest.raises(InvalidInputError, match="101 bytes, more than the 100 this input can need"):
        place(claim, "big").read_bytes(100)
    zero = Place(field="forget.indicesFile", uri="/dev/zero", path=Path("/dev/zero"))
    with pytest.raises(InvalidInputError, match=r"not a regular file \(a device\)"):
        zero.read_bytes(100)


def test_a_folder_is_walked_for_links_out_and_special_files(claim: Path) -> None:
    images = claim / "imgs" / "cat"
    images.mkdir(parents=True)
    (images / "1.png").write_bytes(b"png")
    (claim / "imgs" / "dog").symlink_to("cat")  # inside: fine
    place(claim, "imgs").check_tree()
    (images / "2.png").symlink_to(claim.parent.parent / "outside" / "secret")
    with pytest.raises(InvalidInputError, match=r"cat/2\.png is a symlink leading outside the claim c"):
        place(claim, "imgs").check_tree()
    (images / "2.png").unlink()
    os.mkfifo(images / "3.png")
    with pytest.raises(InvalidInputError, match=r"cat/3\.png is a FIFO"):
        place(claim, "imgs").check_tree()


def test_publish_never_replaces_and_is_all_or_nothing(claim: Path) -> None:
    out = OutputFolder(resolve(Location(claim_name="c", path="out/v"), claim.parent, "output.location"))
    out.check()
    assert not (claim / "out").exists()  # checking creates nothing
    out.publish([("m-v1.pt2", b"model"), ("m-v1.json", b"{}")])
    assert (claim / "out" / "v" / "m-v1.pt2").read_bytes() == b"model"
    with pytest.raises(InvalidInputError, match=r"m-v1\.pt2 already exists: a published version is never replaced"):
        out.publish([("m-v1.pt2", b"other")])
    (claim / "out" / "v" / "m-v2.json").write_bytes(b"someone else's")
    with pytest.raises(InvalidInputError, match=r"m-v2\.json already exists"):
        out.publish([("m-v2.pt2", b"model 2"), ("m-v2.json", b"{}")])
    names = sorted(p.name for p in (claim / "out" / "v").iterdir())
    assert names == ["m-v1.json", "m-v1.pt2", "m-v2.json"]  # v2's model was taken back; no temporary file
    assert (claim / "out" / "v" / "m-v1.pt2").read_bytes() == b"model"
    out.publish([("m-v3.failed.json", b"1")], replace=True)
    out.publish([("m-v3.failed.json", b"2")], replace=True)
    assert (claim / "out" / "v" / "m-v3.failed.json").read_bytes() == b"2"


def test_a_failed_publish_removes_the_folders_it_created(claim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = OutputFolder(resolve(Location(claim_name="c", path="new/deeper"), claim.parent, "output.location"))
    (claim / "new").mkdir()
    (claim / "new" / "deeper").symlink_to(claim.parent.parent / "outside")
    with pytest.raises(InvalidInputError, match="a symlink leads outside the claim c"):
        out.publish([("m-v1.pt2", b"x")])
    (claim / "new" / "deeper").unlink()
    (claim / "new").rmdir()

    def full(folder: int, name: str, data: bytes, uri: str) -> str:
        raise files.OutputSpaceError(f"output.location {uri}: no space left while writing {name}")

    monkeypatch.setattr(files, "_write_temp", full)
    with pytest.raises(files.OutputSpaceError):
        out.publish([("m-v1.pt2", b"x")])
    assert sorted(p.name for p in claim.iterdir()) == ["sub"]  # new/ and new/deeper/ are gone again
