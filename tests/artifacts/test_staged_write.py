"""The staged bundle writer: atomic replace, stale partials of killed writes, signals, concurrent
writers, permissions (split from test_bundle.py, which tests reading)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from walkforge.artifacts.bundle import (
    staged_bundle,
)
from walkforge.errors import WalkforgeError

ONNX = "walks/decode.onnx"
WEIGHTS = "weights/model.safetensors"


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# -- manifest ---------------------------------------------------------------------------


def test_staged_bundle_success_moves_into_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_bundle(out) as stage:
        partial = stage.parent
        assert partial.parent == tmp_path and partial.name.startswith(f".out.partial-{os.getpid()}-")
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


# -- partial folders of interrupted writes ------------------------------------------------

CHILD_TIMEOUT_S = 60  # a child python importing walkforge.artifacts and writing 2 MB
CHILD = """
import os, signal, sys, time
from pathlib import Path
from walkforge.artifacts.bundle import staged_bundle
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ours is
signal.signal(signal.SIGTERM, signal.SIG_DFL)
with staged_bundle(Path(sys.argv[1])) as stage:
    (stage / "weights.bin").write_bytes(bytes(2_000_000))
    {then}
"""


def child(out: Path, then: str) -> subprocess.Popen:
    """A python that enters staged_bundle(out), writes 2 MB, then runs `then`."""
    code = CHILD.format(then=then)
    return subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_ready(out: Path) -> subprocess.Popen:
    """A child inside its staged write, waiting on stdin; returns once its file is written."""
    proc = child(out, 'print("ready", flush=True); sys.stdin.read()')
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def partials(parent: Path, name: str) -> list[str]:
    return [n for n in leftovers(parent, name) if n.startswith(f".{name}.partial-")]


def test_sigkilled_write_leaves_a_partial_the_next_write_removes(tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    proc = child(out, "os.kill(os.getpid(), signal.SIGKILL)")
    proc.communicate(timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL
    left = partials(tmp_path, "out")
    assert len(left) == 1 and left[0].startswith(f".out.partial-{proc.pid}-")
    assert (tmp_path / left[0] / "bundle" / "weights.bin").stat().st_size == 2_000_000
    with caplog.at_level("WARNING", logger="walkforge.artifacts.staged_write"), staged_bundle(out) as stage:
        assert partials(tmp_path, "out") == [stage.parent.name]  # the dead one is gone already
        (stage / "a.txt").write_text("new")
    assert leftovers(tmp_path, "out") == []
    assert (out / "a.txt").read_text() == "new"
    assert "removed 1 stale partial output(s)" in caplog.text and "(2.0 MB)" in caplog.text


def test_second_writer_is_refused_and_the_live_partial_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = child_ready(out)
    try:
        theirs = partials(tmp_path, "out")
        assert len(theirs) == 1
        with pytest.raises(WalkforgeError) as info, staged_bundle(out, force=True):
            pytest.fail("must not write while another writer is")
        assert str(info.value) == (f"another walkforge process (pid {proc.pid}) is writing {out}; "
                                   "wait for it to finish or stop it")
        assert partials(tmp_path, "out") == theirs
        assert (tmp_path / theirs[0] / "bundle" / "weights.bin").is_file()
    finally:
        proc.kill()
        proc.communicate(timeout=CHILD_TIMEOUT_S)
    with staged_bundle(out, force=True):  # its writer is dead now
        assert len(partials(tmp_path, "out")) == 1
    assert partials(tmp_path, "out") == []


def test_younger_writer_refuses_and_the_older_goes_on(tmp_path: Path) -> None:
    """Of two writers whose partials both exist (here in one process: flock locks are per open
    file), the younger refuses and the older goes on."""
    out = tmp_path / "out"
    with staged_bundle(out) as first:
        with pytest.raises(WalkforgeError, match=f"pid {os.getpid()}.* is writing"), staged_bundle(out):
            pytest.fail("the younger writer must refuse")
        assert partials(tmp_path, "out") == [first.parent.name]
        (first / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first" and leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("owner", ["unlocked", "missing"])
def test_unheld_partial_is_stale_even_if_its_pid_lives(tmp_path: Path, owner: str) -> None:
    """A partial named after a live pid (ours: as after pid reuse) whose owner file nobody locks,
    or one without an owner file (an older walkforge's), is removed."""
    stale = tmp_path / f".out.partial-{os.getpid()}-reused"
    (stale / "bundle").mkdir(parents=True)
    (stale / "bundle" / "w.bin").write_bytes(bytes(10))
    if owner == "unlocked":
        (stale / "owner").write_text(f"{os.getpid()}\n")
    with staged_bundle(tmp_path / "out"):
        assert not stale.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_remove_their_own_partial(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "out"
    proc = child_ready(out)
    assert len(partials(tmp_path, "out")) == 1
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == -signum  # dies of the signal, as without walkforge's handler
    if signum == signal.SIGINT:
        assert stderr.rstrip().endswith("KeyboardInterrupt")
        assert "_Interrupted" not in stderr
    assert leftovers(tmp_path, "out") == []
    assert not out.exists()


CLI_COMPILE = """
import signal, sys
from walkforge.cli import main
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ours is
main(["compile", "vae", "-o", sys.argv[1], "--gpu-archs", ""])
"""
COMPILE_TIMEOUT_S = 600  # the tiny VAE compiles in seconds (a minute on a loaded machine); bounds a hang


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "returncode"), [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
def test_interrupted_cli_compile_leaves_nothing(tmp_path: Path, signum: int, returncode: int) -> None:
    """`walkforge compile vae` signalled once its weights are staged: exit 130 (Ctrl-C, as
    before) or death by SIGTERM, and neither OUT nor a partial folder is left."""
    out = tmp_path / "vae"
    proc = subprocess.Popen([sys.executable, "-c", CLI_COMPILE, str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + COMPILE_TIMEOUT_S
        while not list(tmp_path.glob(".vae.partial-*/bundle/weights/*")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "compile never staged its weights"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=COMPILE_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == returncode, stderr
    assert "Traceback" not in stderr
    assert leftovers(tmp_path, "vae") == [] and not out.exists()


def test_second_cli_compile_to_the_same_output_refuses(tmp_path: Path) -> None:
    """`walkforge compile` while another write to OUT is in progress: exit 2, one line."""
    out = tmp_path / "vae"
    proc = child_ready(out)
    try:
        second = subprocess.run([sys.executable, "-c", CLI_COMPILE, str(out)], capture_output=True,
                                text=True, timeout=COMPILE_TIMEOUT_S)
    finally:
        proc.kill()
        proc.communicate(timeout=CHILD_TIMEOUT_S)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: another walkforge process (pid {proc.pid}) is writing "
                                     f"{out}; wait for it to finish or stop it")


@pytest.fixture
def terminal_sigint() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as in a terminal (a background pytest may ignore it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_signal_handlers_restored_and_ignored_ones_left_alone(tmp_path: Path, terminal_sigint) -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with staged_bundle(tmp_path / "out"):
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigint_in_process_raises_keyboard_interrupt(tmp_path: Path, terminal_sigint) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), staged_bundle(out) as stage:
        (stage / "half.onnx").write_bytes(b"partial")
        signal.raise_signal(signal.SIGINT)
        pytest.fail("the signal must interrupt the write")
    assert leftovers(tmp_path, "out") == [] and not out.exists()


# -- permissions ------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bundle_has_ordinary_permissions(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        with staged_bundle(out) as stage:
            (stage / "walks").mkdir()
            (stage / "walks" / "a.onnx").write_bytes(b"onnx")
            tempfile.mkdtemp(dir=stage)  # 0700
            fd, _ = tempfile.mkstemp(dir=stage / "walks")  # 0600
            os.close(fd)
    finally:
        os.umask(previous)
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(dirs) == 3 and len(files) == 2
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(0o755 & ~umask)}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644 & ~umask)}


def test_compiled_bundle_is_readable_by_others(tiny_bundle: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    paths = [tiny_bundle, *tiny_bundle.rglob("*")]
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()} == {oct(0o755 & ~umask)}
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {oct(0o644 & ~umask)}
