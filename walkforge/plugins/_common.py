"""Plumbing shared by the op modules: ONNX schema registration, pool checks, Triton launch arguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnxscript
import torch
from onnx import defs

from walkforge.plugins.constants import DOMAIN, DOMAIN_VERSION

WALKFORGE_OPSET = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
"""onnxscript handle on the walkforge domain (valid once an op's schema is registered)."""

_ATTR_TYPES = {
    int: defs.OpSchema.AttrType.INT,
    float: defs.OpSchema.AttrType.FLOAT,
    str: defs.OpSchema.AttrType.STRING,
}


def register_onnx_schema(
    name: str,
    inputs: list[tuple[str, str]],
    outputs: list[tuple[str, str]],
    attributes: dict[str, type],
    doc: str,
) -> defs.OpSchema:
    """Register `walkforge::<name>` v1 with onnx (idempotent); inputs/outputs are (name, type var).

    Type vars: "T" = tensor(float), "I" = tensor(int64), "M" = tensor(bool), "P" = a page pool
    (float, float8e4m3fn, or uint8 holding float8e4m3fn bytes). A trailing "?" marks an optional input.
    """
    if defs.has(name, DOMAIN):
        return defs.get_schema(name, DOMAIN_VERSION, DOMAIN)
    types = {"T": ["tensor(float)"], "I": ["tensor(int64)"], "M": ["tensor(bool)"],
             "P": ["tensor(float)", "tensor(float8e4m3fn)", "tensor(uint8)"]}
    used = sorted({t.rstrip("?") for _, t in inputs + outputs})
    optional = defs.OpSchema.FormalParameterOption.Optional
    schema = defs.OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        doc=doc,
        inputs=[defs.OpSchema.FormalParameter(n, t.rstrip("?"), param_option=optional)
                if t.endswith("?") else defs.OpSchema.FormalParameter(n, t) for n, t in inputs],
        outputs=[defs.OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, types[t], "") for t in used],
        attributes=[defs.OpSchema.Attribute(a, _ATTR_TYPES[t], "") for a, t in attributes.items()],
    )
    defs.register_schema(schema)
    return schema


def is_fp8(pool: torch.Tensor) -> bool:
    return pool.dtype == torch.float8_e4m3fn


def pool_scales(pool: torch.Tensor, kv_scales: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(K scales, V scales) of an fp8 pool as [L, 1, 1, 1, 1] float32; (None, None) for a float32 pool
    (its scales are ignored). An fp8 pool needs `kv_scales` [L, 2]."""
    if pool.dtype == torch.float32:
        return None, None
    if not is_fp8(pool):
        raise ValueError(f"KV pool must be float32 or float8_e4m3fn, got {pool.dtype}")
    if kv_scales is None or tuple(kv_scales.shape) != (pool.shape[0], 2):
        got = None if kv_scales is None else list(kv_scales.shape)
        raise ValueError(f"an fp8 KV pool needs kv_scales [{pool.shape[0]}, 2], got {got}")
    scales = kv_scales.float().reshape(-1, 2, 1, 1, 1, 1)
    return scales[:, 0], scales[:, 1]


def kernel_scales(pool: torch.Tensor, kv_scales: torch.Tensor | None) -> torch.Tensor:
    """The `kv_scales` a kernel reads: as given (checked against the pool), or ones for a float32 pool
    given none (its kernels never read them, but the pointer must be valid)."""
    pool_scales(pool, kv_scales)  # dtype and scales shape checks
    return torch.ones(pool.shape[0], 2, device=pool.device) if kv_scales is None else kv_scales.float()


def launch_args(tensors: Mapping[str, torch.Tensor], scalars: Callable[[dict], dict]
                ) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(kernel arguments by parameter name: `<name>_ptr` per tensor, made contiguous, then the int32
    `scalars(shapes)`; the shapes by tensor name, which the grid rule reads)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    pointers = {f"{name}_ptr": t.contiguous() for name, t in tensors.items()}
    return pointers | scalars(shapes), shapes


def case_tensors(x: Mapping[str, Any], names: Sequence[str], device: str) -> tuple:
    """`x[name]` on `device` for each name (None where `x` has none: optional inputs)."""
    return tuple(x[name].to(device) if name in x else None for name in names)


def check_triton_device(device: torch.device) -> None:
    """Fail clearly when Triton cannot run on `device` in this process.

    CPU tensors need Triton's interpreter, and Triton fixes interpreter vs JIT for every
    `@triton.jit` function (its own `tl.zeros`, `tl.max`, ... included) when it is imported:
    TRITON_INTERPRET=1 must be in the environment before `import triton`.
    """
    from triton import knobs

    if device.type == "cpu" and not knobs.runtime.interpret:
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
