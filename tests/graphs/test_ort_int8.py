"""int8 GEMMs on onnxruntime's CPU kernels are exact on every x86 CPU (graphs.ort.int8_pairs_saturate)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from walkforge.graphs.fp8 import int8_weight_max
from walkforge.graphs.ort import PAIR_SAFE_WEIGHT_MAX, int8_pairs_saturate, session_kwargs, session_options


def _qdq_matmul(weights_q: np.ndarray, w_scale: np.ndarray, a_scale: float) -> bytes:
    """x → Q → DQ (symmetric int8, per tensor) @ DQ(weights, per channel): the int8 pass's form."""
    k, n = weights_q.shape
    inits = [numpy_helper.from_array(weights_q, "wq"), numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wzp"),
             numpy_helper.from_array(np.array(a_scale, np.float32), "as"),
             numpy_helper.from_array(np.array(0, np.int8), "azp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "as", "azp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "as", "azp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


def _gemm(weight_levels: list[int], **options) -> tuple[np.ndarray, np.ndarray]:
    """An int8 GEMM with activations at ±127 and weights drawn from `weight_levels` on this CPU's
    onnxruntime kernels (`options`: session_options'), and the exact result."""
    rng = np.random.default_rng(0)
    k, n, a_scale = 256, 64, 0.01
    weights_q = rng.choice(np.array(weight_levels, np.int8), size=(k, n))
    w_scale = rng.uniform(0.5, 2.0, n).astype(np.float32) / 127
    x_q = rng.choice(np.array([127, -127, 120, 5], np.int32), size=(8, k))
    session = ort.InferenceSession(_qdq_matmul(weights_q, w_scale, a_scale),
                                   session_options(threads=1, fuse_qdq=True, **options),
                                   **session_kwargs(["CPUExecutionProvider"], fuse_qdq=True))
    got = session.run(None, {"x": (x_q * a_scale).astype(np.float32)})[0]
    return got, (x_q.astype(np.int64) @ weights_q.astype(np.int64)) * (np.float64(a_scale) * w_scale)


# Every int8 product is an integer, so a GEMM must equal the int64 sum times the two scales, to
# one fp32 rounding of the scaling.
EXACT_RTOL = 4 * np.finfo(np.float32).eps


def test_full_range_int8_gemm_is_exact_on_this_cpu() -> None:
    """Activations and weights at ±127: on AVX2 without VNNI a u8×s8 pair of products sums to
    2·255·127 > 32767 and clamps (vpmaddubsw): without the exact-kernel option every output is
    wrong here, by up to 28× its own size (AMD EPYC, AVX2)."""
    np.testing.assert_allclose(*_gemm([-127, 127, 126, -126]), rtol=EXACT_RTOL, atol=0)


def test_seven_bit_weights_are_exact_on_the_fast_kernels() -> None:
    """Weights at ±63 (--int8-weight-bits 7) never need the exact-kernel option: a
    pair of products stays within int16 (2·255·63 < 32767), so the u8×s8 kernels every x86 CPU
    runs here are exact."""
    top = int(int8_weight_max(7))
    assert top <= PAIR_SAFE_WEIGHT_MAX < int8_weight_max(8)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        session_options(fuse_qdq=True, int8_weight_max=top).get_session_config_entry(
            "session.x64quantprecision")
    np.testing.assert_allclose(*_gemm([-top, top, top - 1, -top + 1], int8_weight_max=top),
                               rtol=EXACT_RTOL, atol=0)


@pytest.mark.parametrize(("flags", "saturates"), [
    (frozenset({"avx2", "fma"}), True),                        # AMD Zen 3, Intel Haswell–Skylake client
    (frozenset({"avx2", "avx512f"}), True),                    # Skylake-SP: AVX-512 without VNNI
    (frozenset({"avx2", "avx512f", "avx512_vnni"}), False),    # Cascade Lake and later, Zen 4
    (frozenset({"avx2", "avx_vnni"}), False),                  # Alder Lake client
    (frozenset({"avx2", "amx_int8", "avx512_vnni"}), False),   # Sapphire Rapids
])
def test_saturation_is_told_from_the_cpu_flags(monkeypatch, flags, saturates) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert int8_pairs_saturate(flags) is saturates
    assert int8_pairs_saturate(flags, weight_max=int8_weight_max(7)) is False  # 7-bit weights
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert int8_pairs_saturate(flags) is False  # ARM's int8 dot products sum in int32


def test_exact_kernels_are_asked_for_int8_sessions_only_where_pairs_saturate(monkeypatch) -> None:
    key = "session.x64quantprecision"
    monkeypatch.setattr("walkforge.graphs.ort.int8_pairs_saturate", lambda **_: True)
    assert session_options(fuse_qdq=True).get_session_config_entry(key) == "1"
    for fuse_qdq, saturate in ((False, True), (True, False)):
        monkeypatch.setattr("walkforge.graphs.ort.int8_pairs_saturate", lambda s=saturate, **_: s)
        with pytest.raises(RuntimeError, match="does not have configuration"):
            session_options(fuse_qdq=fuse_qdq).get_session_config_entry(key)
