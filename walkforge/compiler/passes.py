"""The ONNX graph passes the pipeline applies, listed by name. Each takes a model (and its
options) and returns the model with counts of what it changed; `run_pass` logs the counts.

    attach_functions   walkforge op function bodies (passes stage)
    fp8_kv_pool        the page pool carried as E4M3 bytes, fp8 bodies (kv_cache stage)
    quantize_fp8       FP8 Q/DQ on GEMM/conv inputs and weights (calibrate stage)
    quantize_int8      the same pass with INT8 Q/DQ, one Q/DQ pair per GEMM (calibrate stage)
    cast_bf16          bf16 weights and GEMM/conv math, fp32 elsewhere (calibrate stage, --precision bf16)
    emulate_bf16       a bf16 graph as fp32 math between bf16 roundings, for the CPU check of cast_bf16
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import onnx

from walkforge.graphs.bf16 import cast_bf16, emulate_bf16
from walkforge.graphs.functions import attach_functions, fp8_kv_pool
from walkforge.graphs.qdq import quantize_fp8, quantize_int8

log = logging.getLogger(__name__)

Pass = Callable[..., tuple[onnx.ModelProto, dict[str, int]]]
PASSES: dict[str, Pass] = {
    "attach_functions": attach_functions,
    "fp8_kv_pool": fp8_kv_pool,
    "quantize_fp8": quantize_fp8,
    "quantize_int8": quantize_int8,
    "cast_bf16": cast_bf16,
    "emulate_bf16": emulate_bf16,
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


def bf16_bundle(bundle: Any, runtime: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """--precision bf16 on a staged fp32 bundle: `cast_bf16` every walk, gated end to end on the
    cpu engines through `emulate_bf16` (onnxruntime's CPU provider has no bf16 GEMMs). Returns the
    manifest's check entry (worst agreement of every output vs the fp32 chain on held-out inputs)
    and the pass counts summed over walks; the bundle's walks are left bf16."""
    from walkforge.compiler.calibrate import save_model
    from walkforge.compiler.check import agreement, worst
    from walkforge.compiler.export import op_counts
    from walkforge.compiler.quantize import HELD_OUT_SEEDS
    from walkforge.recipes.inputs import example_inputs

    held_out = [example_inputs(bundle, batch=2, seed=s) for s in HELD_OUT_SEEDS]
    runner = runtime.load(bundle, "cpu", spinning=False, prepack=False)
    reference = [runner.run(dict(sample)) for sample in held_out]
    del runner  # its sessions read the fp32 files about to be rewritten
    paths = {name: bundle.path(w.onnx) for name, w in bundle.typed.walks.items()}
    totals: dict[str, int] = {}
    bf16 = {}
    for name, path in paths.items():
        bf16[name], counts = run_pass("cast_bf16", onnx.load(str(path)))
        add_counts(totals, counts)
        emulated = onnx.ModelProto()
        emulated.CopyFrom(bf16[name])
        save_model(run_pass("emulate_bf16", emulated)[0], path)
    runner = runtime.load(bundle, "cpu", spinning=False, prepack=False)
    e2e = worst([agreement(got[k], want[k]) for sample, want in zip(held_out, reference, strict=True)
                 for got in [runner.run(dict(sample))] for k in want]).to_json()
    del runner
    for name, path in paths.items():
        save_model(bf16[name], path)
        bundle.manifest["walks"][name]["ops"] = op_counts(bf16[name])
    return {"dtype": "bf16", "check": "cpu engines, bf16 GEMMs emulated (graphs/bf16.emulate_bf16)",
            "samples": len(held_out), "end_to_end": e2e}, totals
