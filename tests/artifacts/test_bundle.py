"""Bundle v1: manifest writing, the verifying reader, and the atomic staged writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from walkforge.artifacts.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Bundle,
    read_manifest,
    staged_bundle,
    write_manifest,
)
from walkforge.errors import WalkforgeError

ONNX = "walks/decode.onnx"
WEIGHTS = "weights/model.safetensors"


def refused(root: Path) -> str:
    """Bundle.open(root) must fail with a one-line WalkforgeError; return its message."""
    with pytest.raises(WalkforgeError) as info:
        Bundle.open(root)
    message = str(info.value)
    assert "\n" not in message
    return message


def edit_manifest(root: Path, **changes: object) -> None:
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# -- manifest ---------------------------------------------------------------------------


def test_write_manifest_records_format_and_files(tmp_path: Path) -> None:
    (tmp_path / "walks").mkdir()
    (tmp_path / "walks" / "a.onnx").write_bytes(b"onnx bytes")
    (tmp_path / "w.bin").write_bytes(b"\x00" * 7)
    manifest = write_manifest(tmp_path, {"recipe": "vae"})
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == manifest
    assert (manifest["format"], manifest["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert manifest["recipe"] == "vae"
    assert manifest["files"] == {
        "w.bin": {"sha256": hashlib.sha256(b"\x00" * 7).hexdigest(), "size": 7},
        "walks/a.onnx": {"sha256": hashlib.sha256(b"onnx bytes").hexdigest(), "size": 10},
    }
    assert not (tmp_path / (MANIFEST + ".tmp")).exists()


def test_compiled_bundle_manifest_matches_files(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    m = bundle.manifest
    assert (m["format"], m["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert set(m["files"]) == {ONNX, ONNX + ".data", WEIGHTS}
    for rel, entry in m["files"].items():
        data = (tiny_bundle / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert bundle.recipe == "vae"
    assert bundle.walk("decode")["onnx"] == ONNX
    assert bundle.path(ONNX) == tiny_bundle / ONNX
    with pytest.raises(WalkforgeError, match="no walk 'denoise'; walks: decode"):
        bundle.walk("denoise")


# -- reader refusals --------------------------------------------------------------------


def test_tampered_byte_fails_sha256(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / ONNX
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    path.write_bytes(bytes(data))
    message = refused(tiny_bundle_copy)
    assert ONNX in message and "sha256" in message
    assert Bundle.open(tiny_bundle_copy, verify=False).recipe == "vae"  # verify=False skips hashing


def test_truncated_weights_fail_size(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / WEIGHTS
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    message = refused(tiny_bundle_copy)
    assert WEIGHTS in message
    assert f"{size - 100} bytes" in message and f"manifest says {size}" in message


def test_missing_file(tiny_bundle_copy: Path) -> None:
    (tiny_bundle_copy / ONNX).unlink()
    message = refused(tiny_bundle_copy)
    assert "missing" in message and ONNX in message


def test_foreign_manifest(tiny_bundle_copy: Path) -> None:
    edit_manifest(tiny_bundle_copy, format="someone-elses-bundle")
    message = refused(tiny_bundle_copy)
    assert MANIFEST in message and "foreign" in message


def test_manifest_that_is_not_an_object(tiny_bundle_copy: Path) -> None:
    (tiny_bundle_copy / MANIFEST).write_text("[1, 2, 3]")
    assert "foreign" in refused(tiny_bundle_copy)


def test_future_format_version(tiny_bundle_copy: Path) -> None:
    edit_manifest(tiny_bundle_copy, format_version=FORMAT_VERSION + 1)
    message = refused(tiny_bundle_copy)
    assert MANIFEST in message
    assert f"version {FORMAT_VERSION + 1}" in message and f"reads version {FORMAT_VERSION}" in message


def test_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "walks").mkdir()
    message = refused(tmp_path)
    assert str(tmp_path) in message and f"no {MANIFEST}" in message


def test_not_a_directory_and_not_found(tmp_path: Path) -> None:
    file = tmp_path / "bundle.tar"
    file.write_text("x")
    assert "not a bundle directory" in refused(file)
    assert "not found" in refused(tmp_path / "nowhere")


def test_corrupt_json(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / MANIFEST
    path.write_text(path.read_text()[:-40])
    message = refused(tiny_bundle_copy)
    assert MANIFEST in message and "corrupt manifest" in message


def test_manifest_without_files_table(tiny_bundle_copy: Path) -> None:
    # Without its files table a manifest vouches for nothing: it must not open as verified.
    manifest = json.loads((tiny_bundle_copy / MANIFEST).read_text())
    del manifest["files"]
    (tiny_bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    (tiny_bundle_copy / ONNX).write_bytes(b"garbage")
    message = refused(tiny_bundle_copy)
    assert "files" in message


def test_read_manifest_does_not_hash(tiny_bundle_copy: Path) -> None:
    (tiny_bundle_copy / WEIGHTS).write_bytes(b"")
    assert read_manifest(tiny_bundle_copy)["recipe"] == "vae"


# -- staged writer ----------------------------------------------------------------------


def test_staged_bundle_success_moves_into_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_bundle(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.partial-")
        (stage / "a.txt").write_text("new")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "new"
    assert leftovers(tmp_path, "out") == []


def test_staged_bundle_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), staged_bundle(out) as stage:
        (stage / "half.onnx").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


def test_existing_output_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(WalkforgeError, match="already exists.*--force"), staged_bundle(out):
        pytest.fail("must not start staging over an existing output")
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(tmp_path, "out") == []


def test_existing_output_replaced_with_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_bundle(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path, "out") == []


def test_failed_forced_write_keeps_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_bundle(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("fail")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path, "out") == []


def test_unwritable_parent(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    out = blocker / "sub" / "bundle"
    with pytest.raises(WalkforgeError) as info, staged_bundle(out):
        pytest.fail("must not yield")
    message = str(info.value)
    assert "cannot write output" in message and str(out) in message
    assert "\n" not in message
    assert blocker.read_text() == "a regular file"
