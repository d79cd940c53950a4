"""Plumbing shared by the op modules: ONNX schema registration, function bodies, Triton launch."""

from __future__ import annotations

import onnx
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

    Type vars: "T" = tensor(float), "I" = tensor(int64), "M" = tensor(bool).
    """
    if defs.has(name, DOMAIN):
        return defs.get_schema(name, DOMAIN_VERSION, DOMAIN)
    types = {"T": ["tensor(float)"], "I": ["tensor(int64)"], "M": ["tensor(bool)"]}
    used = sorted({t for _, t in inputs + outputs})
    schema = defs.OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        doc=doc,
        inputs=[defs.OpSchema.FormalParameter(n, t) for n, t in inputs],
        outputs=[defs.OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, types[t], "") for t in used],
        attributes=[defs.OpSchema.Attribute(a, _ATTR_TYPES[t], "") for a, t in attributes.items()],
    )
    defs.register_schema(schema)
    return schema


def function_proto(body: onnxscript.OnnxFunction, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of an onnxscript body, its standard ops pinned to the model's `opset`."""
    proto = body.to_function_proto()
    del proto.opset_import[:]
    proto.opset_import.append(onnx.helper.make_opsetid("", opset))
    return proto


def check_triton_device(device: torch.device) -> None:
    """Fail clearly when Triton cannot run on `device` in this process.

    CPU tensors need Triton's interpreter, and Triton fixes interpreter vs JIT for every
    `@triton.jit` function (its own `tl.zeros`, `tl.max`, ... included) when it is imported:
    TRITON_INTERPRET=1 must be in the environment before `import triton`.
    """
    from triton import knobs

    if device.type == "cpu" and not knobs.runtime.interpret:
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
