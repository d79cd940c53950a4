"""The compile's `kernels` stage: AOT Triton kernels of the custom ops stored in the bundle."""

from __future__ import annotations

import hashlib

import pytest

from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError


def test_pi0_bundle_carries_aot_kernels_per_arch(tmp_path):
    manifest = compile_bundle(CompileRequest("pi0", tmp_path / "b", gpu_archs=("sm_80", "sm_90")))
    records = manifest["kernels"]
    assert sorted((r["kernel"], r["arch"]) for r in records) == [
        ("kv_cache_write_kernel", "sm_80"), ("kv_cache_write_kernel", "sm_90"),
        ("paged_attention_kernel", "sm_80"), ("paged_attention_kernel", "sm_90")]
    bundle = Bundle.open(tmp_path / "b")  # every kernel file is in the hashed file table
    for r in records:
        cubin = bundle.path(r["cubin_file"]).read_bytes()
        ptx = bundle.path(r["ptx_file"]).read_text()
        assert hashlib.sha256(cubin).hexdigest() == r["sha256"]
        assert f".version {r['ptx_isa']}" in ptx and f".target {r['arch']}" in ptx
        assert r["triton_version"] and r["grid"] and r["signature"]
    attention = next(r for r in records if r["kernel"] == "paged_attention_kernel")
    tiny = manifest["config"]["expert"]
    assert attention["constexprs"]["HEAD_DIM"] == tiny["head_dim"]  # specialised to this model
    assert attention["constexprs"]["NUM_HEADS"] == tiny["heads"]


def test_vae_uses_no_plugins_so_no_kernels(tiny_bundle):
    assert "kernels" not in Bundle.open(tiny_bundle).manifest


def test_bad_arch_is_a_one_line_error(tmp_path):
    with pytest.raises(WalkforgeError, match="'sm90' is not an architecture like sm_90"):
        compile_bundle(CompileRequest("pi0", tmp_path / "b", gpu_archs=("sm90",)))
    assert not (tmp_path / "b").exists()
