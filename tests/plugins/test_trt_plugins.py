"""The TensorRT registration of each op (`register_trt`), against a stand-in `tensorrt.plugin`
that checks what the real one validates (descriptor type hints, aot_impl parameter order) and
records what the AOT launch would get: the grid and int32 arguments must be the Triton launcher's."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
from plugin_cases import ALL_CASES, HEADS, make_inputs

from walkforge.plugins import kv_cache_write as kvw
from walkforge.plugins import paged_attention as pa
from walkforge.plugins.aot import KernelDims

CASE = next(c for c in ALL_CASES if c.id == "ps16-kvh2-d256-s51-b4")


class TensorDesc:
    def __init__(self, shape):
        self.shape_expr = tuple(shape)

    def like(self):
        return ("like", self.shape_expr)

    def aliased(self):
        return ("aliased", self.shape_expr)


def fake_trtp(registered: dict) -> types.ModuleType:
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.TensorDesc = TensorDesc
    trtp.KernelLaunchParams = types.SimpleNamespace
    trtp.SymInt32 = int
    trtp.SymIntExprs = types.SimpleNamespace(from_tuple=tuple)
    trtp.cdiv = lambda a, b: -(-a // b)

    def register(plugin_id):
        def decorate(fn):
            sig = inspect.signature(fn)
            for param in sig.parameters.values():  # real classes, tensors first (what TensorRT checks)
                assert inspect.isclass(param.annotation), (plugin_id, param)
            assert sig.return_annotation is TensorDesc
            registered[plugin_id] = {"descriptor": fn}
            return fn
        return decorate

    def aot_impl(plugin_id):
        def decorate(fn):
            desc = inspect.signature(registered[plugin_id]["descriptor"]).parameters
            assert list(inspect.signature(fn).parameters) == [*desc, "outputs", "tactic"]
            registered[plugin_id]["aot"] = fn
            return fn
        return decorate

    trtp.register, trtp.aot_impl = register, aot_impl
    return trtp


@pytest.fixture
def registered(monkeypatch) -> dict:
    found: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", fake_trtp(found))
    return found


def _record(op, dims: KernelDims) -> dict:
    return {"grid": op.AOT.grid, "constexprs": op.AOT.constexprs(dims), "signature": dict(op.AOT.signature),
            "num_warps": 4, "shared_mem": 1024, "function_name": op.AOT.name}  # fmt: skip


@pytest.mark.parametrize("op", [kvw, pa], ids=lambda op: op.ONNX_NAME)
def test_trt_plugin_launches_what_the_triton_launcher_does(registered, op):
    x = make_inputs(CASE)
    dims = KernelDims(HEADS, CASE.kv_heads, CASE.head_dim, CASE.page_size, x["scale"])
    op.register_trt(_record(op, dims), "ptx")
    plugin = registered[f"walkforge::{op.ONNX_NAME}"]
    args = op.case_args(x)
    tensors = [TensorDesc(a.shape) for a in args if isinstance(a, torch.Tensor)]
    attrs = {"layer": x["layer"], "scale": x["scale"]} if op is pa else {}
    output = ("aliased", tuple(x["pool"].shape)) if op is kvw else ("like", tuple(x["q"].shape))
    assert plugin["descriptor"](*tensors, **attrs) == output
    name, ptx, launch, extra = plugin["aot"](*tensors, **attrs, outputs=None, tactic=0)
    assert (name, ptx) == (op.AOT.name.encode(), b"ptx")
    assert (launch.block_x, launch.shared_mem) == (128, 1024)
    kernel_args, _, _ = op.kernel_args(*args)
    assert extra == tuple(kernel_args[n] for n, kind in op.AOT.signature.items() if kind == "i32")
    grid = (CASE.seq, CASE.batch, 1) if op is kvw else (4, HEADS, CASE.batch)  # cdiv(51, BLOCK_M = 16) = 4
    assert (launch.grid_x, launch.grid_y, launch.grid_z) == grid


def test_trt_attention_refuses_a_scale_the_kernel_was_not_compiled_for(registered):
    x = make_inputs(CASE)
    pa.register_trt(_record(pa, KernelDims(HEADS, CASE.kv_heads, CASE.head_dim, CASE.page_size, 0.5)), "ptx")
    tensors = [TensorDesc(a.shape) for a in pa.case_args(x) if isinstance(a, torch.Tensor)]
    with pytest.raises(ValueError, match="recompile kernels"):
        registered["walkforge::PagedAttention"]["aot"](*tensors, x["layer"], x["scale"], None, 0)
