"""walkforge custom ops: one module per op, each a complete set (docs/design.md, "Custom ops").

Every op module declares: its ONNX schema `SCHEMA` (`walkforge.<Name>` v1; the page pool is the
formal input POOL_IN / output POOL_OUT, found by name) and `ATTRIBUTES`; the torch.library op
`walkforge::<snake>` with eager reference and fake impl (`TORCH_OP`); `translate` for
`torch.onnx.export(custom_translation_table=...)`, emitting one bare node; `BODY`, its one ONNX
function body, attached after export by `graphs.functions.attach_functions` with the pool dtype's
codec inlined (`pool_codec`), so onnxruntime can run the node; the Triton kernel, its launcher, grid
rule and AOT signature (`AOT`, compiled by `aot.compile_kernels`); `register_trt` (TensorRT plugin) and
`register_cuda` (CUDA dispatch). A new op is one module plus one line in `_OP_MODULES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from walkforge.plugins.constants import PAGE_SIZE

_OP_MODULES = {
    "KVCacheWrite": "walkforge.plugins.kv_cache_write",
    "PagedAttention": "walkforge.plugins.paged_attention",
}

_MOVED = dict.fromkeys(("MIN_OPSET", "MIN_OPSET_FP8", "attach_functions", "fp8_kv_pool", "pool_is_fp8",
                        "_pool_values"), "walkforge.graphs.functions")
"""Graph passes that lived here, now in `walkforge.graphs.functions`; still importable from here."""


def __getattr__(name: str):
    """`OPS` (ONNX op name -> op module) is built on first use: the op modules import torch and
    Triton, which users of `walkforge.plugins.constants` (the runtime) should not pay for. The
    names in `_MOVED` resolve to their new module (imported here lazily: it imports this one)."""
    if name == "OPS":
        return _ops()
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ops() -> dict[str, ModuleType]:
    """ONNX op name -> op module (SCHEMA, TORCH_OP, translate, BODY, AOT, register_cuda, register_trt)."""
    return {name: importlib.import_module(module) for name, module in _OP_MODULES.items()}


def register_cuda_kernels() -> None:
    """Dispatch every walkforge torch op on CUDA tensors to its Triton kernel (idempotent); CPU
    tensors keep the eager references. Model code then has no hardware branch."""
    for module in _ops().values():
        module.register_cuda()


def translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`: torch op -> translation."""
    return {module.TORCH_OP: module.translate for module in _ops().values()}


__all__ = ["MIN_OPSET", "OPS", "PAGE_SIZE", "attach_functions", "fp8_kv_pool", "pool_is_fp8",
           "register_cuda_kernels", "translation_table"]
