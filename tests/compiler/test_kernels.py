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


def test_default_archs_cover_the_gpus_people_own():
    from walkforge.cli import compile_cmd
    from walkforge.compiler.kernels import DEFAULT_ARCHS

    # Ampere, Orin, Ada, Hopper, Blackwell B200, Thor, Blackwell RTX: all AOT-compile here (docs/gpu.md)
    assert set(DEFAULT_ARCHS) >= {"sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_110", "sm_120"}
    option = next(p for p in compile_cmd.params if p.name == "gpu_archs")
    assert option.default == ",".join(DEFAULT_ARCHS)


def test_fp8_pool_kernels_are_not_built_for_archs_without_fp8(tmp_path):
    from walkforge.compiler.kernels import build_kernels

    shapes = {"num_heads": 2, "kv_heads": 1, "head_dim": 16, "page_size": 16, "pool_dtype": "float8_e4m3fn"}
    records = build_kernels(tmp_path, ("sm_86",), shapes)
    assert records == []  # the compile warns (fp8_warning) and a sm_86 device refuses at load


def test_sm_101_is_refused_with_its_new_name():
    from walkforge.compiler.kernels import check_archs

    with pytest.raises(WalkforgeError, match="use sm_110"):
        check_archs(("sm_90", "sm_101"))
