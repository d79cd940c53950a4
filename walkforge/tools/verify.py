"""Agreement of a bundle's engines with the fp32 torch reference, per walk and end to end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from walkforge.artifacts.bundle import Bundle, require_reference_weights
from walkforge.compiler.check import agreement, worst
from walkforge.recipes.inputs import example_inputs
from walkforge.runtimes import load
from walkforge.runtimes.kv_pool import decode_pool, encode_pool
from walkforge.runtimes.values import to_numpy

CALLS_PER_WALK = 3  # per-walk agreement looks at the first few calls of each walk (loop steps)


def verify(bundle: Bundle, backend: str = "cpu", batch: int = 2, seed: int = 1234,
           threads: int | None = None, **dims: Any) -> dict[str, Any]:
    """Run held-out inputs (another seed than compile's examples) through `backend` and torch.

    Per-walk numbers feed each engine the torch reference's own inputs, so errors do not
    compound; end-to-end numbers compare the final outputs. A deployment bundle (no reference
    weights) is refused in one line: `integrity` is what can be checked of it.
    """
    require_reference_weights(bundle, "verify (it compares the engines with torch)")
    feeds = example_inputs(bundle, batch=batch, seed=seed, **dims)
    engine_run = load(bundle, backend, threads=threads, spinning=False)
    torch_run = load(bundle, "torch", threads=threads)
    calls: dict[str, list[dict[str, np.ndarray]]] = {}

    def record(walk: str, inputs: Mapping[str, Any], _seconds: float) -> None:
        if len(calls.setdefault(walk, [])) < CALLS_PER_WALK:
            calls[walk].append({k: to_numpy(v).copy() for k, v in inputs.items()})

    torch_run.chain.observer = record
    want = torch_run.run(feeds)
    got = engine_run.run(feeds)
    walks = {name: _walk_agreement(engine_run.engines[name], torch_run.engines[name], envs)
             for name, envs in calls.items()}
    e2e = {k: agreement(got[k], want[k]).to_json() for k in want}
    return {"backend": backend, "batch": batch, "seed": seed, "walks": walks, "end_to_end": e2e}


def _walk_agreement(engine: Any, reference: Any, envs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    results = []
    for env in envs:
        ref = {k: to_numpy(v) for k, v in reference.run(env).items()}
        out = {k: to_numpy(v) for k, v in engine.run(_as_engine_inputs(engine, env)).items()}
        for k in ref:
            if ref[k].dtype.kind == "f":  # an fp8 pool is compared by its values
                got = decode_pool(out[k], env["kv_scales"]) if out[k].dtype != ref[k].dtype else out[k]
                results.append(agreement(got, ref[k]))
    return worst(results).to_json()


def _as_engine_inputs(engine: Any, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's inputs in the engine's dtypes: its fp32 page pool becomes an fp8 one."""
    feeds = dict(env)
    for spec in engine.inputs:
        if spec.dtype == "float8_e4m3fn" and feeds[spec.name].dtype == np.float32:
            feeds[spec.name] = encode_pool(feeds[spec.name], env["kv_scales"])
    return feeds


def integrity(root: Any, digest: str | None = None) -> dict[str, Any]:
    """Re-hash every file of the bundle at `root` against its manifest, stamps ignored (and
    renewed): what `walkforge verify --integrity` reports. Raises on the first bad file."""
    bundle = Bundle.open(root, digest=digest, integrity=True)
    files = bundle.typed.files
    return {"bundle": str(bundle.root), "digest": bundle.digest, "kind": bundle.kind,
            "files": bundle.hashed, "bytes": sum(f.size for f in files.values()), "ok": True}
