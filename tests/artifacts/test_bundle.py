"""Bundle v1: manifest writing, the verifying reader (hashes, paths inside, digest); the staged
writer is tested in test_staged_write.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import walkforge
from walkforge.artifacts.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Bundle,
    check_digest,
    manifest_digest,
    read_manifest,
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


# -- paths stay inside -------------------------------------------------------------------


def rehashed(root: Path, edit=None) -> Path:
    """Rewrite the manifest with a files table of what `root` holds now, then apply
    `edit(manifest)`, as whoever edits a bundle can: its hashes then vouch for the edit."""
    manifest = json.loads((root / MANIFEST).read_text())
    manifest = write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})
    if edit is not None:
        edit(manifest)
        (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_walk_outside_the_bundle_is_refused(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    """The issue's edit: a walk's ONNX and the files table point into a neighbouring bundle."""
    other = Path(shutil.copytree(tiny_bundle_copy, tmp_path / "other-bundle"))
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")

    def edit(m: dict) -> None:
        m["walks"]["decode"]["onnx"] = m["targets"]["cpu"]["walks"]["decode"] = f"../{other.name}/{ONNX}"
        m["files"]["../secret.txt"] = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(),
                                       "size": secret.stat().st_size}

    rehashed(tiny_bundle_copy, edit)
    message = refused(tiny_bundle_copy)
    assert message.endswith("files['../secret.txt'] = '../secret.txt' leaves the bundle (..); refused")
    with pytest.raises(WalkforgeError, match="files\\['../secret.txt'\\]"):
        walkforge.load(tiny_bundle_copy)


@pytest.mark.parametrize(("entry", "value", "problem"), [
    ("walks.decode.onnx", "../x.onnx", "leaves the bundle (..)"),
    ("targets.cpu.walks.decode", "/etc/passwd", "is absolute"),
    ("weights.file", "weights/../../w.safetensors", "leaves the bundle (..)"),
    ("kernels[0].ptx_file", "kernels/./a.ptx", "is not a normalised relative path"),
    ("calibration.scales_file", "", "is not a path"),
    ("tokenizer.file", "C:\\tokenizer.json", "is not a POSIX relative path"),
    ("processors[0].file", 7, "is not a path"),
    ("targets.trt-sm90.timing_cache", "../timing.cache", "leaves the bundle (..)"),
    ("targets.trt-sm90.build_log", "/tmp/build.log", "is absolute"),
])
def test_every_manifest_path_is_checked(tiny_bundle_copy: Path, entry: str, value: object,
                                        problem: str) -> None:
    def edit(m: dict) -> None:
        m["kernels"] = [{"kernel": "k", "ptx_file": "kernels/a.ptx"}]
        m["calibration"] = {"scales_file": "calib/s.safetensors"}
        m["tokenizer"] = {"file": "tokenizer/t.json"}
        m["processors"] = [{"file": "processors/p.json"}]
        m["targets"]["trt-sm90"] = {"walks": {}, "timing_cache": "t/timing.cache", "build_log": "t/b.log"}
        node, *keys = entry.replace("[0]", ".0").split(".")
        holder = m[node]
        for key in keys[:-1]:
            holder = holder[int(key)] if key.isdigit() else holder[key]
        holder[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value

    message = refused(rehashed(tiny_bundle_copy, edit))
    assert message == f"{tiny_bundle_copy / MANIFEST}: {entry} = {value!r} {problem}; refused"


def test_symlink_out_of_the_bundle_is_refused(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    data = tiny_bundle_copy / (ONNX + ".data")
    outside = tmp_path / "decode.onnx.data"
    shutil.move(data, outside)
    data.symlink_to(outside)  # same bytes, so the size and sha256 in the manifest still match
    message = refused(tiny_bundle_copy)
    assert f"files['{ONNX}.data']" in message and f"resolves outside the bundle (to {outside})" in message


def test_symlink_inside_the_bundle_is_followed(tiny_bundle_copy: Path) -> None:
    weights = tiny_bundle_copy / WEIGHTS
    shutil.move(weights, tiny_bundle_copy / "weights.bin")
    weights.symlink_to("../weights.bin")
    message = refused(tiny_bundle_copy)  # the moved file is not listed ...
    assert message.startswith("bundle file weights.bin is not in the manifest's files table")
    assert Bundle.open(rehashed(tiny_bundle_copy)).manifest["files"]["weights.bin"]  # ... once listed, fine


@pytest.mark.parametrize("extra", ["notes.txt", "walks/decode-v2.onnx"])
def test_unlisted_file_is_refused(tiny_bundle_copy: Path, extra: str) -> None:
    (tiny_bundle_copy / extra).write_bytes(b"x")
    want = f"bundle file {extra} is not in the manifest's files table (1 unlisted); refused"
    assert refused(tiny_bundle_copy) == want


def test_path_outside_asked_of_an_open_bundle(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    assert bundle.path(ONNX) == tiny_bundle / ONNX
    with pytest.raises(WalkforgeError, match="path = '../x' leaves the bundle"):
        bundle.path("../x")


@pytest.mark.parametrize("location", ["../../outside.data", "ABSOLUTE"])
def test_onnx_external_data_outside_is_refused(tiny_bundle_copy: Path, tmp_path: Path, location: str) -> None:
    """The ONNX names its external data itself; onnxruntime refuses a location outside the
    model's folder, and walkforge reports it in one line."""
    import onnx

    outside = tmp_path / "outside.data"
    shutil.copyfile(tiny_bundle_copy / (ONNX + ".data"), outside)
    location = str(outside) if location == "ABSOLUTE" else location
    model = onnx.load(str(tiny_bundle_copy / ONNX), load_external_data=False)
    for tensor in model.graph.initializer:
        for item in tensor.external_data:
            if item.key == "location":
                item.value = location
    onnx.save(model, str(tiny_bundle_copy / ONNX))
    rehashed(tiny_bundle_copy)
    with pytest.raises(WalkforgeError) as info:
        walkforge.load(tiny_bundle_copy)
    assert str(info.value).startswith("walk 'decode': onnxruntime cannot load decode.onnx:")
    assert "\n" not in str(info.value)


# -- digest ------------------------------------------------------------------------------


def test_digest_is_the_manifest_sha256(tiny_bundle: Path) -> None:
    want = hashlib.sha256((tiny_bundle / MANIFEST).read_bytes()).hexdigest()
    assert Bundle.open(tiny_bundle).digest == manifest_digest(tiny_bundle) == want
    for pinned in (want, want.upper(), f"sha256:{want}"):
        assert Bundle.open(tiny_bundle, digest=pinned).digest == want
        assert walkforge.load(tiny_bundle, digest=pinned).decode  # the front, loaded


def test_other_digest_is_refused_naming_both(tiny_bundle_copy: Path) -> None:
    tested = manifest_digest(tiny_bundle_copy)
    edit_manifest(tiny_bundle_copy, created="2030-01-01T00:00:00+00:00")  # any edit: another bundle
    now = manifest_digest(tiny_bundle_copy)
    want = f"bundle {tiny_bundle_copy} has digest {now}, not the pinned {tested}; refused"
    for opener in (Bundle.open, walkforge.load):
        with pytest.raises(WalkforgeError) as info:
            opener(tiny_bundle_copy, digest=tested)
        assert str(info.value) == want
    with pytest.raises(WalkforgeError, match="--digest must be the 64 hex digits"):
        check_digest(Bundle.open(tiny_bundle_copy), "abc")


# -- staged writer ----------------------------------------------------------------------
