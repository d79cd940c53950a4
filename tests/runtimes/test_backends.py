"""Backend selection (runs on CPU), the gpu_check script's pure helpers, and the CUDA backends
(marked gpu: skipped with a reason where no CUDA device is visible)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from walkforge.errors import WalkforgeError
from walkforge.runtimes import backends
from walkforge.runtimes.backends import available_backends, probe, resolve_backend

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gc = _load_gpu_check()


# ---------------------------------------------------------------- selection


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
def test_auto_picks_cpu_here_with_a_reason():
    choice, reason = resolve_backend("auto")
    assert choice == "cpu"
    assert reason.startswith("auto chose cpu") and "not trt" in reason and "not torch-cuda" in reason
    assert available_backends() == ["cpu", "torch"]


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

    monkeypatch.setattr(backends, "cuda_device", refuse)
    monkeypatch.setattr(backends, "onnxruntime_cuda", refuse)
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
    manifest = {"targets": {"cpu": {"backend": "onnxruntime"}}}
    choice, reason = resolve_backend("auto", manifest)
    assert choice == "cuda" and "bundle has no TensorRT target" in reason


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(WalkforgeError, match="unknown backend 'tpu'; choose one of cpu, torch, torch-cuda"):
        resolve_backend("tpu")


def test_runner_resolves_auto(tiny_bundle):
    from walkforge.runtimes.front import load

    if HAS_CUDA:
        pytest.skip("auto picks a GPU backend here")
    runner = load(tiny_bundle, "auto")
    assert runner.backend == "cpu"
    with pytest.raises(WalkforgeError, match="backend 'cuda' needs onnxruntime-gpu"):
        load(tiny_bundle, "cuda")


# ---------------------------------------------------------------- gpu_check helpers


def test_paged_attention_bytes_counts_pages_suffix_q_and_out():
    # 816 prefix tokens x 1 KV head x 256 x (K, V); suffix K/V 51 tokens; q and out 8 heads x 51
    expected = (2 * 816 * 256 + 2 * 51 * 256 + 2 * 8 * 51 * 256) * 4
    assert gc.paged_attention_bytes(1, 8, 1, 51, 256, 816) == expected
    assert gc.paged_attention_bytes(4, 8, 1, 51, 256, 4 * 816) == 4 * expected
    assert gc.bandwidth_gbs(3_000_000, 0.001) == pytest.approx(3000.0)


def test_eval_grid_evaluates_the_plugin_rules():
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa

    assert gc.eval_grid(kvw.GRID_RULE, {"k": (18, 2, 1, 816, 256)}, {}) == (816, 2, 1)
    config = pa.launch_config(8, 1, 256, 16, 256**-0.5)
    assert gc.eval_grid(pa.GRID_RULE, {"q": (4, 8, 51, 256)}, config) == (4, 8, 4)  # cdiv(51, 16)
    assert gc.eval_grid("(X * 2 - 1, 3): X = t.shape[-1]", {"t": (5, 7)}, {}) == (13, 3, 1)
    with pytest.raises(ValueError, match="unsupported grid expression"):
        gc.eval_grid("(__import__('os'),): X = t.shape[0]", {"t": (1,)}, {})


def test_format_table_aligns_columns_and_cuts_long_details():
    rows = [gc.Row("a", "kv_write", "ok", "max err 0", "x" * 200), gc.Row("c", "B=8", "FAIL", "1 ms")]
    lines = gc.format_table(rows, width=20).splitlines()
    assert len(lines) == 4 and lines[0].split() == ["sec", "item", "status", "value", "detail"]
    assert lines[2].index("ok") == lines[3].index("FAIL") == lines[0].index("status")
    assert lines[2].endswith("x" * 19 + "…")


def test_parity_and_output_helpers():
    a = np.array([1.0, 2.0, 3.0])
    assert gc.cosine(a, 2 * a) == pytest.approx(1.0) and gc.max_abs(a, a + 0.5) == 0.5
    assert gc.within(0.0, 0.0) == "ok" and gc.within(1e-3, 1e-4) == "FAIL"
    assert gc.output_path(None, {"OUT": "/o"}) == Path("/o/gpu-check.json")
    assert gc.output_path(None, {}) == ROOT / "build" / "gpu-check.json"


def test_sdpa_baseline_matches_the_reference_op():
    from walkforge.plugins import paged_attention as pa

    x = gc.pi0_inputs(2, (816, 300), layers=1, room_for_suffix=False)
    args = gc.attention_args(x)
    torch.testing.assert_close(gc.sdpa_reference(*args), pa.paged_attention(*args), atol=1e-4, rtol=1e-4)


def test_aot_arguments_cover_each_signature_and_match_the_launch_grid():
    """What launch_aot passes, checked on CPU tensors: every signature name has a value of its
    kind and the grid rule gives the grid the Triton launcher uses."""
    from walkforge.plugins import aot
    from walkforge.plugins import paged_attention as pa

    x = gc.pi0_inputs(2, (816, 333))
    kernels = {"kv_cache_write_kernel": (aot.KV_CACHE_WRITE_SIGNATURE, "(S, B, 1): S = k.shape[3], "
                                         "B = k.shape[1]", {}),
               "paged_attention_kernel": (aot.PAGED_ATTENTION_SIGNATURE, pa.GRID_RULE,
                                          pa.launch_config(8, 1, 256, 16, 256**-0.5))}  # fmt: skip
    for kernel, (signature, rule, constexprs) in kernels.items():
        values, shapes, _ = gc.aot_values(kernel, x, device="cpu")
        args = [gc.c_arg(values[name.removesuffix("_ptr")], kind) for name, kind in signature.items()]
        assert len(args) == len(signature)
        assert gc.eval_grid(rule, shapes, constexprs) == ((51, 2, 1) if "kv" in kernel else (4, 8, 2))


def test_run_pi0_chain_matches_sample_actions():
    """The script's stand-in for Pi0Policy.infer, on CPU torch engines of tiny pi0."""
    from walkforge.plugins.constants import PAGE_SIZE
    from walkforge.recipes import pi0
    from walkforge.runtimes.chain import Chain
    from walkforge.runtimes.kv_pool import KVPagePool
    from walkforge.runtimes.torch_backend import TorchEngine

    cfg = pi0.VARIANTS["tiny"]
    torch.manual_seed(0)
    model = pi0.build(cfg).eval()
    walks = pi0.walks(model, cfg)
    chain = Chain({n.name: TorchEngine(n) for n in walks.nodes}, walks.plan())
    feeds = pi0.fake_inputs(cfg, batch=2, seed=3)
    pages = 2 * -(-cfg.prefix_len // PAGE_SIZE)
    pool = KVPagePool(cfg.llm.layers, cfg.llm.kv_heads, cfg.llm.head_dim, PAGE_SIZE, pages)
    actions = gc.run_pi0_chain(chain, cfg, feeds, pool)
    with torch.inference_mode():
        expected = model.sample_actions(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    torch.testing.assert_close(actions, expected, atol=1e-4, rtol=1e-4)
    assert pool.free_pages == pages


# ---------------------------------------------------------------- CUDA backend pieces testable on CPU


def test_cuda_kernels_register_for_cuda_and_leave_cpu_on_the_reference():
    from walkforge.runtimes.cuda import register_cuda_kernels

    register_cuda_kernels()
    register_cuda_kernels()  # idempotent
    for op in ("walkforge::paged_attention", "walkforge::kv_cache_write"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    x = gc.pi0_inputs(1, (40,), layers=1)
    from walkforge.plugins import paged_attention as pa

    out = torch.ops.walkforge.paged_attention(*gc.attention_args(x))  # CPU: the eager reference
    torch.testing.assert_close(out, pa.paged_attention(*gc.attention_args(x)))


def test_device_buffers_upload_a_resident_host_buffer_once():
    from walkforge.graphs.walk import TensorSpec
    from walkforge.runtimes.cuda import DeviceBuffers

    buffers = DeviceBuffers(["kv_pool"], device="cpu")
    pool_spec, x_spec = TensorSpec("kv_pool", "float32", (4,)), TensorSpec("x_t", "float32", (4,))
    host = np.zeros(4, np.float32)
    resident = buffers.get(pool_spec, host)
    assert buffers.get(pool_spec, host) is resident
    assert buffers.get(pool_spec, np.zeros(4, np.float32)) is not resident
    assert buffers.get(pool_spec, resident) is resident  # already on the device
    assert buffers.get(x_spec, host) is not buffers.get(x_spec, host)  # not resident: as given
    assert buffers.store(resident, torch.ones(4)) is resident and resident.sum() == 4
    with pytest.raises(WalkforgeError, match="kv_pool: expected float32"):
        buffers.get(pool_spec, np.zeros(4, np.int64))


def test_cuda_kernel_wrappers_under_the_triton_interpreter():
    """The CUDA kernels' dtype handling (bf16 q/k/v, float32 pool), run on CPU by Triton's
    interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported)."""
    script = textwrap.dedent("""
        import json, os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        from plugin_cases import Case, make_inputs
        from walkforge.plugins import kv_cache_write as kvw, paged_attention as pa
        from walkforge.runtimes import cuda
        x = make_inputs(Case(16, 1, 16, 51, 4))
        layer = x["layer"]
        args = (x["q"], x["k_all"][layer], x["v_all"][layer], x["pool"], x["block_table"],
                x["prefix_lens"], x["suffix_mask"], layer, x["scale"])
        ref = pa.paged_attention(*args)
        bf = [a.bfloat16() if torch.is_tensor(a) and a.is_floating_point() and i < 3 else a
              for i, a in enumerate(args)]
        out = cuda._paged_attention_cuda(*bf)
        kv = (x["k_all"], x["v_all"], x["block_table"], x["positions"])
        pool = cuda._kv_cache_write_cuda(x["pool"], x["k_all"].bfloat16(), x["v_all"].bfloat16(), *kv[2:])
        ref_pool = kvw.kv_cache_write(x["pool"], x["k_all"].bfloat16().float(),
                                      x["v_all"].bfloat16().float(), *kv[2:])
        print(json.dumps({"dtype": str(out.dtype), "attention": (out.float() - ref).abs().max().item(),
                          "kv_write": (pool - ref_pool).abs().max().item(),
                          "pool_untouched": bool(torch.equal(x["pool"], make_inputs(Case(16, 1, 16, 51, 4))["pool"]))}))
    """)  # noqa: E501
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "plugins"), *sys.path])}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16" and got["attention"] < 3e-2
    assert got["kv_write"] == 0.0 and got["pool_untouched"]


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("case_id", ["ps16-kvh1-d256-s51-b4", "ps8-kvh2-d16-s1-b1"])
def test_triton_kernels_on_cuda_match_the_reference(case_id):
    from plugin_cases import ALL_CASES, make_inputs

    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa

    x = make_inputs(next(c for c in ALL_CASES if c.id == case_id))
    pool = kvw.kv_cache_write_triton(*gc.kv_args(x, "cuda"))
    assert torch.equal(pool.cpu(), kvw.kv_cache_write(*gc.kv_args(x)))
    out = pa.paged_attention_triton(*gc.attention_args(x, "cuda"))
    torch.testing.assert_close(out.cpu(), pa.paged_attention(*gc.attention_args(x)), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_torch_cuda_engines_match_the_fp32_reference_on_tiny_pi0(tiny_pi0_bundle):
    import walkforge
    from walkforge.artifacts.bundle import Bundle
    from walkforge.runtimes.inputs import example_inputs

    feeds = example_inputs(Bundle.open(tiny_pi0_bundle), batch=2, seed=1)
    ref = walkforge.load(tiny_pi0_bundle, "torch").run(feeds)["actions"]
    runner = walkforge.load(tiny_pi0_bundle, "torch-cuda")
    first, second = runner.run(feeds)["actions"], runner.run(feeds)["actions"]  # second: graph replay
    assert gc.cosine(first, ref) > 0.98 and np.array_equal(first, second)


@pytest.fixture(scope="module")
def tiny_pi0_bundle(tmp_path_factory):
    from walkforge.compiler.pipeline import CompileRequest, compile_bundle

    out = tmp_path_factory.mktemp("pi0") / "pi0-tiny"
    compile_bundle(CompileRequest("pi0", out, variant="tiny", seed=0))
    return out
