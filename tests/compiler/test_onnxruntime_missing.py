"""`pip install 'walkforge[compile]'` without `[cpu]` or `[cuda]`: no onnxruntime. A compile must stop
before any work with one line saying what to install, not a ModuleNotFoundError traceback."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest

from walkforge import cli as cli_module
from walkforge.errors import WalkforgeError
from walkforge.graphs.ort import ORT_HINT, require_onnxruntime


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import onnxruntime` fails as it does where it is not installed (None in sys.modules makes
    the import raise ModuleNotFoundError with name 'onnxruntime', and find_spec answer None)."""
    for name in [n for n in sys.modules if n == "onnxruntime" or n.startswith("onnxruntime.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def test_compile_without_onnxruntime_says_what_to_install_in_one_line(
        no_onnxruntime, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli_module.main(["compile", "vae", "--variant", "tiny", "-o", str(tmp_path / "bundle")])
    captured = capsys.readouterr()
    lines = captured.err.strip("\n").splitlines()
    assert info.value.code == 2, captured.err
    assert lines == [f"error: onnxruntime is not installed: {ORT_HINT}"], captured.err
    assert "pip install 'walkforge[cpu]'" in lines[0] and "'walkforge[cuda]'" in lines[0]
    assert not (tmp_path / "bundle").exists()  # stopped before the stages: nothing staged or traced


def test_cpu_engine_raises_the_same_line(no_onnxruntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime's first import of onnxruntime (`runtimes.walk_engine`, the cpu and cuda backends)."""
    monkeypatch.delitem(sys.modules, "walkforge.runtimes.backends.cpu.engine", raising=False)  # re-import it
    with pytest.raises(WalkforgeError) as info:
        import walkforge.runtimes.backends.cpu.engine  # noqa: F401
    assert str(info.value) == f"onnxruntime is not installed: {ORT_HINT}"


def test_a_broken_onnxruntime_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only onnxruntime itself missing is the user's to fix by installing it; onnxruntime present
    but lacking one of its own dependencies is reported as it is."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'flatbuffers'", name="flatbuffers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError, match="flatbuffers"):
        require_onnxruntime()


def test_require_onnxruntime_returns_the_module_where_installed() -> None:
    import onnxruntime

    assert require_onnxruntime() is onnxruntime
