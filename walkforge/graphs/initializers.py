"""Attach weights to a graph exported without them, streamed from a safetensors file.

A walk traced on the meta device (`program.save(..., include_initializers=False)`) refers to
its weights by their state-dict names but carries no data. `attach_initializers` makes every
referenced name that is a key of the weights file an initializer stored in one external data
file, reading one tensor at a time (never the whole file). On the way it folds the
`Transpose` a Linear leaves on its weight (`optimize=False`) into a pre-transposed initializer
`<name>_t`, so the MatMul reads its weight directly, the layout the FP8 Q/DQ pass and
TensorRT fuse best. Weights the exporter listed as graph inputs stop being inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import onnx
import torch
from onnx import TensorProto
from safetensors import safe_open

from walkforge.errors import WalkforgeError

log = logging.getLogger(__name__)
# onnx's own external-data layout: tensors above 1 MiB start on a 64 KiB boundary, so
# onnxruntime can memory-map them.
ALIGN_THRESHOLD = 1 << 20
ALIGNMENT = 1 << 16
ONNX_DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8, torch.bool: TensorProto.BOOL,
}


@dataclass
class Fold:
    """Transposes (all with one `perm`, [] for the default) that are a weight's only readers;
    the weight is stored pre-transposed as `<weight>_t`."""

    perm: list[int]
    nodes: list[onnx.NodeProto] = field(default_factory=list)


def attach_initializers(model: onnx.ModelProto, weights: Path, data_file: str | Path
                        ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Attach the weights `model` references from safetensors `weights`; modifies and returns it.

    Tensor data goes to `data_file`, recorded by file name only: save `model` into the same
    directory. Returns counts: initializers, bytes (of tensor data), transposes_folded,
    inputs_removed. Raises WalkforgeError if a name stays unresolved (a tensor the model
    reads but that is neither computed, a graph input, an initializer nor in `weights`).
    """
    graph = model.graph
    location, written = Path(data_file).name, 0
    with safe_open(str(weights), framework="pt") as st:
        keys = set(st.keys())
        names = [n for n in _free_names(graph) if n in keys]
        folds = _foldable(graph, names)
        _rewire(graph, folds)
        with open(data_file, "wb") as fh:
            for name in names:
                tensor = st.get_tensor(name)  # one tensor in memory at a time
                if name in folds:
                    tensor = tensor.permute(folds[name].perm or list(range(tensor.dim()))[::-1])
                stored = f"{name}_t" if name in folds else name
                graph.initializer.append(_write(fh, location, stored, tensor))
                written += tensor.numel() * tensor.element_size()
    counts = {"initializers": len(names), "bytes": written,
              "transposes_folded": sum(len(f.nodes) for f in folds.values()),
              "inputs_removed": _drop_inputs(graph, set(names))}
    _check_resolved(graph)
    log.info("attached %s", counts)
    return model, counts


def _free_names(graph: onnx.GraphProto) -> list[str]:
    """Names read by the graph that no node computes and no initializer holds, first use first
    (graph inputs included: the exporter may list weights there)."""
    known = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | {""}
    order = [v.name for v in graph.input] + [i for n in graph.node for i in n.input]
    return [n for n in dict.fromkeys(order) if n not in known]


def _foldable(graph: onnx.GraphProto, names: list[str]) -> dict[str, Fold]:
    """Weights whose every consumer is a Transpose with the same perm, none a graph output."""
    outputs = {o.name for o in graph.output}
    folds: dict[str, Fold] = {}
    wanted = set(names)
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) & wanted:
            users.setdefault(name, []).append(node)
    for name, nodes in users.items():
        perms = {tuple(_perm(n)) for n in nodes}
        if all(n.op_type == "Transpose" and n.output[0] not in outputs for n in nodes) and len(perms) == 1:
            folds[name] = Fold(list(perms.pop()), nodes)
    return folds


def _perm(node: onnx.NodeProto) -> list[int]:
    """A Transpose's perm; [] stands for the default (reverse all axes)."""
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return []


def _rewire(graph: onnx.GraphProto, folds: dict[str, Fold]) -> None:
    """Point readers of each folded Transpose at `<weight>_t`; drop the Transposes."""
    renamed = {n.output[0]: f"{weight}_t" for weight, fold in folds.items() for n in fold.nodes}
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in renamed:
                node.input[i] = renamed[value]
    _keep(graph.node, lambda n: not (n.op_type == "Transpose" and n.output[0] in renamed))
    _keep(graph.value_info, lambda v: v.name not in renamed)


def _write(fh: BinaryIO, location: str, name: str, tensor: torch.Tensor) -> TensorProto:
    """Append `tensor`'s bytes to `fh` (aligned if large); return its external initializer."""
    if tensor.dtype not in ONNX_DTYPES:
        raise WalkforgeError(f"weight '{name}': dtype {tensor.dtype} has no ONNX equivalent here")
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    offset = fh.tell()
    if data.nbytes > ALIGN_THRESHOLD and offset % ALIGNMENT:
        offset += ALIGNMENT - offset % ALIGNMENT
        fh.seek(offset)
    fh.write(data)
    proto = TensorProto(name=name, data_type=ONNX_DTYPES[tensor.dtype], dims=list(tensor.shape),
                        data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", data.nbytes)):
        proto.external_data.add(key=key, value=str(value))
    return proto


def _drop_inputs(graph: onnx.GraphProto, names: set[str]) -> int:
    before = len(graph.input)
    _keep(graph.input, lambda v: v.name not in names)
    return before - len(graph.input)


def _check_resolved(graph: onnx.GraphProto) -> None:
    inputs = {v.name for v in graph.input}
    missing = [n for n in _free_names(graph) if n not in inputs]
    if missing:
        raise WalkforgeError(f"the graph reads {len(missing)} tensor(s) that are not in the weights "
                             f"file: {', '.join(missing[:5])}" + (" …" if len(missing) > 5 else ""))


def _keep(field_, keep) -> None:
    """Filter a repeated protobuf field in place."""
    kept = [x for x in field_ if keep(x)]
    del field_[:]
    field_.extend(kept)
