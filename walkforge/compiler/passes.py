"""The ONNX graph passes the pipeline applies, listed by name. Each takes a model (and its
options) and returns the model with counts of what it changed; `run_pass` logs the counts.

    attach_functions   walkforge op function bodies (passes stage)
    fp8_kv_pool        the page pool carried as E4M3 bytes, fp8 bodies (kv_cache stage)
    quantize_fp8       FP8 Q/DQ on GEMM/conv inputs and weights (calibrate stage)
    quantize_int8      the same pass with INT8 Q/DQ, one Q/DQ pair per GEMM (calibrate stage)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import onnx

from walkforge import plugins
from walkforge.graphs.fp8 import quantize_fp8, quantize_int8

log = logging.getLogger(__name__)

Pass = Callable[..., tuple[onnx.ModelProto, dict[str, int]]]
PASSES: dict[str, Pass] = {
    "attach_functions": plugins.attach_functions,
    "fp8_kv_pool": plugins.fp8_kv_pool,
    "quantize_fp8": quantize_fp8,
    "quantize_int8": quantize_int8,
}


def run_pass(name: str, model: onnx.ModelProto, *args: Any, **options: Any
             ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Apply pass `name` to `model`; return (model, counts)."""
    model, counts = PASSES[name](model, *args, **options)
    log.info("pass %s on %s: %s", name, model.graph.name or "model", counts)
    return model, counts


def add_counts(totals: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """`totals` += `counts`, key by key; returns `totals`."""
    for key, n in counts.items():
        totals[key] = totals.get(key, 0) + n
    return totals
