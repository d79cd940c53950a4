"""The `walkforge` command line.

User errors run the real entry point (`python -m walkforge.cli`) in subprocesses, started
together to save time: each must exit 2 with exactly one line on stderr and no traceback.
Happy paths use click's CliRunner on the session's tiny VAE bundle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console
from safetensors.torch import load_file, save_file
from tolerances import rel_err, vae_decode_tol

from walkforge import cli as cli_module
from walkforge.cli import cli
from walkforge.errors import WalkforgeError

CLI_CPU_VS_TORCH_TOL = vae_decode_tol(64)  # rel_err of `run --backend cpu` vs `--backend torch`, tiny VAE
ST = "diffusion_pytorch_model.safetensors"
BAD_KEY = "decoder.conv_in.weight"
DROPPED_KEY = "decoder.conv_out.bias"


def wf(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walkforge.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / ST))
    edit(tensors)
    save_file(tensors, str(dst / ST))
    return dst


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_checkpoint):
    """name → (finished `python -m walkforge.cli` process, strings its stderr line must contain)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    ckpt = tiny_checkpoint[1]
    good_shape = list(load_file(str(ckpt / ST))[BAD_KEY].shape)
    bad_shape = [*good_shape[:2], 1, 1]

    def reshape(t: dict) -> None:
        t[BAD_KEY] = t[BAD_KEY][:, :, :1, :1].contiguous()

    misshaped = edited_checkpoint(ckpt, tmp / "misshaped", reshape)
    corrupt = Path(shutil.copytree(tiny_bundle, tmp / "corrupt"))
    onnx = corrupt / "walks" / "decode.onnx"
    data = onnx.read_bytes()
    onnx.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    (tmp / "blocker").write_text("a regular file")
    np.savez(tmp / "rank3.npz", latents=np.zeros((4, 8, 8), np.float32))

    cases = {
        "unknown recipe": (["compile", "vea", "-o", tmp / "o1"],
                           ["unknown recipe 'vea'", "did you mean 'vae'"]),
        "unknown variant": (["compile", "vae", "--variant", "huge", "-o", tmp / "o2"],
                            ["no variant 'huge'", "known: sd, flux, tiny"]),
        "misshaped tensor": (["compile", "vae", "--checkpoint", misshaped, "-o", tmp / "o3"],
                             [f"'{BAD_KEY}'", str(bad_shape), f"expects {good_shape}", "stage 'load'"]),
        "unwritable output": (["compile", "vae", "-o", tmp / "blocker" / "bundle"],
                              ["cannot write output", str(tmp / "blocker" / "bundle")]),
        "corrupt bundle": (["inspect", corrupt], ["walks/decode.onnx", "sha256"]),
        "wrong-rank input": (["run", tiny_bundle, "--inputs", tmp / "rank3.npz", "--output", tmp / "o.npz"],
                             ["latents: rank 3", "expected rank 4 [batch, 4, height, width]"]),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = {name: pool.submit(wf, *args, cwd=tmp) for name, (args, _) in cases.items()}
        results = {name: (procs[name].result(), cases[name][1]) for name in cases}
    results["outputs left"] = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("o", ".o")))
    return results


@pytest.mark.parametrize("case", ["unknown recipe", "unknown variant", "misshaped tensor",
                                  "unwritable output", "corrupt bundle", "wrong-rank input"])
def test_user_error_is_one_line_exit_2(cli_errors, case: str) -> None:
    proc, expected = cli_errors[case]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == 2
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]


def test_failed_compiles_leave_no_output(cli_errors) -> None:
    assert cli_errors["outputs left"] == []


def main_error(capsys: pytest.CaptureFixture, *args: str | Path) -> str:
    """Run the entry point in-process; it must exit 2 with one stderr line, which is returned.

    (A non-WalkforgeError escapes `main` here instead of printing a traceback: same verdict.)
    """
    with pytest.raises(SystemExit) as info:
        cli_module.main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = captured.err.strip("\n").splitlines()
    assert info.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_missing_checkpoint_tensor(tmp_path: Path, tiny_checkpoint, capsys: pytest.CaptureFixture) -> None:
    folder = edited_checkpoint(tiny_checkpoint[1], tmp_path / "ckpt", lambda t: t.pop(DROPPED_KEY))
    line = main_error(capsys, "compile", "vae", "--checkpoint", folder, "-o", tmp_path / "out")
    assert f"checkpoint is missing '{DROPPED_KEY}' [3]" in line
    assert not (tmp_path / "out").exists()


def test_missing_input_key(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.savez(tmp_path / "in.npz", latent=np.zeros((1, 4, 8, 8), np.float32))
    line = main_error(capsys, "run", tiny_bundle, "--inputs", tmp_path / "in.npz",
                      "--output", tmp_path / "o.npz")
    assert "missing input 'latents' [batch, 4, height, width] float32" in line


def test_unreadable_inputs_file(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in.npz").write_text("not a zip")
    line = main_error(capsys, "run", tiny_bundle, "--inputs", tmp_path / "in.npz",
                      "--output", tmp_path / "o.npz")
    assert "not a readable npz" in line and "in.npz" in line


@pytest.mark.parametrize("flag", ["--min-cosine", "--fp8-min-cosine"])
def test_min_cosine_and_its_old_name_set_one_gate(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  flag: str) -> None:
    """#15: one --min-cosine for fp8 and int8; the old --fp8-min-cosine stays as its alias."""
    line = main_error(capsys, "compile", "vae", "--precision", "int8", flag, "1.5", "-o", tmp_path / "b")
    assert line.endswith("must be in (0, 1], got 1.5")


def test_bench_inputs_with_batch(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.savez(tmp_path / "in.npz", latents=np.zeros((2, 4, 8, 8), np.float32))
    line = main_error(capsys, "bench", tiny_bundle, "--inputs", tmp_path / "in.npz", "--batch", "2")
    assert line.endswith("bench --inputs takes no --batch or --dim: the npz's arrays set the sizes")


@pytest.mark.parametrize(("dim", "expected"), [("height", "--dim expects NAME=INT, got 'height'"),
                                               ("depth=3", "depth")])
def test_bad_dim(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, dim: str,
                 expected: str) -> None:
    line = main_error(capsys, "inputs", tiny_bundle, "-o", tmp_path / "in.npz", "--dim", dim)
    assert expected in line
    assert not (tmp_path / "in.npz").exists()


# -- happy paths (CliRunner) ------------------------------------------------------------


def invoke(*args: str | Path) -> click.testing.Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def stdout_consoles() -> list[Console]:
    consoles = [c for c in vars(cli_module).values() if isinstance(c, Console) and not c.stderr]
    assert consoles, "walkforge.cli has no stdout Console"
    return consoles


def upscale(bundle: Path) -> int:
    config = json.loads((bundle / "manifest.json").read_text())["config"]
    return 2 ** (len(config["block_out_channels"]) - 1)


def test_config_prints_variant_json() -> None:
    config = json.loads(invoke("config", "vae", "--variant", "sd").stdout)
    assert config["block_out_channels"] == [128, 256, 512, 512]
    assert config["layers_per_block"] == 2


def test_config_with_overrides(tmp_path: Path) -> None:
    overrides = tmp_path / "o.json"
    overrides.write_text(json.dumps({"latent_channels": 16}))
    config = json.loads(invoke("config", "vae", "--config", overrides).stdout)
    assert config["latent_channels"] == 16 and config["block_out_channels"] == [32, 64]


def test_inspect_json_is_the_manifest(tiny_bundle: Path) -> None:
    shown = json.loads(invoke("inspect", tiny_bundle, "--json").stdout)
    digest = shown.pop("digest")  # added by inspect: the sha256 of manifest.json
    assert shown.pop("kind") == "full"  # added by inspect: with the torch reference weights
    assert shown == json.loads((tiny_bundle / "manifest.json").read_text()) and len(digest) == 64


def test_inspect_table(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for console in stdout_consoles():
        monkeypatch.setattr(console, "width", 200)  # no wrapping inside table cells
    text = invoke("inspect", tiny_bundle).stdout
    assert "vae variant=tiny" in text
    assert "decode" in text
    assert "latents [batch, 4, height, width] float32" in text
    assert "walks/decode.onnx" in text and "weights/model.safetensors" in text


@pytest.mark.parametrize("walk", [None, "decode"])
def test_inputs_then_run(tiny_bundle: Path, tmp_path: Path, walk: str | None) -> None:
    inputs, output = tmp_path / "in.npz", tmp_path / "out.npz"
    invoke("inputs", tiny_bundle, "-o", inputs, "--batch", "2", "--dim", "height=5", "--dim", "width=7")
    with np.load(inputs) as data:
        assert data["latents"].shape == (2, 4, 5, 7)
    invoke("run", tiny_bundle, "--inputs", inputs, "--output", output,
           *(["--walk", walk] if walk else []))
    f = upscale(tiny_bundle)
    with np.load(output) as data:
        assert list(data.files) == ["sample"]
        assert data["sample"].shape == (2, 3, 5 * f, 7 * f)
        assert np.isfinite(data["sample"]).all()


def test_run_backends_agree(tiny_bundle: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in.npz"
    invoke("inputs", tiny_bundle, "-o", inputs, "--seed", "3")
    samples = {}
    for backend in ("cpu", "torch"):
        invoke("run", tiny_bundle, "--inputs", inputs, "--output", tmp_path / f"{backend}.npz",
               "--backend", backend)
        with np.load(tmp_path / f"{backend}.npz") as data:
            samples[backend] = data["sample"]
    ref = samples["torch"]
    assert rel_err(samples["cpu"], ref) <= CLI_CPU_VS_TORCH_TOL


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_help_lists_every_documented_option(name: str) -> None:
    command = cli.commands[name]
    text = CliRunner().invoke(cli, [name, "--help"], terminal_width=200).stdout
    assert text.startswith(f"Usage: cli {name}")
    assert command.help and command.help.split("\n")[0].strip() in text
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert options
    for option in options:
        assert option.help, f"{name} {option.opts[0]} has no help text"
        for flag in option.opts:
            assert flag in text
        assert option.help.split(" ")[0] in text


@pytest.mark.parametrize(("given", "output", "mode"), [
    (["--inputs", "--walk"], "o.npz", "arrays"),
    (["--inputs", "--tiled"], "o.png", "images"),
    (["--observation", "--task", "--num-steps"], "o.npz", "observation"),
    (["--prompt-ids", "--prompt", "--height", "--seed"], "o.png", "generate"),
])
def test_run_mode_from_its_flags(given: list[str], output: str, mode: str) -> None:
    assert cli_module.run_mode(given, Path(output)) == mode


@pytest.mark.parametrize(("given", "output", "message"), [
    ([], "o.npz", "run needs --inputs NPZ, --observation NPZ (pi0/pi05) or --prompt-ids / --prompt (bagel)"),
    (["--inputs", "--prompt-ids", "--prompt"], "o.png", "--prompt-ids / --prompt takes no --inputs"),
    (["--inputs", "--seed"], "o.npz", "--seed goes with --prompt-ids / --prompt"),
    (["--inputs", "--tiled"], "o.npz", "--tiled goes with --inputs with a .png -o"),
    (["--inputs", "--walk"], "o.png", "--walk goes with --inputs with an npz -o"),
    (["--observation", "--walk"], "o.npz", "--walk goes with --inputs with an npz -o"),
])
def test_run_refuses_flags_of_two_modes(given: list[str], output: str, message: str) -> None:
    with pytest.raises(WalkforgeError) as info:
        cli_module.run_mode(given, Path(output))
    assert str(info.value).startswith(message)


def test_run_mixed_modes_fail_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Flags read off the command line, defaults excluded: --height 1024 is given, its default is not."""
    line = main_error(capsys, "run", tmp_path / "no-bundle", "--inputs", tmp_path / "in.npz",
                      "--height", "1024", "-o", tmp_path / "o.npz")
    assert line == "error: --height goes with --prompt-ids / --prompt"
