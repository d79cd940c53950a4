"""#32's CLI rough edges (10, 12, 13, 14): each is one stderr line and exit 2 BEFORE any work —
the bundle is not loaded, nothing is compiled or written — or works as it says.

Run in-process through the real entry point (`main_error` from test_cli.py); "before any work" is
checked by making the work itself (runtimes.load, Bundle.open, compile_bundle) fail the test."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_cli import main_error

import walkforge
import walkforge.runtimes
from walkforge import cli as cli_module
from walkforge.artifacts.bundle import MANIFEST, Bundle
from walkforge.errors import WalkforgeError


def no_work(*_args, **_kwargs):
    raise AssertionError("the command started its work before refusing")


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` may not load the bundle: every refusal here comes first."""
    monkeypatch.setattr(walkforge.runtimes, "load", no_work)


@pytest.fixture
def latents(tmp_path: Path) -> Path:
    np.savez(tmp_path / "in.npz", latents=np.zeros((1, 4, 8, 8), np.float32))
    return tmp_path / "in.npz"


def write_npz(path: Path, kind: str) -> Path:
    if kind == "empty":  # 0.3.4: exit 130 and no message (numpy's EOFError read as click's Abort)
        path.write_bytes(b"")
    elif kind == "truncated":
        np.savez(path, latents=np.zeros((1, 4, 8, 8), np.float32))
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "strings":
        np.savez(path, latents=np.array(["noise", "noise"]))
    elif kind == "0x0":
        np.savez(path, latents=np.zeros((1, 4, 0, 0), np.float32))
    elif kind == "pickled":
        np.savez(path, latents=np.array([{"a": 1}], dtype=object))
    elif kind == "no arrays":
        zipfile.ZipFile(path, "w").close()
    return path


NPZ_CASES = {"empty": "not a readable npz (the file is empty)", "truncated": "not a readable npz",
             "strings": "'latents' is <U5 [2], not numbers",
             "0x0": "'latents' has shape [1, 4, 0, 0]: an empty array",
             "pickled": "member 'latents' holds Python objects", "no arrays": "the npz holds no arrays"}


@pytest.mark.parametrize("kind", list(NPZ_CASES))
def test_bad_inputs_npz_is_one_line_before_loading(tiny_bundle: Path, tmp_path: Path, no_load, capsys,
                                                   kind: str) -> None:
    path = write_npz(tmp_path / "in.npz", kind)
    line = main_error(capsys, "run", tiny_bundle, "--inputs", path, "-o", tmp_path / "o.npz")
    assert line.startswith(f"error: --inputs {path}") and NPZ_CASES[kind] in line
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize(("key", "value", "says"), [
    ("noise", np.array(["a", "b"]), "'noise' is <U1 [2], not numbers"),
    ("observation.images.base", np.zeros((0, 0, 3), np.uint8),
     "'observation.images.base' has shape [0, 0, 3]: an empty array"),
])
def test_bad_observation_is_one_line_before_loading(tiny_bundle: Path, tmp_path: Path, no_load, capsys,
                                                    key: str, value: np.ndarray, says: str) -> None:
    obs = {"observation.images.base": np.zeros((48, 64, 3), np.uint8), "observation.state": np.zeros(6),
           "task": np.array("pick"), key: value}
    np.savez(tmp_path / "obs.npz", **obs)
    line = main_error(capsys, "run", tiny_bundle, "--observation", tmp_path / "obs.npz",
                      "-o", tmp_path / "a.npz")
    assert line == f"error: --observation {tmp_path / 'obs.npz'}: {says}"


@pytest.mark.parametrize("batch", ["0", "-1", "100000"])
def test_inputs_batch_is_bounded(tiny_bundle: Path, tmp_path: Path, capsys, batch: str) -> None:
    line = main_error(capsys, "inputs", tiny_bundle, "-o", tmp_path / "i.npz", "--batch", batch)
    assert line == f"error: --batch must be in 1..{cli_module.MAX_BATCH}, got {batch}"
    assert not (tmp_path / "i.npz").exists()


def test_negative_dim_and_seed_are_refused(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    line = main_error(capsys, "inputs", tiny_bundle, "-o", tmp_path / "i.npz", "--dim", "height=-3")
    assert line == f"error: --dim height=-3: height must be in 1..{cli_module.MAX_INPUT_DIM}"
    line = main_error(capsys, "inputs", tiny_bundle, "-o", tmp_path / "i.npz", "--seed", "-1")
    assert line == "error: --seed must be ≥ 0, got -1"
    assert not (tmp_path / "i.npz").exists()


def test_inputs_larger_than_run_reads_are_refused(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    line = main_error(capsys, "inputs", tiny_bundle, "-o", tmp_path / "i.npz", "--batch", "4096",
                      "--dim", "height=1000", "--dim", "width=1000")
    assert "--batch 4096: the inputs would take 65536000000 bytes, over the 2048 MiB" in line
    assert not (tmp_path / "i.npz").exists()


@pytest.mark.parametrize("threads", ["0", "-1", "100000"])
def test_threads_are_bounded(tiny_bundle: Path, latents: Path, tmp_path: Path, no_load, capsys,
                             threads: str) -> None:
    """0.3.4: 100000 crashed onnxruntime (SIGSEGV), 0 and −1 were taken."""
    line = main_error(capsys, "run", tiny_bundle, "--inputs", latents, "-o", tmp_path / "o.npz",
                      "--threads", threads)
    assert line == f"error: --threads must be in 1..{cli_module.MAX_THREADS}, got {threads}"


def test_threads_bound_takes_one_to_four_times_the_cpus() -> None:
    import os

    check = cli_module._int_range("--threads", 1, cli_module.MAX_THREADS)
    assert 4 * (os.cpu_count() or 1) == cli_module.MAX_THREADS
    assert check(None, None, 1) == 1 and check(None, None, cli_module.MAX_THREADS) == cli_module.MAX_THREADS
    assert check(None, None, None) is None  # absent: the backend's default
    with pytest.raises(WalkforgeError):
        check(None, None, cli_module.MAX_THREADS + 1)


@pytest.mark.parametrize("steps", ["0", "1000000000"])
def test_num_steps_is_bounded(tiny_bundle: Path, tmp_path: Path, no_load, capsys, steps: str) -> None:
    np.savez(tmp_path / "obs.npz", state=np.zeros(6))
    line = main_error(capsys, "run", tiny_bundle, "--observation", tmp_path / "obs.npz",
                      "-o", tmp_path / "a.npz", "--num-steps", steps)
    assert line == f"error: --num-steps must be in 1..1000, got {steps}"


@pytest.mark.parametrize("output", ["missing/o.npz", "file/o.npz", "folder", "missing/o.png"])
def test_unwritable_run_output_is_refused_before_loading(tiny_bundle: Path, latents: Path,
                                                         tmp_path: Path, no_load, capsys,
                                                         output: str) -> None:
    """0.3.4 ran the bundle, then failed to write -o with a traceback."""
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "folder").mkdir()
    line = main_error(capsys, "run", tiny_bundle, "--inputs", latents, "-o", tmp_path / output)
    if output == "folder":  # numpy would write folder.npz, which is a folder
        assert line == f"error: -o {tmp_path / 'folder.npz'} is a folder, not a file to write"
    else:
        assert line.startswith(f"error: cannot write -o {tmp_path / output}: ")


def test_unwritable_inputs_output_is_refused_before_opening_the_bundle(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(Bundle, "open", no_work)
    line = main_error(capsys, "inputs", tiny_bundle, "-o", tmp_path / "missing" / "i.npz")
    assert line.startswith(f"error: cannot write -o {tmp_path / 'missing' / 'i.npz'}: No such file")


@pytest.mark.parametrize(("command", "output"), [("run", "out.npz"), ("run", "sub/out.png"),
                                                 ("inputs", "in.npz"), ("run", "walks/x")])
def test_output_inside_a_bundle_is_refused(tiny_bundle_copy: Path, latents: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys, command: str,
                                           output: str) -> None:
    """0.3.4 wrote it, and every later load refused the bundle (a file its table does not list)."""
    (tiny_bundle_copy / "sub").mkdir()  # unlisted itself, but an empty folder is no file
    monkeypatch.setattr(walkforge.runtimes, "load", no_work)
    args = ("--inputs", latents) if command == "run" else ()
    target = tiny_bundle_copy / output
    line = main_error(capsys, command, tiny_bundle_copy, *args, "-o", target)
    assert f"is inside bundle {tiny_bundle_copy}" in line and "write it elsewhere" in line
    (tiny_bundle_copy / "sub").rmdir()
    assert Bundle.open(tiny_bundle_copy, integrity=True).hashed > 0  # untouched: still loads


def test_compile_into_a_bundle_is_refused_before_compiling(tiny_bundle_copy: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(walkforge, "compile_bundle", no_work)
    line = main_error(capsys, "compile", "vae", "-o", tiny_bundle_copy / "nested")
    assert line.startswith(f"error: -o {tiny_bundle_copy / 'nested'} is inside bundle {tiny_bundle_copy}")
    assert not (tiny_bundle_copy / "nested").exists()


def test_force_onto_a_folder_that_is_no_bundle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys) -> None:
    monkeypatch.setattr(walkforge, "compile_bundle", no_work)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    line = main_error(capsys, "compile", "vae", "-o", tmp_path / "home", "--force")
    assert line.startswith(f"error: --force replaces a bundle, and {tmp_path / 'home'} is a folder "
                           "that is not one")
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def test_force_onto_a_bundle_or_an_empty_folder_passes_the_check(tiny_bundle: Path, tmp_path: Path) -> None:
    cli_module._replaceable(tiny_bundle, force=True)
    (tmp_path / "empty").mkdir()
    cli_module._replaceable(tmp_path / "empty", force=True)
    cli_module._replaceable(tmp_path / "absent", force=True)
    with pytest.raises(WalkforgeError, match="is not a folder"):
        (tmp_path / "file").write_text("x")
        cli_module._replaceable(tmp_path / "file", force=True)


def test_the_npz_numpy_writes_is_the_one_named(tiny_bundle: Path, latents: Path, tmp_path: Path,
                                               capsys) -> None:
    """numpy adds .npz to a name without it; 0.3.4 said it wrote the name given."""
    with pytest.raises(SystemExit) as info:
        cli_module.main(["run", str(tiny_bundle), "--inputs", str(latents), "-o", str(tmp_path / "result")])
    assert info.value.code == 0
    said = "".join(capsys.readouterr().err.split())  # rich wraps long lines, even inside a path
    assert f"wrote{tmp_path / 'result.npz'}:sample" in said
    assert (tmp_path / "result.npz").is_file() and not (tmp_path / "result").exists()
    with pytest.raises(SystemExit) as info:
        cli_module.main(["inputs", str(tiny_bundle), "-o", str(tmp_path / "made")])
    assert info.value.code == 0
    assert f"wrote{tmp_path / 'made.npz'}:latents" in "".join(capsys.readouterr().err.split())


def test_a_manifest_out_of_bounds_is_one_line(tiny_bundle_copy: Path, latents: Path, tmp_path: Path,
                                              capsys) -> None:
    """0.3.4: config.num_steps = 1e9 never returned."""
    manifest = json.loads((tiny_bundle_copy / MANIFEST).read_text())
    manifest["config"]["num_steps"] = 10**9
    (tiny_bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    line = main_error(capsys, "run", tiny_bundle_copy, "--inputs", latents, "-o", tmp_path / "o.npz")
    assert line.endswith("malformed manifest: config.num_steps is 1000000000, not an integer in 1..1000")


@pytest.mark.parametrize(("command", "flags", "says"), [
    ("verify", ("--report", "{bundle}/report"), "--report {bundle}/report/bench.md is inside bundle"),
    ("bench", ("--iters", "0"), "--iters must be ≥ 1, got 0"),
    ("bench", ("--warmup", "-1"), "--warmup must be ≥ 0, got -1"),
    ("verify", ("--batch", "0"), "--batch must be in 1..4096, got 0"),
    ("verify", ("--seed", "-5"), "--seed must be ≥ 0, got -5"),
])
def test_verify_and_bench_flags_are_bounded(tiny_bundle_copy: Path, capsys, command: str, flags: tuple,
                                            says: str) -> None:
    args = [f.format(bundle=tiny_bundle_copy) for f in flags]
    line = main_error(capsys, command, tiny_bundle_copy, *args)
    assert says.format(bundle=tiny_bundle_copy) in line
    assert not (tiny_bundle_copy / "report").exists()
