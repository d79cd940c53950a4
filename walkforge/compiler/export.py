"""Trace one walk to ONNX with torch's dynamo exporter.

Input/output names and dynamic axes come from the walk's TensorSpecs; custom ops are emitted
as single `walkforge::<Name>` nodes through the plugins' translation table.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from walkforge import plugins
from walkforge.graphs.walk import GraphNode

log = logging.getLogger(__name__)
# The exporter warns once per missing torchvision op; none of our walks use torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
OPSET = 20
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to `<walk>.onnx.data`


def dynamic_shapes(node: GraphNode) -> dict[str, dict[int, str]]:
    return {spec.name: spec.dynamic_axes for spec in node.inputs}


def export_walk(node: GraphNode, path: Path) -> dict[str, int]:
    """Export `node` to `path`; return op counts of the saved graph."""
    args = tuple(node.example_inputs[s.name] for s in node.inputs)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            node.module.eval(), args, dynamo=True, opset_version=OPSET,
            input_names=[s.name for s in node.inputs],
            output_names=[s.name for s in node.outputs],
            dynamic_shapes=dynamic_shapes(node),
            custom_translation_table=plugins.translation_table(),
            verbose=False,
        )
    big = sum(p.numel() * p.element_size() for p in node.module.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=big)
    return op_counts(onnx.load(str(path), load_external_data=False))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type (custom ops as `domain::Op`), sorted by name."""
    counts = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in model.graph.node
    )
    return dict(sorted(counts.items()))
