"""The Q/DQ pass (FP8, and INT8 at the end) on graphs torch's dynamo exporter emits (conv +
residual MLP, opset 20)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from tolerances import FP32_EPS

from walkforge.compiler.calibrate import collect_amax, per_layer_sensitivity, weight_amax
from walkforge.compiler.check import agreement
from walkforge.compiler.export import export_walk
from walkforge.graphs.fp8 import (
    FP8,
    ORT_DISABLED_OPTIMIZERS,
    fp8_scales,
    module_path,
    qdq_scales,
    quantize_fp8,
    quantize_int8,
    weight_uses,
)
from walkforge.graphs.ort import session_kwargs, session_options
from walkforge.graphs.walk import GraphNode, TensorSpec

COSINE_MIN = 0.999  # fp8 vs fp32 on held-out inputs; residual branches keep the error small
COSINE_MIN_MLP = 0.995  # a plain 3-Linear GELU MLP, no residual: its fp8 errors compound
# E4M3 rounding of a weight w with scale s (amax / 448): |error| ≤ |w|·2**-4 for normal values (3
# mantissa bits), ≤ s·2**-10 for subnormals (2**-9 apart); rounding the scale and the product adds eps
E4M3_HALF_STEP = 2.0**-4
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10
COSINE_MIN_INT8 = 0.999  # int8 (7 bits + sign, uniform) is finer than E4M3 near amax: the same bar
INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
                   "QLinearConv", "QGemm")


class Net(torch.nn.Module):
    """conv_in (first conv) → residual conv → Gemm conditioning → residual MLP → head (last)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.cond = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        h = h + self.conv(torch.relu(h))
        t = h.flatten(2).transpose(1, 2)  # [B, HW, C]
        t = t + self.cond(t.mean(1))[:, None]  # 2-D input: exported as Gemm(transB=1)
        t = t + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(t))))
        return self.head(t)


def samples(n: int, seed: int, batch: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, session_options(spinning=False), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS)).run(None, feeds)[0]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    torch.manual_seed(0)
    node = GraphNode("net", Net().eval(), (TensorSpec("x", "float32", ("batch", 3, 8, 8)),),
                     (TensorSpec("y", "float32", ("batch", 64, 8)),), {"x": torch.randn(2, 3, 8, 8)})
    path = tmp_path_factory.mktemp("fp8") / "net.onnx"
    export_walk(node, path)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def scales(fp32: onnx.ModelProto) -> tuple[dict, dict]:
    return fp8_scales(collect_amax(fp32, samples(8, seed=0))), fp8_scales(weight_amax(fp32))


def quantized(fp32: onnx.ModelProto, scales: tuple[dict, dict], **kw) -> tuple[onnx.ModelProto, dict]:
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    return quantize_fp8(model, *scales, **kw)


def test_counts_and_first_last_skipped(fp32, scales) -> None:
    model, counts = quantized(fp32, scales)
    assert counts == {"quantized_matmul": 2, "quantized_gemm": 1, "quantized_conv": 1, "qdq_pairs": 4,
                      "weights_fp8": 4, "skipped_first_last": 2, "skipped_embedding": 0,
                      "skipped_excluded": 0, "skipped_norms": 1}
    assert [module_path(u.node) for u in weight_uses(model)] == ["conv_in", "head"]  # still fp32


def test_placement_is_what_tensorrt_fuses(fp32, scales) -> None:
    model, _ = quantized(fp32, scales)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
             and n.input[1] not in inits]
    assert len(gemms) == 4
    for node in gemms:
        act_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        assert act_dq.op_type == "DequantizeLinear"
        assert producer[act_dq.input[0]].op_type == "QuantizeLinear"
        assert w_dq.op_type == "DequantizeLinear"
        weight, scale, zero = (inits[name] for name in w_dq.input)
        assert weight.data_type == FP8 and zero.data_type == FP8
        assert len(weight.raw_data) == int(np.prod(weight.dims))  # 1 byte per element
        axis = next(a.i for a in w_dq.attribute if a.name == "axis")
        channels = weight.dims[0] if node.op_type in ("Conv", "Gemm") else weight.dims[1]
        assert axis == (1 if node.op_type == "MatMul" else 0)
        assert list(scale.dims) == [channels] and scale.data_type == onnx.TensorProto.FLOAT
        assert not numpy_helper.to_array(zero).astype(np.float32).any()
    assert max(e.version for e in model.opset_import if e.domain == "") >= 19
    onnx.checker.check_model(model, full_check=True)


def test_weights_round_to_fp8_grid(fp32, scales) -> None:
    model, _ = quantized(fp32, scales)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}["conv.weight"]
    q = inits["conv.weight_fp8"]
    assert q.dtype == ml_dtypes.float8_e4m3fn and "conv.weight" not in inits
    back = q.astype(np.float32) * inits["conv.weight_fp8_scale"][:, None, None, None]
    assert np.abs(back).max() <= np.abs(want).max() * (1 + 2 * FP32_EPS)  # amax maps to 448 exactly
    np.testing.assert_allclose(back, want, rtol=E4M3_HALF_STEP,
                               atol=np.abs(want).max() / 448 * E4M3_SUBNORMAL_HALF_STEP)


def test_onnxruntime_agrees_with_fp32(fp32, scales) -> None:
    model, _ = quantized(fp32, scales)
    for feeds in samples(3, seed=123, batch=3):
        want, got = run(fp32, feeds), run(model, feeds)
        assert agreement(got, want).cosine >= COSINE_MIN
        assert not np.array_equal(got, want)  # quantisation really happened


def test_exclude_by_name_and_predicate(fp32, scales) -> None:
    _, counts = quantized(fp32, scales, exclude={"node_conv2d_1"})
    assert counts["quantized_conv"] == 0 and counts["skipped_excluded"] == 1
    _, counts = quantized(fp32, scales, exclude={"fc1", "cond"})  # torch module paths
    assert counts["quantized_matmul"] == 1 and counts["quantized_gemm"] == 0
    assert counts["skipped_excluded"] == 2
    _, counts = quantized(fp32, scales, exclude=lambda node: node.op_type == "MatMul")
    assert counts["quantized_matmul"] == 0 and counts["skipped_excluded"] == 2


def test_missing_activation_scale_is_an_error(fp32, scales) -> None:
    from walkforge.errors import WalkforgeError

    with pytest.raises(WalkforgeError, match="no activation scale"):
        quantized(fp32, ({}, scales[1]))


def test_linear_transpose_folded_with_optimize_false() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 16),
                              torch.nn.GELU(), torch.nn.Linear(16, 4))
    program = torch.onnx.export(mlp.eval(), (torch.randn(2, 5, 8),), dynamo=True, optimize=False,
                                opset_version=20, input_names=["x"], dynamic_shapes={"input": {0: "b"}},
                                verbose=False)
    fp32 = program.model_proto
    assert sum(n.op_type == "Transpose" for n in fp32.graph.node) == 3
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 5, 8)).astype(np.float32)} for i in range(4)]
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    model, counts = quantize_fp8(model, fp8_scales(collect_amax(fp32, feeds)), fp8_scales(weight_amax(fp32)))
    assert counts["quantized_matmul"] == 2 and counts["skipped_first_last"] == 1
    assert sum(n.op_type == "Transpose" for n in model.graph.node) == 1  # folded into fp8 copies
    inits = {t.name: t for t in model.graph.initializer}
    assert list(inits["0.weight_fp8"].dims) == [8, 32]  # stored [K, N], DQ axis 1
    assert "0.weight" not in inits
    assert agreement(run(model, feeds[0]), run(fp32, feeds[0])).cosine > COSINE_MIN_MLP


def test_tied_embedding_head_is_skipped() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.proj = torch.nn.Embedding(10, 16), torch.nn.Linear(16, 16)
            self.out = torch.nn.Linear(10, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.proj(self.emb(ids))
            return self.out(h @ self.emb.weight.T)  # optimize=True folds emb.weight.T to a copy

    program = torch.onnx.export(Tied().eval(), (torch.tensor([[1, 2, 3], [4, 5, 6]]),), dynamo=True,
                                opset_version=20, input_names=["ids"], verbose=False)
    _, counts = quantize_fp8(program.model_proto, {}, {}, exclude=lambda node: True)
    assert counts["skipped_embedding"] == 1 and counts["skipped_first_last"] == 1
    assert counts["skipped_excluded"] == 1  # proj


def test_external_data_weights(fp32, scales, tmp_path) -> None:
    stored = onnx.ModelProto()
    stored.CopyFrom(fp32)  # saving as external data moves the weights out of the proto it saves
    onnx.save(stored, str(tmp_path / "net.onnx"), save_as_external_data=True, location="net.onnx.data",
              size_threshold=256)  # shape tensors inline, as the exporter does
    lazy = onnx.load(str(tmp_path / "net.onnx"), load_external_data=False)
    feeds = samples(2, seed=0)
    act = fp8_scales(collect_amax(lazy, feeds, base_dir=tmp_path))
    weights = fp8_scales(weight_amax(lazy, base_dir=tmp_path))
    assert act == fp8_scales(collect_amax(fp32, feeds))
    assert all(np.array_equal(weights[k], v) for k, v in scales[1].items())
    model, counts = quantize_fp8(lazy, act, weights, base_dir=tmp_path)
    assert counts["weights_fp8"] == 4
    onnx.save(model, str(tmp_path / "net_fp8.onnx"))  # untouched fp32 weights stay external
    got = run(str(tmp_path / "net_fp8.onnx"), feeds[0])
    assert agreement(got, run(fp32, feeds[0])).cosine >= COSINE_MIN


def test_per_layer_sensitivity(fp32, scales) -> None:
    feeds = samples(2, seed=7)
    reference = [{"y": run(fp32, f)} for f in feeds]
    ranked = per_layer_sensitivity(fp32, *scales, feeds, reference)
    assert [name for name, _ in ranked] != [] and len(ranked) == 4
    cosines = [c for _, c in ranked]
    assert cosines == sorted(cosines) and all(COSINE_MIN <= c < 1.0 for c in cosines)


# ---------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def int8_scales(fp32: onnx.ModelProto) -> tuple[dict, dict]:
    return qdq_scales(collect_amax(fp32, samples(8, seed=0)), "int8"), qdq_scales(weight_amax(fp32), "int8")


def int8_model(fp32: onnx.ModelProto, scales: tuple[dict, dict]) -> tuple[onnx.ModelProto, dict]:
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    return quantize_int8(model, *scales)


def int8_session(model: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    """What the cpu backend makes for an int8 bundle: Q/DQ fusion on."""
    opts = session_options(spinning=False, fuse_qdq=True)
    if optimized:
        opts.optimized_model_filepath = optimized
    kwargs = session_kwargs(["CPUExecutionProvider"], fuse_qdq=True)
    return ort.InferenceSession(model.SerializeToString(), opts, **kwargs)


def test_int8_is_the_same_pass_with_int8_types(fp32, int8_scales) -> None:
    model, counts = int8_model(fp32, int8_scales)
    assert counts == {"quantized_matmul": 2, "quantized_gemm": 1, "quantized_conv": 1, "qdq_pairs": 4,
                      "weights_int8": 4, "qdq_copies": 0, "skipped_first_last": 2, "skipped_embedding": 0,
                      "skipped_excluded": 0, "skipped_norms": 1}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            data, zero = (inits.get(node.input[0]), inits[node.input[2]])
            assert zero.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zero).any()
            if data is not None:  # a weight: int8, 1 byte per element
                assert data.data_type == onnx.TensorProto.INT8
    q = numpy_helper.to_array(inits["conv.weight_int8"]).astype(np.float32)
    want = numpy_helper.to_array({t.name: t for t in fp32.graph.initializer}["conv.weight"])
    back = q * numpy_helper.to_array(inits["conv.weight_int8_scale"])[:, None, None, None]
    assert np.abs(q).max() == 127  # amax maps to 127
    step = np.abs(want).max(axis=(1, 2, 3)) / 127  # per output channel
    assert np.all(np.abs(back - want) <= step[:, None, None, None] * (0.5 + 4 * FP32_EPS))
    onnx.checker.check_model(model, full_check=True)


def test_int8_gives_every_gemm_its_own_qdq_pair() -> None:
    """q/k/v-style: one activation read by three GEMMs gets three Q → DQ pairs (onnxruntime fuses a
    pair only into a GEMM that reads it alone)."""
    class Qkv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(4))
            self.out = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.first(x)
            return self.out(self.q(h) * self.k(h) + self.v(h))

    program = torch.onnx.export(Qkv().eval(), (torch.randn(2, 5, 8),), dynamo=True, opset_version=20,
                                input_names=["x"], verbose=False)
    fp32 = program.model_proto
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 5, 8)).astype(np.float32)} for i in range(2)]
    scales = qdq_scales(collect_amax(fp32, feeds), "int8"), qdq_scales(weight_amax(fp32), "int8")
    model, counts = int8_model(fp32, scales)
    assert counts["quantized_matmul"] == 4  # first, q, k, v
    assert counts["qdq_pairs"] == 2 and counts["qdq_copies"] == 2  # x → first; h → q, k, v
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(readers[n.output[0]] == 1 for n in dqs)


def test_int8_session_runs_integer_kernels(fp32, int8_scales, tmp_path) -> None:
    model, counts = int8_model(fp32, int8_scales)
    int8_session(model, str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    fused = sum(op in INTEGER_KERNELS for op in ops)
    assert fused >= counts["quantized_matmul"]  # every quantised MatMul is an integer kernel
    assert "MatMulIntegerToFloat" in ops


def test_int8_onnxruntime_agrees_with_fp32(fp32, int8_scales) -> None:
    model, _ = int8_model(fp32, int8_scales)
    session = int8_session(model)
    for feeds in samples(3, seed=123, batch=3):
        want, got = run(fp32, feeds), session.run(None, feeds)[0]
        assert agreement(got, want).cosine >= COSINE_MIN_INT8
        assert not np.array_equal(got, want)  # quantisation really happened


def test_old_fp8_names_are_the_qdq_ones() -> None:
    """graphs/fp8.py and Fp8Options keep working as names of the Q/DQ pass and its options."""
    from walkforge.compiler import quantize
    from walkforge.graphs import fp8, qdq

    assert fp8.plan_fp8 is qdq.plan_qdq and fp8.quantize_qdq is qdq.quantize_qdq
    assert fp8.INT8_WEIGHT_BITS is qdq.INT8_WEIGHT_BITS
    assert quantize.Fp8Options is quantize.QdqOptions
