"""Dynamo export of a walk using both ops -> bare walkforge nodes -> attached bodies run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from plugin_cases import ALL_CASES, Case, case_tol, make_inputs
from tolerances import rel_err
from torch.export import Dim
from walk_module import INPUT_NAMES, OUTPUT_NAMES, TinyWalk

from walkforge.plugins import attach_functions, translation_table
from walkforge.plugins.constants import DOMAIN, PLUGIN_NAMESPACE

EXAMPLE = Case(page_size=8, kv_heads=2, head_dim=16, seq=5, batch=4)
_D = Dim.DYNAMIC
DYNAMIC = {
    "pool": {2: _D, 3: _D, 4: _D, 5: _D},
    "q": {0: _D, 1: _D, 2: _D, 3: _D},
    "k_all": {1: _D, 2: _D, 3: _D, 4: _D},
    "v_all": {1: _D, 2: _D, 3: _D, 4: _D},
    "block_table": {0: _D, 1: _D},
    "positions": {0: _D, 1: _D},
    "prefix_lens": {0: _D},
    "suffix_mask": {0: _D, 1: _D},
    "kv_scales": {},
}


LAYER, SCALE = 1, 0.125  # baked into the exported graph as attributes, whatever the case's head_dim


def _walk() -> TinyWalk:
    return TinyWalk(LAYER, SCALE).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """(bare exported model, saved + reloaded model with functions attached, attach counts)."""
    x = make_inputs(EXAMPLE)
    program = torch.onnx.export(
        _walk(), tuple(x[n] for n in INPUT_NAMES), dynamo=True, custom_translation_table=translation_table(),
        input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_shapes=DYNAMIC,
    )  # fmt: skip
    bare = onnx.ModelProto()
    bare.CopyFrom(program.model_proto)
    path = tmp_path_factory.mktemp("onnx") / "walk.onnx"
    model, counts = attach_functions(program.model_proto)
    onnx.save(model, path)
    return bare, onnx.load(path), counts


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_one_bare_node_per_op_with_typed_attributes(exported):
    bare, _, _ = exported
    custom = [n for n in bare.graph.node if n.domain == DOMAIN]
    assert sorted(n.op_type for n in custom) == ["KVCacheWrite", "PagedAttention"]
    assert not bare.functions
    A = onnx.AttributeProto
    expected = {
        "KVCacheWrite": {"plugin_namespace": A.STRING, "aot": A.INT},
        "PagedAttention": {"plugin_namespace": A.STRING, "aot": A.INT, "layer": A.INT, "scale": A.FLOAT},
    }
    for node in custom:
        assert {a.name: a.type for a in node.attribute} == expected[node.op_type]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert attrs["aot"] == 1  # TensorRT picks the AOT (stored PTX) implementation
    attention = next(n for n in custom if n.op_type == "PagedAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["layer"] == LAYER and attrs["scale"] == pytest.approx(SCALE)


def test_attached_model_passes_full_check(exported):
    bare, model, counts = exported
    assert counts == {"KVCacheWrite": 1, "PagedAttention": 1}
    default_opset = next(o.version for o in bare.opset_import if o.domain == "")
    assert default_opset >= 18
    for function in model.functions:
        assert {(o.domain, o.version) for o in function.opset_import} == {("", default_opset)}
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_onnxruntime_matches_eager(exported, case):
    session = _session(exported[1])
    x = make_inputs(case)
    out, pool = _walk()(*(x[n] for n in INPUT_NAMES))
    ort_out, ort_pool = session.run(OUTPUT_NAMES, {n: x[n].numpy() for n in INPUT_NAMES})
    assert rel_err(ort_out, out) <= case_tol(case)  # fp32 attention: MLAS vs torch sums
    assert np.array_equal(ort_pool, pool.numpy())  # a scatter of copies: exact on any CPU


def test_iobinding_writes_pool_in_place(exported):
    """The pool bound as input and as output: the caller's buffer is updated, no second pool exists."""
    session = _session(exported[1])
    x = make_inputs(ALL_CASES[-1])
    _, expected_pool = _walk()(*(x[n] for n in INPUT_NAMES))
    pool = x["pool"].numpy().copy()
    pool_value = ort.OrtValue.ortvalue_from_numpy(pool)
    binding = session.io_binding()
    binding.bind_ortvalue_input("pool", pool_value)
    for name in INPUT_NAMES[1:]:
        binding.bind_cpu_input(name, x[name].numpy())
    binding.bind_ortvalue_output("pool_out", pool_value)
    binding.bind_output("out")
    session.run_with_iobinding(binding)
    pool_out = binding.get_outputs()[0]  # outputs come back in binding order
    assert pool_out.data_ptr() == pool_value.data_ptr() == pool.ctypes.data
    assert np.array_equal(pool, expected_pool.numpy())
    assert not np.array_equal(pool, x["pool"].numpy())
