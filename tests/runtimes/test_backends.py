"""Backend selection and the CUDA backends' pieces that run on CPU (the GPU checks themselves
are tests/gpu, marked gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import BF16_EPS

from walkforge.errors import WalkforgeError
from walkforge.runtimes import backends
from walkforge.runtimes.backends import _cuda, available_backends, probe
from walkforge.runtimes.backends import resolve as resolve_backend

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
# rel_err of attention on bf16 q/k/v vs the fp32 reference: q, k, v and the output each rounded once
# to bf16 (≤ 2**-8 relative), logit errors scaled by the logits (measured 0.96·2**-8); K/V rounded
# to fp8 instead moves it by 2-5e-2. The kv_write copies bf16 values into fp32 pages: exact anywhere
BF16_ATTENTION_TOL = 2 * BF16_EPS


# ---------------------------------------------------------------- selection


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
def test_auto_picks_cpu_here_with_a_reason():
    choice, reason = resolve_backend("auto")
    assert choice == "cpu"
    assert reason.startswith("auto chose cpu") and "not trt" in reason and "not torch-cuda" in reason
    assert available_backends() == ["cpu", "torch", "torch-bf16"]


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
@pytest.mark.parametrize(("name", "missing"), [
    ("cuda", "needs onnxruntime-gpu with CUDAExecutionProvider"),
    ("trt", "TensorRT"),
    ("torch-cuda", "no CUDA device"),
])  # fmt: skip
def test_explicit_gpu_backend_names_what_is_missing(name, missing):
    with pytest.raises(WalkforgeError) as info:
        resolve_backend(name)
    message = str(info.value)
    assert f"backend '{name}'" in message and missing in message and "\n" not in message


def test_cuda_names_the_providers_onnxruntime_has(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    ok, reason = probe("cuda")
    assert not ok
    assert reason == (f"backend 'cuda' needs onnxruntime-gpu with CUDAExecutionProvider; this onnxruntime "
                      f"{ort.__version__} has CPUExecutionProvider only")


def test_torch_cuda_says_when_torch_sees_no_device(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe("torch-cuda") == (False, "backend 'torch-cuda' found no CUDA device: "
                                          "torch.cuda.is_available() is False")


def test_cpu_and_torch_probe_nothing(monkeypatch):
    def refuse(*_args):
        raise AssertionError("probed a device for a CPU backend")

    monkeypatch.setattr(_cuda, "cuda_device", refuse)
    monkeypatch.setattr(_cuda, "onnxruntime_cuda", refuse)
    assert resolve_backend("cpu") == ("cpu", "requested")
    assert resolve_backend("torch") == ("torch", "requested")


def test_auto_prefers_trt_then_cuda_then_torch_cuda(monkeypatch):
    able = {"trt": False, "cuda": True, "torch-cuda": True, "cpu": True}
    monkeypatch.setattr(backends, "probe", lambda name: (able[name], "" if able[name] else "absent"))
    assert resolve_backend("auto")[0] == "cuda"
    able["cuda"] = False
    choice, reason = resolve_backend("auto")
    assert choice == "torch-cuda" and "not trt: absent" in reason and "not cuda: absent" in reason


def test_auto_skips_a_backend_the_bundle_has_no_target_for(monkeypatch):
    monkeypatch.setattr(backends, "probe", lambda name: (True, ""))
    manifest = {  # a compiled bundle's manifest, less what target choice never reads
        "walkforge_version": "0", "created": "", "recipe": "vae", "variant": "tiny", "config": {},
        "weights": {"fingerprint": "", "source": "random"}, "front": "vae", "dim_ranges": {},
        "precision": {"weights": "fp32", "activations": "fp32", "kv": "fp32", "calibration": None},
        "walks": {}, "plan": [], "targets": {"cpu": {"backend": "onnxruntime", "versions": {}, "walks": {}}}}
    choice, reason = resolve_backend("auto", manifest)
    assert choice == "cuda" and "bundle has no TensorRT target" in reason


def test_every_registered_backend_is_one_package_with_the_whole_interface():
    from walkforge.runtimes.backends.base import MEMBERS, Backend

    declared = {*Backend.__annotations__, *(n for n, v in vars(Backend).items()
                                             if callable(v) and not n.startswith("_"))}
    assert set(MEMBERS) == declared  # the error's list of missing members names every member
    for name in backends.REGISTRY:
        impl = backends.get(name)
        assert isinstance(impl, Backend), f"{name} is not a Backend"
        assert name == impl.NAME and isinstance(impl.AUTO, bool)
        for fn in ("probe", "has_target", "load", "allocate_pool"):
            assert callable(getattr(impl, fn)), f"{name} lacks {fn}"
        assert isinstance(impl.probe(), str)  # builds nothing, says what is missing
    assert not backends.get("torch").AUTO  # the reference is never auto-chosen


def test_registry_refuses_a_module_that_is_not_a_backend(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "half", "walkforge.runtimes.backends.base")  # no NAME, no load
    with pytest.raises(TypeError, match=r"backend 'half' .* is not a Backend: it lacks \['NAME', 'AUTO',"):
        backends.get("half")


def test_cpu_pool_is_host_memory_the_engines_bind_in_place():
    from walkforge.runtimes.kv_pool import PoolSpec

    buffer = backends.get("cpu").allocate_pool(PoolSpec(2, 1, 8, 4, 3, "float8_e4m3fn"))
    assert buffer.shape == (2, 2, 3, 4, 1, 8) and buffer.itemsize == 1 and not buffer.view(np.uint8).any()


def test_unknown_backend_lists_the_known_ones():
    known = "trt, cuda, torch-cuda, cpu, torch, torch-bf16, auto"
    with pytest.raises(WalkforgeError, match=f"unknown backend 'tpu'; choose one of {known}"):
        resolve_backend("tpu")


def test_runner_resolves_auto(tiny_bundle):
    from walkforge.runtimes import load

    if HAS_CUDA:
        pytest.skip("auto picks a GPU backend here")
    runner = load(tiny_bundle, "auto")
    assert runner.backend == "cpu"
    with pytest.raises(WalkforgeError, match="backend 'cuda' needs onnxruntime-gpu"):
        load(tiny_bundle, "cuda")


# ---------------------------------------------------------------- CUDA backend pieces testable on CPU


def test_values_pass_device_tensors_uncopied_and_name_a_wrong_dtype():
    """What every GPU backend binds through `values.to_torch` (on CPU tensors here): a tensor
    already where it should be is the same object, an fp8 host pool becomes a float8 view of the
    same bytes, a wrong dtype is a one-line error naming the input."""
    import ml_dtypes

    from walkforge.runtimes.values import to_numpy, to_torch

    resident = torch.zeros(4)
    assert to_torch(resident, "float32", "cpu", "kv_pool") is resident
    host = np.zeros(4, ml_dtypes.float8_e4m3fn)
    view = to_torch(host, "float8_e4m3fn", "cpu", "kv_pool")
    assert view.dtype == torch.float8_e4m3fn and view.data_ptr() == host.ctypes.data
    assert to_numpy(view).dtype == ml_dtypes.float8_e4m3fn
    with pytest.raises(WalkforgeError, match="kv_pool: expected float32, got torch.int64"):
        to_torch(np.zeros(4, np.int64), "float32", "cpu", "kv_pool")


def test_cuda_kernel_wrappers_under_the_triton_interpreter():
    """The CUDA kernels' dtype handling (bf16 q/k/v, float32 pool), run on CPU by Triton's
    interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported)."""
    script = textwrap.dedent("""
        import json, os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        from plugin_cases import Case, make_inputs
        from tolerances import rel_err
        from walkforge.plugins import kv_cache_write as kvw, paged_attention as pa
        x = make_inputs(Case(16, 1, 16, 51, 4))
        layer = x["layer"]
        args = (x["q"], x["k_all"][layer], x["v_all"][layer], x["pool"], x["block_table"],
                x["prefix_lens"], x["suffix_mask"], layer, x["scale"])
        ref = pa.paged_attention(*args)
        bf = [a.bfloat16() if torch.is_tensor(a) and a.is_floating_point() and i < 3 else a
              for i, a in enumerate(args)]
        out = pa._paged_attention_cuda(*bf)
        kv = (x["k_all"], x["v_all"], x["block_table"], x["positions"])
        pool = kvw._kv_cache_write_cuda(x["pool"], x["k_all"].bfloat16(), x["v_all"].bfloat16(), *kv[2:])
        ref_pool = kvw.kv_cache_write(x["pool"], x["k_all"].bfloat16().float(),
                                      x["v_all"].bfloat16().float(), *kv[2:])
        print(json.dumps({"dtype": str(out.dtype), "attention": rel_err(out, ref),
                          "kv_write": (pool - ref_pool).abs().max().item(),
                          "pool_untouched": bool(torch.equal(x["pool"], make_inputs(Case(16, 1, 16, 51, 4))["pool"]))}))
    """)  # noqa: E501
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "plugins"), *sys.path])}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16" and got["attention"] <= BF16_ATTENTION_TOL
    assert got["kv_write"] == 0.0 and got["pool_untouched"]


def test_arena_is_off_only_where_image_sizes_vary() -> None:
    """onnxruntime's arena keeps a block per shape it has seen: off for walks sized by the image
    (the VAE, BAGEL's grid), on for pi0's, whose views and prompt length take one bounded value
    per run (without it prefill re-faulted its activations on every call)."""
    from walkforge.graphs.ort import varying_shapes
    from walkforge.graphs.walk import TensorSpec

    assert varying_shapes([TensorSpec("latents", "float32", ("batch", 4, "height", "width"))])
    assert varying_shapes([TensorSpec("x_t", "float32", ("batch", "grid_h", "grid_w", 64))])
    assert not varying_shapes([TensorSpec("image_tokens", "float32", ("batch", "image_tokens", 1024)),
                               TensorSpec("prompt_ids", "int64", ("batch", "prompt_len")),
                               TensorSpec("kv_pool", "float32", (6, 2, "num_pages", 16, 1, 128))])
