"""The digest on the command line: printed by `inspect` and `compile`, pinned by `--digest`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from walkforge.artifacts.bundle import MANIFEST
from walkforge.cli import cli

WRONG = "0" * 64


def digest_of(bundle: Path) -> str:
    return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()


def invoke(*args: str | Path) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_inspect_prints_the_digest(tiny_bundle: Path) -> None:
    assert f"digest {digest_of(tiny_bundle)}" in invoke("inspect", tiny_bundle)
    shown = json.loads(invoke("inspect", tiny_bundle, "--json"))
    assert shown["digest"] == digest_of(tiny_bundle)
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    assert shown["kind"] == "full"  # added beside the manifest, like the digest
    assert {k: v for k, v in shown.items() if k not in ("digest", "kind")} == manifest


def test_compile_prints_the_digest(tmp_path: Path) -> None:
    out = tmp_path / "vae"
    result = CliRunner().invoke(cli, ["compile", "vae", "-o", str(out), "--gpu-archs", ""],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().splitlines()[-1] == f"digest {digest_of(out)}"


def test_pinned_run_verify_and_bench_pass(tiny_bundle: Path, tmp_path: Path) -> None:
    feeds = tmp_path / "in.npz"
    np.savez(feeds, latents=np.zeros((1, 4, 8, 8), np.float32))
    invoke("run", tiny_bundle, "--inputs", feeds, "--output", tmp_path / "out.npz", "--digest",
           f"sha256:{digest_of(tiny_bundle)}")
    assert np.load(tmp_path / "out.npz")["sample"].shape == (1, 3, 16, 16)
    assert json.loads(invoke("verify", tiny_bundle, "--json", "--digest", digest_of(tiny_bundle)))["walks"]


@pytest.mark.parametrize("command", ["run", "verify", "bench"])
def test_other_digest_refused_in_one_line(tiny_bundle: Path, tmp_path: Path, command: str) -> None:
    extra = ["--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz"] if command == "run" else []
    if command == "run":
        np.savez(tmp_path / "in.npz", latents=np.zeros((1, 4, 8, 8), np.float32))
    done = subprocess.run([sys.executable, "-m", "walkforge.cli", command, str(tiny_bundle), "--digest",
                           WRONG, *map(str, extra)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: bundle {tiny_bundle} has digest {digest_of(tiny_bundle)}, "
                                   f"not the pinned {WRONG}; refused")
    assert not (tmp_path / "out.npz").exists()
