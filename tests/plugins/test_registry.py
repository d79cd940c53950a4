"""The op registry: names, translation table, attach pass guards."""

from __future__ import annotations

import onnx
import pytest
import torch

from walkforge.plugins import MIN_OPSET, OPS, attach_functions, translation_table
from walkforge.plugins.constants import DOMAIN


def test_op_names_never_shadow_a_standard_onnx_op():
    standard = {schema.name for schema in onnx.defs.get_all_schemas_with_history() if schema.domain != DOMAIN}
    assert len(standard) > 150
    assert set(OPS) == {"KVCacheWrite", "PagedAttention"}
    assert not set(OPS) & standard


def test_schemas_registered_in_walkforge_domain_v1():
    for name in OPS:
        schema = onnx.defs.get_schema(name, 1, DOMAIN)
        assert schema.domain == DOMAIN and schema.since_version == 1
        assert "plugin_namespace" in schema.attributes


def test_translation_table_covers_every_op():
    table = translation_table()
    ops = torch.ops.walkforge
    assert set(table) == {ops.kv_cache_write.default, ops.paged_attention.default}
    assert all(callable(fn) for fn in table.values())


def _model_with(op_type: str, opset: int) -> onnx.ModelProto:
    node = onnx.helper.make_node(op_type, ["x"], ["y"], domain=DOMAIN)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([node], "g", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def test_attach_rejects_unknown_op_and_old_opset():
    with pytest.raises(ValueError, match="unknown walkforge ops"):
        attach_functions(_model_with("Nope", 20))
    with pytest.raises(ValueError, match=f"opset >= {MIN_OPSET}"):
        attach_functions(_model_with("PagedAttention", 17))


def test_attach_is_idempotent_and_pins_model_opset():
    model, counts = attach_functions(_model_with("PagedAttention", 19))
    model, again = attach_functions(model)
    assert counts == again == {"PagedAttention": 1}
    assert [f.name for f in model.functions] == ["PagedAttention"]
    assert {(o.domain, o.version) for o in model.functions[0].opset_import} == {("", 19)}
    assert any(o.domain == DOMAIN and o.version == 1 for o in model.opset_import)



@pytest.mark.parametrize("name", sorted(OPS))
def test_pool_values_are_those_bound_to_the_schema_pool_formals(name):
    """The pool is found by the formal names `pool` / `pool_out`, at whatever position an op has them."""
    from walkforge.plugins import _pool_values, pool_is_fp8

    schema = OPS[name].SCHEMA
    inputs, outputs = [f"in_{p.name}" for p in schema.inputs], [f"out_{p.name}" for p in schema.outputs]
    node = onnx.helper.make_node(name, inputs, outputs, domain=DOMAIN)
    values = [onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
              for v in (*inputs, *outputs)]  # fmt: skip
    graph = onnx.helper.make_graph([node], "g", values[: len(inputs)], values[len(inputs):])
    model = onnx.helper.make_model(graph)
    expected = {"in_pool"} | ({"out_pool_out"} if "out_pool_out" in outputs else set())
    assert {v.name for v in _pool_values(model)} == expected and not pool_is_fp8(model)
    model.graph.input[inputs.index("in_pool")].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    assert pool_is_fp8(model)


def test_register_cuda_kernels_is_idempotent_and_leaves_cpu_on_the_eager_ops():
    from plugin_cases import ALL_CASES, make_inputs

    from walkforge.plugins import register_cuda_kernels

    register_cuda_kernels()
    register_cuda_kernels()
    x = make_inputs(ALL_CASES[0])
    args = (x["pool"], x["k_all"], x["v_all"], x["block_table"], x["positions"])
    assert torch.equal(torch.ops.walkforge.kv_cache_write(*args), OPS["KVCacheWrite"].kv_cache_write(*args))
