"""#32 (18): a `--force` replacement is two renames (the old bundle into the partial folder, the
new one into place); whatever stops it between them, the old bundle survives, and the next write
to that destination puts it back instead of deleting it as a stale leftover."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from walkforge.artifacts import staged_write
from walkforge.artifacts.bundle import Bundle, staged_bundle
from walkforge.artifacts.staged_write import PREVIOUS, interrupted_replacement
from walkforge.errors import WalkforgeError

CHILD_TIMEOUT_S = 120


def old_bundle(out: Path) -> Path:
    out.mkdir()
    (out / "a.txt").write_text("old")
    return out


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


class Killed(BaseException):
    """Stands for the process dying where it is raised: nothing after it runs cleanly."""


def replace_failing_at(monkeypatch: pytest.MonkeyPatch, second: BaseException, later: bool) -> list:
    """os.replace as seen by the staged writer: the 2nd call (stage → out) raises `second`; with
    `later`, every call after it fails too (as for a dead process, which puts nothing back)."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise second
        if later and len(calls) > 2:
            raise OSError(errno.EIO, "simulated: the writer is gone")
        return real(src, dst)

    monkeypatch.setattr(staged_write.os, "replace", replace)
    return calls


def test_failed_second_rename_puts_the_old_bundle_back(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = old_bundle(tmp_path / "out")
    calls = replace_failing_at(monkeypatch, OSError(errno.EXDEV, "Invalid cross-device link"), later=False)
    with pytest.raises(WalkforgeError, match=f"cannot write output {out}: Invalid cross-device link"), \
            staged_bundle(out, force=True) as stage:
        (stage / "a.txt").write_text("new")
    # out → previous, stage → out (fails), previous → out
    assert [dst for _, dst in calls] == [PREVIOUS, "out", "out"]
    assert (out / "a.txt").read_text() == "old"
    assert leftovers(out) == []


def test_kill_between_the_renames_keeps_the_old_bundle_for_the_next_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = old_bundle(tmp_path / "out")
    with monkeypatch.context() as patch:
        replace_failing_at(patch, Killed(), later=True)
        with pytest.raises(Killed), staged_bundle(out, force=True) as stage:
            (stage / "a.txt").write_text("new")
    assert not out.exists()  # killed between the renames: only the old copy, in the partial
    kept = interrupted_replacement(out)
    assert kept is not None and kept.name == PREVIOUS and (kept / "a.txt").read_text() == "old"
    with pytest.raises(WalkforgeError, match=f"bundle not found: {out} .*interrupted; the old bundle is "
                                             f"at {kept}"):
        Bundle.open(out)
    # 0.3.4's next write deleted the partial as stale, and with it the only copy; now it is put back
    with pytest.raises(WalkforgeError, match="already exists"), staged_bundle(out):
        pass
    assert (out / "a.txt").read_text() == "old"
    assert leftovers(out) == [] and interrupted_replacement(out) is None


def test_the_next_forced_write_after_a_kill_replaces_the_restored_bundle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    out = old_bundle(tmp_path / "out")
    with monkeypatch.context() as patch:
        replace_failing_at(patch, Killed(), later=True)
        with pytest.raises(Killed), staged_bundle(out, force=True) as stage:
            (stage / "a.txt").write_text("lost")
    with caplog.at_level("WARNING", logger="walkforge.artifacts.staged_write"), \
            staged_bundle(out, force=True) as stage:
        assert (out / "a.txt").read_text() == "old"  # back before the new write starts
        (stage / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert leftovers(out) == []
    assert f"put the old bundle back at {out}" in caplog.text


CHILD = """
import os, signal, sys
from pathlib import Path
from walkforge.artifacts.bundle import staged_bundle
real, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the old bundle is in the partial, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
with staged_bundle(Path(sys.argv[1]), force=True) as stage:
    (stage / "a.txt").write_text("new")
"""


def test_sigkill_between_the_renames_loses_nothing(tmp_path: Path) -> None:
    out = old_bundle(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    kept = interrupted_replacement(out)
    assert kept is not None and (kept / "a.txt").read_text() == "old"
    with staged_bundle(out, force=True) as stage:
        (stage / "a.txt").write_text("newer")
    assert (out / "a.txt").read_text() == "newer"
    assert leftovers(out) == []


def test_a_partial_whose_replacement_completed_is_removed(tmp_path: Path) -> None:
    """Killed after the second rename: the destination holds the new bundle, so the old copy in
    the partial is a leftover after all."""
    out = old_bundle(tmp_path / "out")
    stale = tmp_path / ".out.partial-1-1-x"
    (stale / PREVIOUS).mkdir(parents=True)
    (stale / PREVIOUS / "a.txt").write_text("older")
    (stale / "owner").write_text("1\n")  # no live writer holds its lock
    with staged_bundle(out, force=True) as stage:
        (stage / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert leftovers(out) == []


def test_force_onto_a_mount_point_is_refused_before_any_work(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = old_bundle(tmp_path / "mnt")
    monkeypatch.setattr(staged_write.os.path, "ismount", lambda path: Path(path) == out)
    with pytest.raises(WalkforgeError, match=f"cannot replace {out}: it is a mount point"), \
            staged_bundle(out, force=True):
        raise AssertionError("the write began")
    assert (out / "a.txt").read_text() == "old"
    assert leftovers(out) == []
