"""#32 (12): the npz reader checks sizes before inflating (the zip's member headers and each
member's .npy header) and refuses empty, truncated, pickled or oversized files in one line."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from walkforge.artifacts import npz as npz_module
from walkforge.artifacts.npz import NPZ_MAX_BYTES, read_npz
from walkforge.errors import WalkforgeError


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array)
    return buf.getvalue()


def truncated(path: Path, keep: int) -> None:
    np.savez(path, x=np.ones(99))
    path.write_bytes(path.read_bytes()[:keep])


def refused(path: Path, **kwargs) -> str:
    with pytest.raises(WalkforgeError) as info:
        read_npz(path, "--inputs", **kwargs)
    line = str(info.value)
    assert "\n" not in line and (line.startswith(f"--inputs {path}") or line.startswith("--inputs not found"))
    return line


def test_a_good_npz_is_read(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "a.npz", latents=np.ones((1, 4, 8, 8), np.float32), ids=np.arange(3))
    arrays = read_npz(tmp_path / "a.npz")
    assert sorted(arrays) == ["ids", "latents"] and arrays["latents"].sum() == 256
    assert NPZ_MAX_BYTES == 2 << 30


def test_an_npz_inflating_past_the_limit_is_refused_before_inflating(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The 0.3.4 probe: 23 MB of zeros inflating to 5 GiB was inflated first. Here 8 MiB of zeros
    (a few kB compressed) against a 1 MiB limit, with numpy's reader made to fail if reached."""
    np.savez_compressed(tmp_path / "bomb.npz", latents=np.zeros(2 << 20, np.float32))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000

    def inflated(*_args, **_kwargs):
        raise AssertionError("inflated before the size check")

    monkeypatch.setattr(npz_module.np, "load", inflated)
    line = refused(tmp_path / "bomb.npz", max_bytes=1 << 20)
    assert "inflates to 8388736 bytes, over the 1048576" in line and "refused before inflating it" in line


def test_a_member_whose_shape_needs_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("latents.npy", npy_bytes(np.zeros(1000, np.float32))[:200])
    line = refused(tmp_path / "short.npz")
    assert "member 'latents' of shape [1000] float32 needs 4000 bytes, it holds 72 (truncated)" in line


@pytest.mark.parametrize(("make", "says"), [
    (lambda p: p.write_bytes(b""), "not a readable npz (the file is empty)"),  # 0.3.4: exit 130, silent
    (lambda p: np.savez(p), "the npz holds no arrays"),
    (lambda p: truncated(p, 300), "not a readable npz"),  # no zip directory at its end
    (lambda p: p.write_bytes(bytes(range(256)) * 4), "not a readable npz"),
    (lambda p: np.save(p.with_suffix(".npy"), np.ones(3)) or p.with_suffix(".npy").rename(p),
     "one .npy array, not named arrays"),
    (lambda p: np.savez(p, x=np.array([{"a": 1}], dtype=object)), "member 'x' holds Python objects"),
])
def test_unreadable_npz_is_one_line(tmp_path: Path, make, says: str) -> None:
    path = tmp_path / "in.npz"
    make(path)
    assert says in refused(path)


def test_missing_and_folder(tmp_path: Path) -> None:
    assert refused(tmp_path / "none.npz") == f"--inputs not found: {tmp_path / 'none.npz'}"
    assert refused(tmp_path).endswith("is a directory, not an npz")
