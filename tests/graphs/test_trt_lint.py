"""TensorRT-readiness lint on hand-built graphs: what must fail, what must pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from walkforge.graphs import trt_ops
from walkforge.graphs.trt_lint import ERROR, WARNING, errors, format_findings, lint, lint_bundle, summary
from walkforge.plugins.constants import DOMAIN, PLUGIN_NAMESPACE

F32 = TensorProto.FLOAT
FP8 = TensorProto.FLOAT8E4M3FN


def _value(name: str, shape: list, elem: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset: int = 20, functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "walk", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def _unary(op: str, domain: str = "", **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name="n0", domain=domain, **attrs)
    return _model([node], [_value("x", [2, 4])], [_value("y", [2, 4])])


def _plugin(op: str = "PagedAttention", **attrs) -> onnx.ModelProto:
    """A PagedAttention-like walkforge node with the given attributes."""
    node = helper.make_node(op, ["q", "pool"], ["out"], name="attn0", domain=DOMAIN, **attrs)
    return _model([node], [_value("q", ["batch", 2, 5, 16]), _value("pool", [2, 2, 8, 16, 1, 16])],
                  [_value("out", ["batch", 2, 5, 16])])


def _qdq_matmul(consumer: str = "MatMul", zero: float = 0.0, zero_type: int = FP8) -> onnx.ModelProto:
    """x -> Q -> DQ -> consumer(., W) with an FP8 weight dequantised in front of `consumer`."""
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "x_scale"),
        helper.make_tensor("x_zero", zero_type, [], [zero]),
        helper.make_tensor("w8", FP8, [4, 3], np.ones(12, np.float32).tolist()),
        numpy_helper.from_array(np.full(3, 0.1, np.float32), "w_scale"),
        helper.make_tensor("w_zero", FP8, [3], [0.0, 0.0, 0.0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w8", "w_scale", "w_zero"], ["w"], name="dq_w", axis=1),
    ]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"))
    else:
        nodes.append(helper.make_node("Add", ["xd", "xd"], ["y0"], name="add"))
        nodes.append(helper.make_node("MatMul", ["y0", "w"], ["y"], name="mm"))
    return _model(nodes, [_value("x", [2, 4])], [_value("y", [2, 3])], inits)


def _only(findings, severity=ERROR):
    picked = [f for f in findings if f.severity == severity]
    assert len(picked) == 1, format_findings(findings)
    return picked[0]


# ---------------------------------------------------------------- must fail


def test_unsupported_op_is_an_error():
    finding = _only(lint(_unary("Unique"), "w"))
    assert (finding.walk, finding.node, finding.op) == ("w", "n0", "Unique")
    assert "unsupported" in finding.message and trt_ops.TABLE_VERSION in finding.message


def test_op_missing_from_the_table_is_an_error():
    assert "not in TensorRT" in _only(lint(_unary("NoSuchOp"), "w")).message


def test_plugin_without_namespace_is_an_error():
    finding = _only(lint(_plugin(layer=0, scale=0.25, aot=1), "w"))
    assert finding.op == "walkforge::PagedAttention" and "plugin_namespace" in finding.message


@pytest.mark.parametrize("namespace, words", [(7, "must be STRING"), ("other", "registered under")])
def test_plugin_namespace_of_wrong_type_or_value_is_an_error(namespace, words):
    assert words in _only(lint(_plugin(plugin_namespace=namespace, aot=1), "w")).message


def test_plugin_with_tensor_or_graph_attribute_is_an_error():
    tensor = numpy_helper.from_array(np.zeros(2, np.float32), "t")
    body = helper.make_graph([], "b", [], [])
    found = errors(lint(_plugin(plugin_namespace=PLUGIN_NAMESPACE, aot=1, table=tensor, body=body), "w"))
    assert sorted(f.message.split("'")[1] for f in found) == ["body", "table"]
    assert any("is TENSOR" in f.message for f in found) and any("is GRAPH" in f.message for f in found)


def test_custom_op_named_like_a_standard_op_is_an_error():
    finding = _only(lint(_plugin("Gather", plugin_namespace=PLUGIN_NAMESPACE, aot=1), "w"))
    assert "standard ONNX op Gather" in finding.message


@pytest.mark.parametrize("opset", [trt_ops.OPSET_RANGE[0] - 1, trt_ops.OPSET_RANGE[1] + 1])
def test_opset_outside_tensorrt_range_is_an_error(opset):
    finding = _only(lint(_model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", [1])],
                                [_value("y", [1])], opset=opset), "w"))
    assert f"opset {opset} is outside" in finding.message


def test_qdq_with_nonzero_zero_point_is_an_error():
    found = errors(lint(_qdq_matmul(zero=2.0), "w"))
    assert {f.node for f in found} == {"q_x", "dq_x"}
    assert all("nonzero" in f.message for f in found)


def test_qdq_with_a_type_tensorrt_lacks_is_an_error():
    found = errors(lint(_qdq_matmul(zero_type=TensorProto.UINT8), "w"))
    assert {f.node for f in found} == {"q_x", "dq_x"} and "UINT8" in found[0].message


def test_dequantize_feeding_add_is_a_warning():
    findings = lint(_qdq_matmul(consumer="Add"), "w")
    assert not errors(findings)
    finding = _only(findings, WARNING)
    assert (finding.node, finding.op) == ("dq_x", "DequantizeLinear") and "unfused" in finding.message


def test_scatter_nd_reduction_is_an_error():
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="s", reduction="add")
    model = _model([node], [_value("x", [4]), _value("i", [1, 1], TensorProto.INT64), _value("u", [1])],
                   [_value("y", [4])])
    assert "reduction 'add'" in _only(lint(model, "w")).message


def test_function_in_a_foreign_domain_is_an_error():
    function = helper.make_function("custom", "Thing", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                    [helper.make_opsetid("", 20)])
    model = _unary("Relu")
    model.functions.append(function)
    assert "custom::Thing" in _only(lint(model, "w")).message


# ---------------------------------------------------------------- must pass


def test_small_conv_matmul_graph_is_clean():
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
             numpy_helper.from_array(np.ones((4 * 6 * 6, 5), np.float32), "m"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "m"], ["y"], name="mm")]
    model = _model(nodes, [_value("x", [1, 3, 8, 8])], [_value("y", [1, 5])], inits)
    onnx.checker.check_model(model)
    assert lint(model, "w") == []


def test_fp8_qdq_in_front_of_matmul_is_clean():
    assert lint(_qdq_matmul(), "w") == []


def test_weight_dequantize_through_transpose_is_clean():
    model = _qdq_matmul()
    graph = model.graph
    mm = next(n for n in graph.node if n.op_type == "MatMul")
    for src, dst in (("w", "wt"), ("wt", "w2")):
        transpose = helper.make_node("Transpose", [src], [dst], name=f"t_{dst}", perm=[1, 0])
        graph.node.insert(len(graph.node) - 1, transpose)
    mm.input[1] = "w2"
    findings = lint(model, "w")
    assert [f.node for f in findings] == ["dq_w"]  # two Transposes in a row are not "through a Transpose"
    del graph.node[len(graph.node) - 2]
    mm.input[1] = "wt"
    assert lint(model, "w") == []


def test_walkforge_plugin_node_with_attached_function_is_clean():
    from walkforge.plugins import attach_functions

    model = _plugin(plugin_namespace=PLUGIN_NAMESPACE, aot=1, layer=3, scale=0.25)
    model, counts = attach_functions(model)
    assert counts == {"PagedAttention": 1} and len(model.functions) == 1
    assert lint(model, "denoise") == []


def test_plugin_without_aot_flag_is_only_a_warning():
    finding = _only(lint(_plugin(plugin_namespace=PLUGIN_NAMESPACE), "w"), WARNING)
    assert "aot=1" in finding.message and not errors(lint(_plugin(plugin_namespace=PLUGIN_NAMESPACE), "w"))


# ---------------------------------------------------------------- reporting


def test_format_findings_one_line_each_errors_first():
    findings = lint(_qdq_matmul(consumer="Add"), "a") + lint(_unary("Unique"), "b")
    lines = format_findings(findings).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("error: b: n0 [Unique]") and lines[1].startswith("warning: a: dq_x")


def test_lint_bundle_reads_every_walk_and_summary_is_json(tmp_path: Path):
    (tmp_path / "walks").mkdir()
    onnx.save(_unary("Unique"), str(tmp_path / "walks" / "bad.onnx"))
    onnx.save(_unary("Relu"), str(tmp_path / "walks" / "good.onnx"))
    walks = {name: {"onnx": f"walks/{name}.onnx", "inputs": [], "outputs": []} for name in ("bad", "good")}
    manifest = {"walkforge_version": "0", "created": "", "recipe": "vae", "variant": "tiny", "config": {},
                "weights": {"fingerprint": "", "source": "random"}, "front": "vae", "dim_ranges": {},
                "precision": {"weights": "fp32", "activations": "fp32", "kv": "fp32", "calibration": None},
                "walks": walks, "plan": [], "targets": {}}  # a compiled bundle's, less what lint never reads
    by_walk = lint_bundle(tmp_path, manifest)
    assert [len(by_walk["bad"]), len(by_walk["good"])] == [1, 0]
    record = json.loads(json.dumps(summary(by_walk)))
    assert record["walks"]["bad"]["errors"] == 1 and record["walks"]["good"]["findings"] == []
    assert record["table"] == f"TensorRT {trt_ops.TABLE_VERSION}"


def test_compiled_vae_bundle_is_tensorrt_ready(tiny_bundle: Path):
    from walkforge.artifacts.bundle import Bundle

    bundle = Bundle.open(tiny_bundle)
    by_walk = lint_bundle(bundle.root, bundle.manifest)
    assert set(by_walk) == {"decode"}
    assert errors(by_walk["decode"]) == [], format_findings(by_walk)


def test_lint_reads_zero_points_stored_as_external_data(tmp_path):
    """FP8 bundles keep large per-channel zero points in <walk>.onnx.data: lint must find them."""
    w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [2048], np.zeros(2048, np.float32).tolist())
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [2048], np.ones(2048, np.float32).tolist())
    scale = helper.make_tensor("s", TensorProto.FLOAT, [2048], np.ones(2048, np.float32).tolist())
    node = helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["y"], axis=0)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2048])
    graph = helper.make_graph([node], "g", [], [out], [w, zp, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=1024,
              location="m.onnx.data")
    bare = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    found = lint(bare, "walk", tmp_path)
    assert any("nonzero" in f.message for f in found)  # the external zero point was read



def test_int8_qdq_is_a_walkforge_precision() -> None:
    """INT8 Q/DQ (--precision int8, what TensorRT runs on Orin) lints clean; a nonzero int8 zero
    point stays an error (TensorRT is symmetric only)."""
    def qdq(zero: int) -> list:
        inits = [numpy_helper.from_array(np.array(zero, np.int8), "zp"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                 numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq"),
                 helper.make_node("MatMul", ["dq", "w"], ["y"], name="mm")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
        return lint(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), "w")

    assert qdq(0) == []
    assert any(f.severity == ERROR and "nonzero" in f.message for f in qdq(3))
