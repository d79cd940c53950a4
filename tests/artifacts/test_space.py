"""A compile that runs out of disk: refused early by the free-space check, or failing in one line
naming the file being written when the disk fills anyway, and leaving neither OUT nor a partial."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts import space
from walkforge.compiler import pipeline
from walkforge.errors import WalkforgeError
from walkforge.graphs import initializers

ENOSPC_TEXT = os.strerror(errno.ENOSPC)


def compile_refused(out: Path) -> str:
    """Compile the tiny VAE to `out`; it must fail in one line and leave nothing beside `out`."""
    with pytest.raises(WalkforgeError) as info:
        compile_bundle(CompileRequest("vae", out, variant="tiny", gpu_archs=()))
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists() and list(out.parent.iterdir()) == []
    return message


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "vae"


@pytest.fixture
def need(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The expected bytes the compile computes (recorded as it asks for them)."""
    seen: list[int] = []
    real = space.expected_bytes

    def record(weight_bytes: int) -> int:
        seen.append(real(weight_bytes))
        return seen[-1]

    monkeypatch.setattr(pipeline, "expected_bytes", record)
    return seen


def test_too_little_free_space_refuses_before_writing_weights(out: Path, need: list[int],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(space, "free_bytes", lambda _path: 10_000_000)
    writes = []
    monkeypatch.setattr(pipeline, "write_safetensors", lambda *a, **k: writes.append(a))
    message = compile_refused(out)
    assert message == (f"compile failed at stage 'load' (finished: nothing): not enough space for "
                       f"{out}: the bundle needs about {space.gb(need[0])}, 10.0 MB free there "
                       "(free some space or choose another -o)")
    assert writes == []


def test_expected_size_scales_with_the_weights() -> None:
    pi0_weight_bytes = 3_300_000_000 * 4  # ≈3.3 B fp32 parameters: a ≈25 GB bundle
    assert 25e9 < space.expected_bytes(pi0_weight_bytes) < 30e9


def test_disk_full_writing_the_weights(out: Path, need: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path, _specs: dict, _tensor_of) -> str:  # the streaming writer's file write on ENOSPC
        Path(path).write_bytes(bytes(1000))
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)

    monkeypatch.setattr(pipeline, "write_safetensors", full)
    assert compile_refused(out) == (f"compile failed at stage 'load' (finished: nothing): no space left "
                                    f"on the device writing weights/model.safetensors for {out}: the "
                                    f"bundle needs about {space.gb(need[0])} in all")


def test_disk_full_writing_onnx_external_data(out: Path, need: list[int],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = initializers._write

    def full(fh, *args):
        if fh.tell() > 100_000:
            raise OSError(errno.ENOSPC, ENOSPC_TEXT)
        return real(fh, *args)

    monkeypatch.setattr(initializers, "_write", full)
    assert compile_refused(out) == (f"compile failed at stage 'trace' (finished: load): no space left on "
                                    f"the device writing walks/decode.onnx.data for {out}: the bundle "
                                    f"needs about {space.gb(need[0])} in all")


def test_other_write_errors_keep_their_traceback(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_path: Path, _specs: dict, _tensor_of) -> str:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(pipeline, "write_safetensors", broken)
    with pytest.raises(OSError, match="Input/output error"):
        compile_bundle(CompileRequest("vae", out, variant="tiny", gpu_archs=()))
    assert not out.exists() and list(out.parent.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_real_full_disk(small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ENOSPC: the free-space check is lifted so the weights (1.6 MB) fit and the ONNX
    external data fills the disk."""
    monkeypatch.setattr(pipeline, "check_free_space", lambda *_args: None)
    out = small_tmpfs / "vae"
    message = compile_refused(out)
    assert message.startswith("compile failed at stage 'trace' (finished: load): no space left on the "
                              "device writing walks/decode.onnx")
