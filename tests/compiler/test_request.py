"""`CompileRequest`: one declaration per option, from which `walkforge compile`'s flags come."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from walkforge import cli as cli_module
from walkforge.cli import cli
from walkforge.compiler.request import CALIB_METHODS, CompileRequest

COMPILE = cli.commands["compile"]
FIELDS = {f.name: f.metadata["cli"] for f in fields(CompileRequest)}


def test_every_field_has_one_flag_and_every_flag_one_field() -> None:
    params = {p.name: p for p in COMPILE.params}
    assert sorted(params) == sorted(FIELDS)  # click parameter names are the field names
    assert isinstance(params["recipe"], click.Argument)
    spellings = [o for p in params.values() if isinstance(p, click.Option) for o in p.opts]
    assert len(spellings) == len(set(spellings))
    for name, flag in FIELDS.items():
        if name != "recipe":
            assert tuple(params[name].opts) == flag.flags, name
            assert flag.help, f"{name} has no help"
    text = CliRunner().invoke(cli, ["compile", "--help"], terminal_width=200).stdout
    assert all(spelling in text for spelling in spellings)


def test_cli_defaults_are_the_field_defaults(tmp_path: Path) -> None:
    ctx = COMPILE.make_context("compile", ["vae", "-o", str(tmp_path / "b")])
    assert CompileRequest.from_cli(ctx.params) == CompileRequest("vae", tmp_path / "b")


def test_cli_values_parsed_into_fields(tmp_path: Path) -> None:
    args = ["pi0", "-o", str(tmp_path / "b"), "--int8-weight-bits", "7", "--fp8-exclude", "head,tail",
            "--gpu-archs", "", "--no-reference-weights", "--checkpoint", str(tmp_path / "ckpt"),
            "--lerobot-version", "0.5", "--processors", str(tmp_path / "procs")]
    req = CompileRequest.from_cli(COMPILE.make_context("compile", args).params)
    assert (req.int8_weight_bits, req.fp8_exclude, req.gpu_archs) == (7, ("head", "tail"), ())
    assert not req.reference_weights
    assert (req.lerobot_version, req.processors) == ("0.5", tmp_path / "procs")


@pytest.mark.parametrize(("args", "starts"), [
    (["--calib-samples", "0"], "error: --calib-samples must be at least 1, got 0"),
    (["--calib-percentile", "101"], "error: --calib-percentile must be in (0, 100], got 101.0"),
    (["--fp8-min-cosine", "0"], "error: --min-cosine must be in (0, 1], got 0.0"),
    (["--gpu-archs", "sm90"], "error: --gpu-archs: 'sm90' is not an architecture like sm_90"),
    (["--lerobot-version", "latest"], "error: --lerobot-version must be a LeRobot release like 0.5 (X.Y; "
                                      "X.Y.Z reads as X.Y), got 'latest'"),
    (["--lerobot-version", "0.6"], "error: --lerobot-version says how to read a LeRobot folder: give "
                                   "--checkpoint"),
    (["--processors", "p"], "error: --processors completes a LeRobot folder: give --checkpoint"),
])
def test_bad_value_is_one_line_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               args: list[str], starts: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli_module.main(["compile", "vae", "-o", str(tmp_path / "b"), *args])
    lines = capsys.readouterr().err.strip("\n").splitlines()
    assert info.value.code == 2
    assert lines == [starts]
    assert list(tmp_path.iterdir()) == []


def test_only_recipe_and_out_are_positional(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        CompileRequest("vae", tmp_path / "b", "tiny")  # type: ignore[misc]
    assert CompileRequest("vae", tmp_path / "b", variant="tiny").variant == "tiny"


def test_new_lerobot_options_are_stored_as_given(tmp_path: Path) -> None:
    req = CompileRequest("pi0", tmp_path / "b", checkpoint=tmp_path / "c", lerobot_version="0.4",
                         processors=tmp_path / "p")
    assert (req.lerobot_version, req.processors) == ("0.4", tmp_path / "p")
    assert CompileRequest("pi0", tmp_path / "b").lerobot_version is None


def test_calib_method_choices_are_the_calibrators() -> None:
    from walkforge.compiler.calibrate import METHODS

    assert CALIB_METHODS == METHODS
