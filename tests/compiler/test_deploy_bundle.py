"""`--no-reference-weights`: a deployment bundle carries its weights once (the engines' files),
without the torch reference copy. The compile's own checks still ran; inspect says which kind a
bundle is; the engines run it exactly as the full bundle; the torch backends and `verify` refuse
it in one line; `verify --integrity` checks it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import VAE_TINY_SEED
from tolerances import rel_err, vae_decode_tol

import walkforge
from walkforge.artifacts.bundle import Bundle, has_reference_weights
from walkforge.artifacts.stamps import CACHE_ENV
from walkforge.cli import cli
from walkforge.compiler.pipeline import WEIGHTS_FILE
from walkforge.errors import WalkforgeError
from walkforge.recipes.inputs import example_inputs
from walkforge.tools.verify import verify

SAME_ENGINES_TOL = vae_decode_tol(64)  # the same ONNX on the same provider: only thread-order rounding


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def deploy_bundle(compiled) -> Path:
    """The session's tiny VAE (same recipe, variant and seed) compiled with --no-reference-weights."""
    return compiled("vae", variant="tiny", seed=VAE_TINY_SEED, reference_weights=False)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_the_deployment_bundle_has_no_reference_weights(deploy_bundle: Path, tiny_bundle: Path) -> None:
    deploy, full = Bundle.open(deploy_bundle), Bundle.open(tiny_bundle)
    assert (deploy.kind, full.kind) == ("deployment", "full")
    assert not (deploy_bundle / WEIGHTS_FILE).exists() and WEIGHTS_FILE not in deploy.manifest["files"]
    weights = deploy.manifest["weights"]
    assert "file" not in weights and weights["reference"] is False
    assert not has_reference_weights(deploy.manifest)
    assert weights["fingerprint"] == full.manifest["weights"]["fingerprint"]  # the same weights
    assert deploy.manifest["check"] == full.manifest["check"]  # the compile's checks ran all the same
    size = {b: sum(f["size"] for f in b.manifest["files"].values()) for b in (deploy, full)}
    assert size[full] - size[deploy] == full.manifest["files"][WEIGHTS_FILE]["size"]


def test_the_engines_run_it_as_the_full_bundle(deploy_bundle: Path, tiny_bundle: Path) -> None:
    feeds = example_inputs(Bundle.open(tiny_bundle), batch=1, seed=3)
    got = walkforge.load(deploy_bundle, "cpu").run(feeds)
    want = walkforge.load(tiny_bundle, "cpu").run(feeds)
    for key in want:
        assert rel_err(got[key], want[key]) <= SAME_ENGINES_TOL


@pytest.mark.parametrize("backend", ["torch", "torch-bf16"])
def test_the_torch_backends_refuse_it(deploy_bundle: Path, backend: str) -> None:
    with pytest.raises(WalkforgeError) as info:
        walkforge.load(deploy_bundle, backend)
    assert "--no-reference-weights" in one_line(info) and "torch reference weights" in str(info.value)


def test_verify_refuses_it_in_one_line(deploy_bundle: Path) -> None:
    with pytest.raises(WalkforgeError) as info:
        verify(Bundle.open(deploy_bundle))
    assert "verify" in one_line(info) and "--no-reference-weights" in str(info.value)


def test_the_cli_says_which_kind(deploy_bundle: Path, tiny_bundle: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["inspect", str(deploy_bundle)])
    assert shown.exit_code == 0 and "kind deployment" in shown.output
    for root, kind in ((deploy_bundle, "deployment"), (tiny_bundle, "full")):
        as_json = runner.invoke(cli, ["inspect", str(root), "--json"])
        assert as_json.exit_code == 0 and json.loads(as_json.output)["kind"] == kind
    refused = runner.invoke(cli, ["verify", str(deploy_bundle)])  # main() prints it as `error: …`, exit 2
    assert isinstance(refused.exception, WalkforgeError)
    assert "--no-reference-weights" in str(refused.exception)


def test_verify_integrity_rehashes_every_file(deploy_bundle: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", str(deploy_bundle), "--integrity", "--json"])
    assert result.exit_code == 0, result.output
    checked = json.loads(result.output)
    files = Bundle.open(deploy_bundle, verify=False).manifest["files"]
    assert checked["ok"] and checked["kind"] == "deployment" and checked["files"] == len(files)


def test_verify_integrity_names_a_corrupt_file(tiny_bundle_copy: Path) -> None:
    path = tiny_bundle_copy / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["verify", str(tiny_bundle_copy), "--integrity"])
    assert isinstance(result.exception, WalkforgeError)
    assert "model.safetensors fails its sha256 check" in str(result.exception)
