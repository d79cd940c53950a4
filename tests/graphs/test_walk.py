"""The walk vocabulary: TensorSpec contracts (checking, symbolic dims, JSON) and plans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import GraphEdge, GraphNode, Loop, Sequential, TensorSpec

LATENTS = TensorSpec("latents", "float32", ("batch", 4, "height", "width"))
TIMES = TensorSpec("t", "float32", ("batch",))


def latents(*shape: int, dtype: str = "float32") -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


def check_fails(spec: TensorSpec, value: np.ndarray, dims: dict | None = None) -> str:
    with pytest.raises(WalkforgeError) as info:
        spec.check(value, {} if dims is None else dims)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_input_binds_symbolic_dims() -> None:
    dims: dict[str, int] = {}
    LATENTS.check(latents(2, 4, 12, 10), dims)
    assert dims == {"batch": 2, "height": 12, "width": 10}
    TIMES.check(np.ones(2, np.float32), dims)  # same batch: consistent
    assert dims["batch"] == 2


def test_wrong_rank_names_tensor_and_ranks() -> None:
    message = check_fails(LATENTS, latents(4, 8, 8))
    assert message.startswith("latents:")
    assert "rank 3" in message and "expected rank 4" in message
    assert "[batch, 4, height, width]" in message


def test_wrong_fixed_dim_names_axis_and_sizes() -> None:
    message = check_fails(LATENTS, latents(1, 16, 8, 8))
    assert message.startswith("latents:")
    assert "axis 1 has size 16, expected 4" in message


def test_inconsistent_symbolic_dim_across_inputs() -> None:
    dims: dict[str, int] = {}
    LATENTS.check(latents(2, 4, 8, 8), dims)
    message = check_fails(TIMES, np.ones(3, np.float32), dims)
    assert message.startswith("t:")
    assert "'batch'" in message and "size 3" in message and "= 2" in message


def test_where_prefix_in_message() -> None:
    with pytest.raises(WalkforgeError, match=r"^walk 'decode': latents:"):
        LATENTS.check(latents(4, 8, 8), {}, where="walk 'decode': ")


@pytest.mark.parametrize("dtype", ["float64", "float16", "int64"])
def test_wrong_dtype(dtype: str) -> None:
    message = check_fails(LATENTS, latents(1, 4, 8, 8, dtype=dtype))
    assert message.startswith("latents:")
    assert f"dtype {dtype}" in message and "expected float32" in message


def test_not_an_array() -> None:
    message = check_fails(LATENTS, [[0.0]])  # type: ignore[arg-type]
    assert "latents" in message and "numpy array" in message and "list" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    value = latents(1, 4, 8, 8)
    value[0, 2, 3, 4] = bad
    message = check_fails(LATENTS, value)
    assert message.startswith("latents:")
    assert "NaN or Inf" in message


def test_integer_tensors_skip_finiteness_and_check_dtype() -> None:
    ids = TensorSpec("ids", "int64", ("batch", 16))
    dims: dict[str, int] = {}
    ids.check(np.arange(32, dtype=np.int64).reshape(2, 16), dims)
    assert dims == {"batch": 2}
    assert "dtype int32" in check_fails(ids, np.zeros((2, 16), np.int32))


def test_unknown_dtype_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        TensorSpec("x", "bfloat16", (1,))


def test_json_round_trip() -> None:
    for spec in (LATENTS, TIMES, TensorSpec("mask", "bool", (2, "seq"))):
        data = json.loads(json.dumps(spec.to_json()))
        assert data["shape"] == list(spec.shape)
        back = TensorSpec.from_json(data)
        assert back == spec
        assert isinstance(back.shape, tuple)
        assert back.dynamic_axes == spec.dynamic_axes
    assert LATENTS.dynamic_axes == {0: "batch", 2: "height", 3: "width"}
    assert TensorSpec("x", "float32", [3, "n"]).shape == (3, "n")  # lists become tuples


def node(name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
         aliases: dict[str, str] | None = None) -> GraphNode:
    return GraphNode(name, module=None, inputs=inputs, outputs=outputs, example_inputs={},
                     aliases=aliases or {})


def test_sequential_plan_with_loop() -> None:
    x = TensorSpec("x_t", "float32", ("batch", 8))
    x_next = TensorSpec("x_next", "float32", ("batch", 8))
    cache = TensorSpec("pool", "float32", (2, 4))
    prefill = node("prefill", (TensorSpec("ids", "int64", ("batch", "seq")), cache), (cache,),
                   aliases={"pool": "pool"})
    denoise = node("denoise", (x, TIMES, cache), (x_next,))
    loop = Loop(body="denoise", count="num_steps", carry={"x_next": "x_t"}, schedule="euler")
    edge = GraphEdge("prefill", "pool", "denoise", "pool")
    seq = Sequential(nodes=(prefill, denoise), steps=("prefill", loop), edges=(edge,))

    plan = seq.plan()
    assert plan == ["prefill", {"loop": "denoise", "count": "num_steps",
                                "carry": {"x_next": "x_t"}, "schedule": "euler"}]
    assert json.loads(json.dumps(plan)) == plan  # the manifest stores it as JSON
    assert seq.node("denoise") is denoise
    with pytest.raises(KeyError):
        seq.node("vision")
    assert edge.to_json() == {"src": "prefill", "output": "pool", "dst": "denoise", "input": "pool"}
    contract = prefill.contract()
    assert contract["aliases"] == {"pool": "pool"}
    assert [s["name"] for s in contract["inputs"]] == ["ids", "pool"]
    assert contract["inputs"][0]["shape"] == ["batch", "seq"]
