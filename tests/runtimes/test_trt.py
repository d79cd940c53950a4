"""TensorRT target: the pure parts run everywhere; building and running need TensorRT and a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from tolerances import rel_err

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import loop_bodies
from walkforge.plugins.constants import DOMAIN, PLUGIN_NAMESPACE
from walkforge.runtimes.backends import Options
from walkforge.runtimes.backends import trt as trt_runtime
from walkforge.runtimes.backends.trt import build as trt_build

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
# rel_err of a TensorRT engine vs onnxruntime CPU on the tiny VAE: TensorRT may pick TF32 tactics for
# fp32 convs (10 mantissa bits: eps 2**-10); two of its steps, about the 1e-3 rel + 1e-3 abs (on
# samples of scale ~1) this replaced. Weights bound to the wrong binding or fp8 tactics give 1e-1.
TRT_VS_CPU_TOL = 2 * 2.0**-10

VAE_DECODE = {"inputs": [{"name": "latents", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}],
              "outputs": [{"name": "sample", "dtype": "float32",
                           "shape": ["batch", 3, "sample_height", "sample_width"]}]}


def manifest(**fields) -> dict:
    """A compiled bundle's manifest, less what these helpers never read, with `fields`."""
    return {"walkforge_version": "0", "created": "", "recipe": "vae", "variant": "tiny", "config": {},
            "weights": {"fingerprint": "", "source": "random"}, "front": "vae", "dim_ranges": {},
            "precision": {"weights": "fp32", "activations": "fp32", "kv": "fp32", "calibration": None},
            "walks": {}, "plan": [], "targets": {}} | fields


VAE_MANIFEST = manifest(dim_ranges={"height": [8, 64, 128], "width": [8, 64, 128]})  # the vae recipe's
PI0_MANIFEST = manifest(paging={"max_tokens": 2 * 256 + 16, "page_size": 16})  # tiny pi0: 2 views, 16 prompt
POOL = {"name": "kv_pool", "dtype": "float32", "shape": [2, 2, "num_pages", 16, 1, 16]}
DENOISE = {"inputs": [{"name": "x_t", "dtype": "float32", "shape": ["batch", 50, 32]}, POOL,
                      {"name": "block_table", "dtype": "int64", "shape": ["batch", "max_pages"]}]}


# ---------------------------------------------------------------- profiles and naming


def test_vae_profile_spans_batch_and_latent_size():
    shapes = trt_build.derive_profiles(VAE_DECODE, VAE_MANIFEST, "default")
    assert shapes == {"latents": ((1, 4, 8, 8), (1, 4, 64, 64), (8, 4, 128, 128))}
    assert trt_build.derive_profiles(VAE_DECODE, VAE_MANIFEST, "single")["latents"][2] == (1, 4, 128, 128)


def test_kv_page_dims_follow_the_prefix_length():
    shapes = trt_build.derive_profiles(DENOISE, PI0_MANIFEST, "default")
    pages = -(-(2 * 256 + 16) // 16)  # 33 pages of 16 hold one 528-token prefix
    assert shapes["block_table"] == ((1, 1), (1, pages), (8, pages))
    assert [s[2] for s in shapes["kv_pool"]] == [1, 8 * pages, 32 * pages]
    assert shapes["x_t"] == ((1, 50, 32), (1, 50, 32), (8, 50, 32))


def test_kv_page_dims_need_the_manifests_paging():
    with pytest.raises(WalkforgeError, match="'kv_pool' has symbolic dim 'num_pages' with no TensorRT range"):
        trt_build.derive_profiles(DENOISE, manifest(), "default")


def test_unknown_profile_and_unknown_dim_are_user_errors():
    with pytest.raises(WalkforgeError, match="unknown TensorRT profile 'huge'.*default"):
        trt_build.derive_profiles(VAE_DECODE, VAE_MANIFEST, "huge")
    contract = {"inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"]}]}
    with pytest.raises(WalkforgeError, match="'tokens' has symbolic dim 'seq'"):
        trt_build.derive_profiles(contract, manifest(), "default")


@pytest.mark.parametrize("sm, version, folder", [
    ("9.0", "10.9.0.34", "engines/trt-sm90-10.9.0.34"),
    ("sm_89", "10.13", "engines/trt-sm89-10.13"),
    (120, "11.0.1", "engines/trt-sm120-11.0.1"),
    ("12.0", "11.0.1", "engines/trt-sm120-11.0.1"),
])  # fmt: skip
def test_plan_dir_names_arch_and_version(sm, version, folder):
    assert trt_build.plan_dir(sm, version) == folder


@pytest.mark.parametrize("sm, version", [("hopper", "10.9"), ("9.0", "ten"), ("9.0", "../x")])
def test_plan_dir_refuses_odd_names(sm, version):
    with pytest.raises(ValueError, match="bad compute capability"):
        trt_build.plan_dir(sm, version)


def test_target_entry_describes_the_build():
    entry = trt_build.target_entry("NVIDIA H100", "9.0", {"tensorrt": "10.9.0.34", "cuda": "12.8"},
                                   {"decode": "engines/trt-sm90-10.9.0.34/decode.plan"}, "default",
                                   "engines/trt-sm90-10.9.0.34")
    assert entry.backend == "tensorrt" and entry.compute_capability == "9.0"
    assert entry.profile == {"name": "default", "max_batch": 8}
    assert entry.timing_cache == "engines/trt-sm90-10.9.0.34/timing.cache"


# ---------------------------------------------------------------- compatibility


H100 = {"backend": "tensorrt", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "versions": {"tensorrt": "10.9.0.34", "cuda": "12.8"}, "walks": {}}


def test_check_compatible_accepts_the_build_machine():
    trt_runtime.check_compatible(H100, "NVIDIA H100 80GB HBM3", "9.0", "10.9.0.34")


@pytest.mark.parametrize("gpu, cc, version", [
    ("NVIDIA A100-SXM4-80GB", "8.0", "10.9.0.34"),
    ("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35"),
    ("NVIDIA H200", "9.0", "10.9.0.34"),
])  # fmt: skip
def test_check_compatible_refuses_another_gpu_or_tensorrt(gpu, cc, version):
    with pytest.raises(WalkforgeError) as info:
        trt_runtime.check_compatible(H100, gpu, cc, version)
    message = str(info.value)
    assert "\n" not in message
    for part in ("NVIDIA H100 80GB HBM3", "9.0", "10.9.0.34", gpu, cc, version, "walkforge build"):
        assert part in message


CPU = {"backend": "onnxruntime", "versions": {}, "walks": {}}


def test_select_target_picks_the_fitting_build():
    targets = {"cpu": CPU, "trt-sm90-10.9.0.34": H100,
               "trt-sm80-10.9.0.34": {**H100, "gpu": "A100", "compute_capability": "8.0"}}
    key, _ = trt_runtime.select_target(manifest(targets=targets), "A100", "8.0", "10.9.0.34")
    assert key == "trt-sm80-10.9.0.34"
    with pytest.raises(WalkforgeError, match="no TensorRT target"):
        trt_runtime.select_target(manifest(targets={"cpu": CPU}), "A100", "8.0", "10.9")


def test_loop_bodies_are_the_graph_captured_walks():
    plan = ["vision", "prefill", {"loop": "denoise", "count": "num_steps", "carry": {}, "schedule": ""}]
    assert loop_bodies(plan) == {"denoise"}


# ---------------------------------------------------------------- availability without TensorRT


def _hide_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(trt_runtime.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt" else real(name, *a))


def test_probe_names_missing_tensorrt_and_how_to_get_it(monkeypatch):
    _hide_tensorrt(monkeypatch)
    reason = trt_runtime.probe()
    assert reason and "\n" not in reason
    assert "TensorRT is not installed" in reason and "pip install 'walkforge[trt]'" in reason
    assert "NVIDIA GPU" in reason


def test_probe_names_a_missing_gpu_without_importing_tensorrt(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(trt_runtime.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt" else real(name, *a))
    monkeypatch.setattr(trt_runtime.shutil, "which", lambda name: None)
    monkeypatch.setattr(trt_runtime, "_gpu_visible", lambda: False)
    reason = trt_runtime.probe()
    assert "no NVIDIA GPU" in reason
    assert "tensorrt" not in sys.modules


def test_build_trt_without_tensorrt_is_a_user_error_not_import_error(monkeypatch, tmp_path: Path):
    _hide_tensorrt(monkeypatch)
    with pytest.raises(WalkforgeError, match="TensorRT is not installed") as info:
        trt_build.build_trt(tmp_path / "no-bundle")
    assert not isinstance(info.value, ImportError)
    with pytest.raises(WalkforgeError, match="TensorRT is not installed"):
        trt_runtime.load(object(), Options())


# ---------------------------------------------------------------- plugins (pure parts)


def test_kernel_signatures_follow_trt_aot_order_and_wrong_orders_are_refused():
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa
    from walkforge.plugins.trt_plugins import check_abi

    record = {"kernel": "paged_attention_kernel", "arch": "sm_90", "signature": pa.SIGNATURE}
    check_abi(record, 8, 1)  # inputs, int32 scalars, then the output
    rest = {k: v for k, v in pa.SIGNATURE.items() if k != "out_ptr"}
    out_first = {"out_ptr": "*fp32"} | rest
    with pytest.raises(WalkforgeError, match="TensorRT's AOT calling convention.*out_ptr:\\*fp32, q_ptr"):
        check_abi({**record, "signature": out_first}, 8, 1)
    check_abi({"kernel": "kv_cache_write_kernel", "signature": kvw.SIGNATURE}, 6, 1, aliased=1)
    with pytest.raises(WalkforgeError):  # a non-aliased output must have its pointer
        check_abi({"kernel": "kv_cache_write_kernel", "signature": kvw.SIGNATURE}, 6, 1)


def test_kernel_record_names_the_archs_it_has():
    from walkforge.plugins.trt_plugins import kernel_record

    kernel = "paged_attention_kernel"
    records = [{"kernel": kernel, "arch": "sm_80"}, {"kernel": kernel, "arch": "sm_89"}]
    assert kernel_record(records, kernel, "sm_89")["arch"] == "sm_89"
    with pytest.raises(WalkforgeError, match=f"no AOT kernel '{kernel}' for sm_90 .has: sm_80, sm_89"):
        kernel_record(records, kernel, "sm_90")


def test_register_plugins_falls_back_to_the_onnx_body_without_tensorrt(tmp_path: Path):
    from walkforge.plugins.trt_plugins import register_plugins

    node = helper.make_node("PagedAttention", ["q"], ["out"], domain=DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE)
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("q", "out")]
    graph = helper.make_graph([node], "denoise", value[:1], value[1:])
    (tmp_path / "walks").mkdir()
    onnx.save(helper.make_model(graph), str(tmp_path / "walks" / "denoise.onnx"))
    walk = {"onnx": "walks/denoise.onnx", "inputs": [], "outputs": []}
    status = register_plugins(tmp_path, manifest(walks={"denoise": walk}, kernels=[]), arch="sm_90")
    assert list(status) == ["PagedAttention"] and status["PagedAttention"].startswith("onnx-function")
    assert "no AOT kernel" in status["PagedAttention"]
    assert "tensorrt" not in sys.modules


# ---------------------------------------------------------------- on a TensorRT machine


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
def test_build_and_run_vae_on_tensorrt(tiny_bundle_copy: Path):
    import numpy as np

    from walkforge.artifacts.bundle import Bundle
    from walkforge.runtimes import to_numpy, walk_engine

    reason = trt_runtime.probe()
    if reason:
        pytest.skip(reason)
    entry = trt_build.build_trt(tiny_bundle_copy, profile="single")
    bundle = Bundle.open(tiny_bundle_copy)  # hashes of the new engines verified
    assert entry in bundle.manifest["targets"].values()
    assert (tiny_bundle_copy / entry["timing_cache"]).is_file()
    engines = trt_runtime.load(bundle, Options())
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = engines["decode"].run({"latents": latents})["sample"].cpu().numpy()
    walk = bundle.walk("decode")
    cpu = walk_engine("decode", bundle.path(walk["onnx"]), walk)
    want = to_numpy(cpu.run({"latents": latents})["sample"])
    assert rel_err(got, want) <= TRT_VS_CPU_TOL
