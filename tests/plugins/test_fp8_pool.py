"""FP8 (E4M3) page pools: the eager ops vs float64 references, the ONNX fp8 bodies on onnxruntime
(pool carried as UINT8 bytes, written in place) vs the eager ops, and the fp8-pool AOT kernels."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from plugin_cases import (
    ALL_CASES,
    case_tol,
    dense_attention,
    dense_kv_write,
    dequantize,
    fp8_pool,
    make_inputs,
)
from test_onnx_export import EXAMPLE, _walk
from tolerances import cosine, rel_err
from walk_module import INPUT_NAMES, OUTPUT_NAMES

from walkforge.plugins import attach_functions, fp8_kv_pool, pool_is_fp8
from walkforge.plugins.aot import compile_kernels
from walkforge.plugins.kv_cache_write import kv_cache_write
from walkforge.plugins.paged_attention import paged_attention

COSINE = 0.999  # fp8 pool vs the unquantised float64 reference: measured ≥ 0.99944 (rel err 2-5e-2)
# attention over the fp8 pool vs fp32/float64 attention over its dequantised values: `case_tol`,
# the fp32 attention tolerance; a dequantisation that missed the scale or rounded again to fp8 fails it
E4M3_HALF_STEP = 2.0**-4  # relative rounding bound of a normal E4M3 value: 3 mantissa bits, steps 2**-3
CASES = [c for c in ALL_CASES if c.seq == 51] + [ALL_CASES[0]]


def fp8_inputs(case) -> dict:
    x = make_inputs(case)
    return x | {"pool": fp8_pool(x["pool"], x["kv_scales"]), "pool_fp32": x["pool"]}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fp8_write_is_the_float64_write_rounded_to_e4m3(case):
    x = fp8_inputs(case)
    args = (x["k_all"], x["v_all"], x["block_table"], x["positions"])
    out = kv_cache_write(x["pool"], *args, x["kv_scales"])
    assert out.dtype == torch.float8_e4m3fn and out.element_size() == 1
    k, v = (t.double() for t in args[:2])
    expected = dense_kv_write(dequantize(x["pool"], x["kv_scales"]), k, v, *args[2:])
    got = dequantize(out, x["kv_scales"])
    step = 2.0 ** -9 * x["kv_scales"].double().reshape(-1, 2, 1, 1, 1, 1)  # smallest subnormal, scaled
    assert ((got - expected).abs() <= expected.abs() * E4M3_HALF_STEP + step / 2).all()  # half an E4M3 step
    assert cosine(got, expected) >= COSINE
    assert torch.equal(x["pool"], fp8_inputs(case)["pool"])  # functional: the input is untouched


def test_fp8_write_matches_torch_conversion_bytewise():
    x = fp8_inputs(ALL_CASES[-1])
    out = kv_cache_write(x["pool"], x["k_all"], x["v_all"], x["block_table"], x["positions"], x["kv_scales"])
    b, s = 1, 3
    page_size = out.shape[3]
    pos = int(x["positions"][b, s])
    page = int(x["block_table"][b, pos // page_size])
    want = (x["k_all"][:, b, :, s] / x["kv_scales"][:, :1, None]).to(torch.float8_e4m3fn)  # [L, KVH, D]
    assert torch.equal(out[:, 0, page, pos % page_size].view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fp8_attention_reads_pages_times_scale(case):
    x = fp8_inputs(case)
    layer = x["layer"]
    args = (x["q"], x["k_all"][layer], x["v_all"][layer])
    rest = (x["block_table"], x["prefix_lens"], x["suffix_mask"], layer, x["scale"])
    out = paged_attention(*args, x["pool"], *rest, x["kv_scales"])
    dequantized = dequantize(x["pool"], x["kv_scales"]).float()
    assert rel_err(out, dense_attention(*args, dequantized, *rest)) <= case_tol(case)
    assert cosine(out, dense_attention(*args, x["pool_fp32"], *rest)) >= COSINE


def test_fp8_pool_needs_scales():
    x = fp8_inputs(ALL_CASES[0])
    with pytest.raises(ValueError, match=r"fp8 KV pool needs kv_scales \[2, 2\]"):
        kv_cache_write(x["pool"], x["k_all"], x["v_all"], x["block_table"], x["positions"])


def test_float32_pool_ignores_scales():
    x = make_inputs(ALL_CASES[-1])
    args = (x["pool"], x["k_all"], x["v_all"], x["block_table"], x["positions"])
    assert torch.equal(kv_cache_write(*args, x["kv_scales"] * 7), kv_cache_write(*args))


# ---------------------------------------------------------------- ONNX / onnxruntime


@pytest.fixture(scope="module")
def fp8_model() -> tuple[onnx.ModelProto, dict]:
    """TinyWalk exported with a float32 pool, then `fp8_kv_pool`: UINT8 pool, fp8 bodies."""
    x = make_inputs(EXAMPLE)
    from test_onnx_export import DYNAMIC

    from walkforge.plugins import translation_table

    program = torch.onnx.export(
        _walk(), tuple(x[n] for n in INPUT_NAMES), dynamo=True, custom_translation_table=translation_table(),
        input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_shapes=DYNAMIC,
    )  # fmt: skip
    model, _ = attach_functions(program.model_proto)
    model, counts = fp8_kv_pool(model)
    return onnx.load_from_string(model.SerializeToString()), counts


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_fp8_pass_retypes_pool_to_bytes_and_swaps_bodies(fp8_model):
    model, counts = fp8_model
    assert counts == {"kv_pool_fp8": 2}  # graph input "pool" and output "pool_out"
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert types["pool"] == types["pool_out"] == onnx.TensorProto.UINT8 and pool_is_fp8(model)
    ops = {n.op_type for f in model.functions for n in f.node}
    assert "ScatterND" in ops and {"Cast", "Log"} <= ops  # the encoder is in the KVCacheWrite body
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_onnxruntime_fp8_bodies_match_eager(fp8_model, case):
    x = fp8_inputs(case)
    out, pool = _walk()(*(x[n] for n in INPUT_NAMES))
    feeds = {n: x[n].numpy() for n in INPUT_NAMES if n != "pool"}
    feeds["pool"] = x["pool"].view(torch.uint8).numpy()
    ort_out, ort_pool = _session(fp8_model[0]).run(OUTPUT_NAMES, feeds)
    assert ort_pool.dtype == np.uint8
    assert np.array_equal(ort_pool, pool.view(torch.uint8).numpy())  # the same E4M3 bytes
    assert rel_err(ort_out, out) <= case_tol(case)  # the same bytes, then fp32 attention: MLAS vs torch


def test_fp8_pool_buffer_is_written_in_place(fp8_model):
    """An ml_dtypes float8 buffer (1 byte/element) bound through its uint8 view as input and output."""
    x = fp8_inputs(ALL_CASES[-1])
    _, expected = _walk()(*(x[n] for n in INPUT_NAMES))
    buffer = x["pool"].view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).copy()
    assert buffer.itemsize == 1
    value = ort.OrtValue.ortvalue_from_numpy(buffer.view(np.uint8))
    session = _session(fp8_model[0])
    binding = session.io_binding()
    binding.bind_ortvalue_input("pool", value)
    for name in INPUT_NAMES[1:]:
        binding.bind_cpu_input(name, x[name].numpy())
    binding.bind_ortvalue_output("pool_out", value)
    binding.bind_output("out")
    session.run_with_iobinding(binding)
    assert binding.get_outputs()[0].data_ptr() == value.data_ptr() == buffer.ctypes.data
    assert np.array_equal(buffer.view(np.uint8), expected.view(torch.uint8).numpy())


def test_fp8_bodies_need_opset_19():
    node = onnx.helper.make_node("PagedAttention", ["q", "k", "v", "pool"], ["y"], domain="walkforge")
    pool = onnx.helper.make_tensor_value_info("pool", onnx.TensorProto.UINT8, [1])
    inputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "qkv"] + [pool]
    graph = onnx.helper.make_graph([node], "g", inputs, [onnx.helper.make_tensor_value_info("y", 1, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(ValueError, match="opset >= 19"):
        attach_functions(model)


# ---------------------------------------------------------------- AOT


def test_fp8_pool_kernels_compile_for_ada_and_hopper_only():
    records = compile_kernels(("sm_80", "sm_89", "sm_90"), num_heads=8, kv_heads=1, head_dim=256,
                              pool_dtype="float8_e4m3fn")  # fmt: skip
    assert [(r["kernel"], r["arch"]) for r in records] == [
        ("kv_cache_write_kernel_fp8", "sm_89"), ("paged_attention_kernel_fp8", "sm_89"),
        ("kv_cache_write_kernel_fp8", "sm_90"), ("paged_attention_kernel_fp8", "sm_90"),
    ]  # fmt: skip
    for record in records:
        signature = record["signature"]
        assert signature["pool_ptr"] == "*fp8e4nv" and signature["kv_scales_ptr"] == "*fp32"
        assert "e4m3" in record["ptx"] and record["cubin"][:4] == b"\x7fELF"
