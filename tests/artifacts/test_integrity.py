"""#32 (5): what a loaded bundle reads after its digest check is checked against the pinned
manifest's files table (`Bundle.read_verified`), and a file written after a pinned load is caught
(`Bundle.check_unchanged`) before its answer is handed out."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

import walkforge
from walkforge.artifacts.bundle import MANIFEST, Bundle, manifest_digest
from walkforge.errors import WalkforgeError

WEIGHTS = "weights/model.safetensors"
DATA = "walks/decode.onnx.data"


def rewrite_in_place(path: Path, edit) -> None:
    """Change `path`'s bytes without replacing it (same inode, same size), as a stray `r+b` write would."""
    with open(path, "r+b") as fh:
        data = bytearray(fh.read())
        edit(data)
        fh.seek(0)
        fh.write(data)


def test_read_verified_gives_the_listed_bytes_once(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle, digest=manifest_digest(tiny_bundle))
    data = bundle.read_verified(WEIGHTS)
    assert data == (tiny_bundle / WEIGHTS).read_bytes()
    assert hashlib.sha256(data).hexdigest() == bundle.typed.files[WEIGHTS].sha256
    assert load_safetensors(data)  # what a stats reader does with it: safetensors.numpy.load(bytes)
    assert bundle.read_verified(WEIGHTS) is data  # cached: read at the first call only


def test_read_verified_refuses_a_file_changed_after_a_pinned_load(tiny_bundle_copy: Path) -> None:
    """The stats/tokenizer case: edited after `load(..., digest=...)`, before the first request."""
    bundle = Bundle.open(tiny_bundle_copy, digest=manifest_digest(tiny_bundle_copy))
    rewrite_in_place(tiny_bundle_copy / WEIGHTS, lambda d: d.__setitem__(-1, d[-1] ^ 0xFF))
    with pytest.raises(WalkforgeError, match=f"bundle file {WEIGHTS} fails its sha256 check"):
        bundle.read_verified(WEIGHTS)
    (tiny_bundle_copy / WEIGHTS).write_bytes(b"short")  # replaced, another size
    with pytest.raises(WalkforgeError, match="fails its sha256 check"):
        bundle.read_verified(WEIGHTS)
    (tiny_bundle_copy / WEIGHTS).unlink()
    with pytest.raises(WalkforgeError, match=f"bundle file missing: {WEIGHTS}"):
        bundle.read_verified(WEIGHTS)


def test_read_verified_reads_only_listed_files_inside_the_bundle(tiny_bundle_copy: Path) -> None:
    bundle = Bundle.open(tiny_bundle_copy)
    with pytest.raises(WalkforgeError, match="not in the manifest's files table"):
        bundle.read_verified(MANIFEST)
    with pytest.raises(WalkforgeError, match=r"leaves the bundle \(\.\.\)"):
        bundle.read_verified("../secret")


def test_read_verified_of_a_staged_bundle_reads_the_file(tiny_bundle: Path) -> None:
    """The compiler runs a staged bundle before its files table exists: nothing to check against."""
    staged = Bundle(tiny_bundle, json.loads((tiny_bundle / MANIFEST).read_text()))
    assert staged.read_verified(WEIGHTS) == (tiny_bundle / WEIGHTS).read_bytes()


def test_the_digest_covers_the_files_table(tiny_bundle_copy: Path) -> None:
    """A table rewritten to vouch for a changed file is another manifest, so another digest."""
    pinned = manifest_digest(tiny_bundle_copy)
    rewrite_in_place(tiny_bundle_copy / WEIGHTS, lambda d: d.__setitem__(-1, d[-1] ^ 0xFF))
    manifest = json.loads((tiny_bundle_copy / MANIFEST).read_text())
    changed = (tiny_bundle_copy / WEIGHTS).read_bytes()
    manifest["files"][WEIGHTS]["sha256"] = hashlib.sha256(changed).hexdigest()
    (tiny_bundle_copy / MANIFEST).write_text(json.dumps(manifest, indent=2))
    assert Bundle.open(tiny_bundle_copy).read_verified(WEIGHTS)  # unpinned: the new table vouches for it
    with pytest.raises(WalkforgeError, match=f"not the pinned {pinned}"):
        Bundle.open(tiny_bundle_copy, digest=pinned)


def test_an_engine_file_written_after_a_pinned_load_is_caught(tiny_bundle_copy: Path) -> None:
    """onnxruntime maps the external data rather than copying it: a write in place after the load
    reaches the engine, so `check_unchanged` (one stat per file) must see it before an answer goes out."""
    runner = walkforge.load(tiny_bundle_copy, digest=manifest_digest(tiny_bundle_copy), spinning=False)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    runner.run({"latents": latents})
    runner.bundle.check_unchanged()  # nothing changed yet
    os.utime(tiny_bundle_copy / WEIGHTS)  # even a touch: ctime moves and cannot be set back
    with pytest.raises(WalkforgeError, match=f"bundle file {WEIGHTS} changed after bundle .* was loaded"):
        runner.bundle.check_unchanged()


@pytest.mark.parametrize("change", ["in place", "replaced", "removed"])
def test_check_unchanged_names_the_changed_file(tiny_bundle_copy: Path, change: str) -> None:
    bundle = Bundle.open(tiny_bundle_copy, digest=manifest_digest(tiny_bundle_copy))
    path = tiny_bundle_copy / DATA
    if change == "in place":
        rewrite_in_place(path, lambda d: d.__setitem__(0, d[0] ^ 0xFF))
    elif change == "replaced":
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)  # same bytes, a new inode
    else:
        path.unlink()
    expected = "removed" if change == "removed" else "written or replaced"
    with pytest.raises(WalkforgeError, match=f"bundle file {DATA} changed .*{expected}"):
        bundle.check_unchanged()


def test_check_unchanged_without_verify_checks_nothing(tiny_bundle_copy: Path) -> None:
    bundle = Bundle.open(tiny_bundle_copy, verify=False)
    (tiny_bundle_copy / DATA).unlink()
    bundle.check_unchanged()  # nothing was verified, so there is nothing to compare with
    assert not (tiny_bundle_copy / DATA).exists()
