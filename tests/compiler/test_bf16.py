"""--precision bf16: bf16 weights and GEMM math, fp32 where precision needs it; checked on CPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.tolerances import BF16_ACTIONS_COSINE, BF16_EVALUATORS_COSINE
from walkforge.artifacts.bundle import Bundle
from walkforge.compiler.check import agreement
from walkforge.errors import WalkforgeError
from walkforge.graphs.bf16 import cast_bf16, emulate_bf16


def _mlp_norm_softmax(rng: np.random.Generator) -> onnx.ModelProto:
    """x @ W1 → norm statistics → softmax → @ E; E is also a Gather's table (a tied embedding)."""
    w1 = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w1")
    emb = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "emb")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("ReduceMean", ["h", "axes"], ["mu"], name="stats"),
             helper.make_node("Sub", ["h", "mu"], ["c"]),
             helper.make_node("Softmax", ["c"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "emb"], ["y"], name="fc2"),
             helper.make_node("Gather", ["emb", "ids"], ["g"], axis=0)]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 16]),
        ],
        [w1, emb, numpy_helper.from_array(np.array([-1]), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_cast_bf16_makes_gemms_bf16_and_leaves_norm_and_softmax_fp32():
    model, counts = cast_bf16(_mlp_norm_softmax(np.random.default_rng(0)))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits == {
        "w1": TensorProto.BFLOAT16,
        "emb": TensorProto.FLOAT,
        "axes": TensorProto.INT64,
    }  # emb: a Gather table too
    assert counts == {"gemms": 2, "weights_bf16": 1, "kept_fp32_opset": 0, "casts": 5}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
    assert types["h_bf16"] == TensorProto.BFLOAT16 and types["y_bf16"] == TensorProto.BFLOAT16
    assert types["h"] == types["mu"] == types["p"] == types["y"] == TensorProto.FLOAT


def test_emulated_bf16_rounds_like_bf16_and_runs_on_onnxruntime_cpu():
    import ml_dtypes

    source = _mlp_norm_softmax(np.random.default_rng(1))
    model, _ = cast_bf16(_mlp_norm_softmax(np.random.default_rng(1)))  # the pass rewrites in place
    rng = np.random.default_rng(2)
    emulated, counts = emulate_bf16(model)
    assert counts["emulated"] == 2
    x = rng.standard_normal((4, 16)).astype(np.float32)
    feeds = {"x": x, "ids": np.array([0, 3])}
    got = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    exact = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    w1 = numpy_helper.to_array(source.graph.initializer[0])
    bf = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    h = bf(bf(x) @ bf(w1))  # what a bf16 GEMM returns: bf16 inputs, fp32 sums, a bf16 result
    got_h = ort.InferenceSession(_output(emulated, "h").SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(["h"], feeds)[0]  # fmt: skip
    assert agreement(got_h, h).rel <= 2.0**-8  # one bf16 ULP where the sum order flips a rounding
    assert not np.array_equal(got[0], exact[0])  # the roundings happened
    assert agreement(got[0], exact[0]).cosine >= BF16_ACTIONS_COSINE
    np.testing.assert_array_equal(got[1], exact[1])  # the Gather read the fp32 table


def _output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


@pytest.fixture(scope="module")
def bf16_pi0(compiled):
    out = compiled("pi0", variant="tiny", seed=3, gpu_archs=(), precision="bf16")
    return out, json.loads((out / "manifest.json").read_text())


def test_pi0_tiny_bf16_actions_match_fp32(bf16_pi0):
    root, manifest = bf16_pi0
    precision = manifest["precision"]
    assert (precision["weights"], precision["activations"], precision["kv"]) == ("bf16", "bf16", "fp32")
    assert precision["calibration"] is None  # nothing calibrated; the CPU check is its own entry
    assert precision["bf16_check"]["end_to_end"]["cosine"] >= BF16_ACTIONS_COSINE
    assert (
        manifest["stages"]["calibrate"]["gemms"] > 40 and manifest["stages"]["calibrate"]["weights_bf16"] > 40
    )
    assert all(w["errors"] == 0 for w in manifest["trt_lint"]["walks"].values())
    for walk in manifest["walks"].values():
        onnx.checker.check_model(str(root / walk["onnx"]))
        model = onnx.load(str(root / walk["onnx"]), load_external_data=False)
        assert all(i.type.tensor_type.elem_type != TensorProto.BFLOAT16 for i in model.graph.input)
        if walk["onnx"].startswith("walks/guide"):  # element-wise, no weights: nothing to cast
            continue
        assert any(t.data_type == TensorProto.BFLOAT16 for t in model.graph.initializer)


def test_bf16_graph_on_onnx_reference_matches_the_emulation(bf16_pi0):
    """The bf16 vision walk itself (no emulation) on onnx's reference evaluator vs onnxruntime
    running its emulation: the compile's CPU check measures the graph that ships."""
    from onnx.reference import ReferenceEvaluator

    from walkforge.recipes.inputs import example_inputs

    root, manifest = bf16_pi0
    bundle = Bundle.open(root)
    model = onnx.load(str(root / manifest["walks"]["vision"]["onnx"]))
    feeds = {"images": example_inputs(bundle, batch=1, seed=1)["images"]}
    reference = ReferenceEvaluator(model).run(None, feeds)[0]
    emulated, _ = emulate_bf16(model)
    got = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    assert agreement(got, reference).cosine >= BF16_EVALUATORS_COSINE


def test_cpu_backend_refuses_bf16_in_one_line(bf16_pi0):
    import walkforge

    root, _ = bf16_pi0
    with pytest.raises(WalkforgeError, match="bf16 engines run on cuda/trt") as err:
        walkforge.load(root, backend="cpu")
    assert "\n" not in str(err.value)


def test_inspect_shows_bf16(bf16_pi0):
    from click.testing import CliRunner

    from walkforge.cli import cli

    root, _ = bf16_pi0
    result = CliRunner().invoke(cli, ["inspect", str(root)])
    assert result.exit_code == 0 and "precision: weights bf16, activations bf16" in result.output
