"""FP8 KV cache: per-layer K/V scales from the fp32 engines, then an fp8 page pool in every walk.

`calibrate_kv` runs front-API samples through a staged bundle's fp32 cpu engines (the way the
runtime chains them). After every call of a walk that writes the pool in place (pi0's prefill:
its `aliases` map an output onto `kv_pool`), the pages of that call's block table are read back:
amax[l, K|V] is the max |x| over every K (V) written in layer l. Scales are amax / 448
(`graphs.qdq.fp8_scales`). Then every walk that takes the pool is rewritten by
`graphs.functions.fp8_kv_pool` (pool graph inputs/outputs become UINT8 E4M3 bytes, fp8 function bodies),
its contract's pool dtype becomes float8_e4m3fn, and the actions of the first sample are
compared with the fp32 pool's.

The scales land in the manifest ("kv_cache": the runtime binds them as `kv_scales` on every call)
and in `calib/kv_scales.safetensors` (`kv_scales` and `kv_amax`, float32 [L, 2]).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from safetensors.numpy import save_file

from walkforge.compiler.calibrate import run_observed
from walkforge.compiler.check import agreement, worst
from walkforge.compiler.passes import run_pass
from walkforge.compiler.runtime_protocol import Runtime
from walkforge.errors import WalkforgeError
from walkforge.graphs.qdq import fp8_scales
from walkforge.plugins.constants import FP8_POOL_DTYPE

log = logging.getLogger(__name__)
POOL = "kv_pool"
SCALES_FILE = "calib/kv_scales.safetensors"


def calibrate_kv(bundle: Any, samples: Sequence[Mapping[str, np.ndarray]], runtime: Runtime,
                 progress: Any = None, reuse: Path | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    """Measure per-layer KV scales on the fp32 engines and make the bundle's pool fp8 (module doc).

    Modifies the staged walks and `bundle.manifest["walks"]`; returns (the manifest's "kv_cache"
    entry, counts). `reuse`: take the per-layer amax from an earlier bundle with the same weights.
    """
    if not samples:
        raise WalkforgeError("KV calibration got no samples")
    runner = runtime.load(bundle, "cpu", spinning=False, prepack=False)
    if reuse is None:
        amax = _kv_amax(runner, runtime, samples, progress)
    else:
        amax = _reused_amax(reuse, bundle.manifest)
    scales = np.asarray(fp8_scales({"kv": amax})["kv"], np.float32).reshape(amax.shape)
    fp32_actions = [runner.run(dict(samples[0]))]
    del runner
    retyped = {name: _fp8_pool_walk(bundle, name) for name, walk in bundle.manifest["walks"].items()
               if any(s["name"] == POOL for s in walk["inputs"])}  # fmt: skip
    meta = {"samples": len(samples), "method": "max"} if reuse is None else {"reused_from": str(reuse)}
    bundle.path(SCALES_FILE).parent.mkdir(exist_ok=True)
    save_file({"kv_scales": scales, "kv_amax": amax.astype(np.float32)}, str(bundle.path(SCALES_FILE)),
              metadata={k: json.dumps(v) for k, v in meta.items()})  # fmt: skip
    entry = {"dtype": FP8_POOL_DTYPE, "scales": scales.tolist(), "amax": amax.tolist(),
             "scales_file": SCALES_FILE, **meta}  # fmt: skip
    bundle.manifest["kv_cache"] = entry  # the fp8 runner below binds these scales
    fp8 = runtime.load(bundle, "cpu", spinning=False, prepack=False).run(dict(samples[0]))
    entry["vs_fp32"] = worst([agreement(fp8[k], fp32_actions[0][k]) for k in fp8]).to_json()
    log.info("fp8 KV cache: scales per layer %s; actions vs fp32 pool %s", scales.tolist(), entry["vs_fp32"])
    return entry, {"kv_layers": int(scales.shape[0]), "kv_walks_fp8": len(retyped),
                   "kv_pool_values_fp8": sum(retyped.values())}  # fmt: skip


def _kv_amax(runner: Any, runtime: Runtime, samples: Sequence[Mapping[str, np.ndarray]],
             progress: Any) -> np.ndarray:
    """float64 [L, 2]: max |K| and |V| per layer written by the pool-writing walks over `samples`."""
    to_numpy = runtime.to_numpy

    writers = {name for name, walk in runner.manifest["walks"].items()
               if POOL in walk.get("aliases", {}).values()}  # fmt: skip
    found: list[np.ndarray] = []

    def observe(walk: str, inputs: Mapping[str, Any], _seconds: float) -> None:
        if walk in writers:  # observed after the call: the pool holds what it wrote
            pool = to_numpy(inputs[POOL])  # [L, 2, NP, PS, KVH, D]
            table = np.asarray(to_numpy(inputs["block_table"]))
            pages = np.unique(table[table >= 0])
            if pages.size:
                found.append(np.abs(pool[:, :, pages]).max(axis=(2, 3, 4, 5)))

    run_observed(runner, samples, observe, progress, "calibrating KV")
    if not found:
        raise WalkforgeError("KV calibration: no walk wrote the KV page pool")
    return np.max(found, axis=0).astype(np.float64)


def _fp8_pool_walk(bundle: Any, name: str) -> int:
    """Rewrite walk `name`'s ONNX for an fp8 pool and its contract's pool dtype; return values retyped."""
    walk = bundle.manifest["walks"][name]
    path = bundle.path(walk["onnx"])
    model = onnx.load(str(path), load_external_data=False)
    model, counts = run_pass("fp8_kv_pool", model)
    onnx.save(model, str(path))
    retyped = {v.name for v in (*model.graph.input, *model.graph.output)
               if v.type.tensor_type.elem_type == onnx.TensorProto.UINT8}  # fmt: skip
    for spec in (*walk["inputs"], *walk["outputs"]):
        if spec["name"] in retyped:
            spec["dtype"] = FP8_POOL_DTYPE
    return counts["kv_pool_fp8"]


def _reused_amax(old: Path, manifest: Mapping[str, Any]) -> np.ndarray:
    from walkforge.compiler.quantize import reusable_manifest

    kv = reusable_manifest(old, manifest).kv_cache
    if kv is None or kv.amax is None:
        raise WalkforgeError(f"--reuse-calibration {old}: that bundle has no FP8 KV calibration")
    return np.asarray(kv.amax, np.float64)
