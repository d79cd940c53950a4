"""Bundle stamps: a file hashed once is trusted while its size, times and inode are unchanged;
anything that changes them (a write, truncation, touch, replacement, a copy elsewhere) is hashed
again, and `integrity` hashes everything. Hashing is counted through `sha256_file`, never timed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from walkforge.artifacts import bundle as bundle_mod
from walkforge.artifacts import stamps as stamps_mod
from walkforge.artifacts.bundle import MANIFEST, Bundle
from walkforge.artifacts.stamps import CACHE_ENV, RACY_NS, stamp_path
from walkforge.errors import WalkforgeError

WEIGHTS = "weights/model.safetensors"
TICK_S = 0.05  # longer than any kernel timestamp tick (HZ >= 100): a later change gets a new ctime


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stamps go to a private cache, never the user's."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files hashed, in order."""
    seen: list[str] = []
    real = bundle_mod.sha256_file

    def counting(path: Path, *args, **kwargs) -> str:
        seen.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(bundle_mod, "sha256_file", counting)
    return seen


def age(root: Path, seconds: float = 3600) -> None:
    """Backdate every file's mtime (as a bundle compiled an hour ago), past the racy window."""
    then = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))
    time.sleep(TICK_S)


def listed(root: Path) -> int:
    return len(json.loads((root / MANIFEST).read_text())["files"])


def test_a_stamped_bundle_opens_without_hashing(tiny_bundle_copy: Path, hashes: list[str]) -> None:
    age(tiny_bundle_copy)
    first = Bundle.open(tiny_bundle_copy)
    assert first.hashed == len(hashes) == listed(tiny_bundle_copy) > 0
    hashes.clear()
    again = Bundle.open(tiny_bundle_copy)
    assert again.hashed == 0 and hashes == []
    assert stamp_path(tiny_bundle_copy, again.digest).is_file()


def test_integrity_hashes_every_file_again(tiny_bundle_copy: Path, hashes: list[str]) -> None:
    age(tiny_bundle_copy)
    Bundle.open(tiny_bundle_copy)
    hashes.clear()
    assert Bundle.open(tiny_bundle_copy, integrity=True).hashed == listed(tiny_bundle_copy) == len(hashes)


def flip_byte(path: Path) -> None:
    """Change one byte in place: same size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_same_size_corruption_with_a_new_mtime_is_caught(tiny_bundle_copy: Path) -> None:
    age(tiny_bundle_copy)
    Bundle.open(tiny_bundle_copy)
    flip_byte(tiny_bundle_copy / WEIGHTS)
    os.utime(tiny_bundle_copy / WEIGHTS, (time.time() - 60, time.time() - 60))  # touched, still old
    with pytest.raises(WalkforgeError, match="model.safetensors fails its sha256 check"):
        Bundle.open(tiny_bundle_copy)


def test_corruption_with_its_mtime_restored_is_caught_by_ctime(tiny_bundle_copy: Path) -> None:
    age(tiny_bundle_copy)
    Bundle.open(tiny_bundle_copy)
    path = tiny_bundle_copy / WEIGHTS
    before = path.stat()
    flip_byte(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime as it was: ctime is now
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(WalkforgeError, match="fails its sha256 check"):
        Bundle.open(tiny_bundle_copy)


def test_truncation_is_caught_without_hashing(tiny_bundle_copy: Path) -> None:
    age(tiny_bundle_copy)
    Bundle.open(tiny_bundle_copy)
    path = tiny_bundle_copy / WEIGHTS
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(WalkforgeError, match="truncated or altered"):
        Bundle.open(tiny_bundle_copy)


def test_a_replaced_file_is_hashed(tiny_bundle_copy: Path, hashes: list[str]) -> None:
    age(tiny_bundle_copy)
    Bundle.open(tiny_bundle_copy)
    path = tiny_bundle_copy / WEIGHTS
    shutil.copy2(path, path.with_suffix(".new"))  # same bytes and mtime, another inode
    os.replace(path.with_suffix(".new"), path)
    hashes.clear()
    assert Bundle.open(tiny_bundle_copy).hashed == 1 and hashes == ["model.safetensors"]


def test_a_copy_elsewhere_is_hashed_again(tiny_bundle_copy: Path, tmp_path: Path, hashes: list[str]) -> None:
    age(tiny_bundle_copy)
    Bundle.open(tiny_bundle_copy)
    copy = Path(shutil.copytree(tiny_bundle_copy, tmp_path / "copy"))  # copy2: mtimes kept
    hashes.clear()
    assert Bundle.open(copy).hashed == listed(copy) == len(hashes)


def test_fresh_files_get_no_stamp(tiny_bundle_copy: Path, hashes: list[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A file modified within RACY_NS of its check could be rewritten in the same timestamp tick."""
    assert RACY_NS > 0
    # the window widened from 2 s to 10 min: both opens below fall in it however loaded the machine
    monkeypatch.setattr(stamps_mod, "RACY_NS", 600 * 10**9)
    now = time.time()
    os.utime(tiny_bundle_copy / WEIGHTS, (now, now))
    age_others = [p for p in tiny_bundle_copy.rglob("*") if p.is_file() and p.name != "model.safetensors"]
    for p in age_others:
        os.utime(p, (now - 3600, now - 3600))
    Bundle.open(tiny_bundle_copy)
    hashes.clear()
    assert Bundle.open(tiny_bundle_copy).hashed == 1 and hashes == ["model.safetensors"]


def test_an_unwritable_cache_only_costs_hashing(tiny_bundle_copy: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, hashes: list[str]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))  # stamps/ cannot be made under a file
    age(tiny_bundle_copy)
    Bundle.open(tiny_bundle_copy)
    hashes.clear()
    assert Bundle.open(tiny_bundle_copy).hashed == listed(tiny_bundle_copy) == len(hashes)


def test_a_corrupt_stamp_file_means_hashing(tiny_bundle_copy: Path, hashes: list[str]) -> None:
    age(tiny_bundle_copy)
    digest = Bundle.open(tiny_bundle_copy).digest
    stamp_path(tiny_bundle_copy, digest).write_text("{not json")
    hashes.clear()
    assert Bundle.open(tiny_bundle_copy).hashed == listed(tiny_bundle_copy)
    hashes.clear()
    assert Bundle.open(tiny_bundle_copy).hashed == 0  # the check rewrote it
