"""FP8 or INT8 for a staged bundle: calibrate (or reuse) scales, quantise every walk, gate end to end.

1. Scales: run calibration samples through the fp32 cpu engines the way the runtime chains
   them (every engine call, each loop step included, is a sample of its walk) — or take them
   from an earlier bundle with the same weights (`reuse`). One artifact holds them all:
   `calib/scales.safetensors`, keys `<walk>/act/<tensor>` and `<walk>/weight/<initializer>`,
   metadata `dtype` and `weight_max` (scales are amax / the dtype's max, weights' amax / weight_max:
   int8 weights have 8 bits by default, 7 on request; reused scales convert between dtypes and weight widths).
2. Quantise: the Q/DQ pass (graphs/qdq.py) in that dtype over every walk, minus excluded nodes.
   int8 weights by default (`int8_weight_bits=None`): 7 bits where the end-to-end cosine stays at
   or above graphs.qdq.SEVEN_BIT_MIN_COSINE (and the gate), else 8 bits (the same scales, rescaled).
3. Gate (`min_cosine`): end-to-end cosine of the front API's outputs vs the fp32 engines on
   held-out inputs. While below the gate, exclude the most sensitive nodes (each measured by
   quantising it alone), doubling how many, and quantise again. Reports what it excluded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from safetensors import safe_open
from safetensors.numpy import save_file

from walkforge.artifacts.bundle import Bundle, read_typed_manifest
from walkforge.artifacts.manifest import Manifest, as_manifest
from walkforge.compiler.calibrate import (
    AmaxCollector,
    _run_samples,
    _session,
    per_layer_sensitivity,
    save_model,
    weight_amax,
)
from walkforge.compiler.check import agreement, worst
from walkforge.compiler.export import op_counts
from walkforge.compiler.passes import add_counts, run_pass
from walkforge.compiler.runtime_protocol import Runtime, host_copy
from walkforge.errors import WalkforgeError
from walkforge.graphs.qdq import QDTYPES, SEVEN_BIT_MIN_COSINE, int8_weight_max, qdq_scales

SCALES_FILE = "calib/scales.safetensors"
HELD_OUT_SEEDS = (7001, 7002)  # end-to-end gate inputs; calibration uses seed + 1000 + k

Scales = dict[str, tuple[dict[str, float], dict[str, np.ndarray]]]  # walk → (activations, weights)
MANIFEST_PRECISION = {"fp8": "fp8_e4m3", "int8": "int8"}  # dtype → manifest precision weights/activations


@dataclass(frozen=True)
class QdqOptions:
    """How a bundle is quantised; `dtype` "fp8" or "int8"."""

    method: str = "max"
    percentile: float = 99.99
    reuse: Path | None = None  # an earlier bundle whose scales to take (same weights only)
    min_cosine: float | None = None  # end-to-end gate; None = measure, never exclude
    exclude: tuple[str, ...] = ()  # node names or torch module paths never quantised
    dtype: str = "fp8"
    # int8 weights at ±63 (7) or ±127 (8), graphs.qdq.int8_weight_max; None: 7 where accurate enough
    int8_weight_bits: int | None = None

    @property
    def weight_max(self) -> float:
        """The largest quantised weight magnitude to start from: weights' scales are their amax /
        this (int8 with bits chosen by accuracy: 7 bits first)."""
        if self.dtype != "int8":
            return QDTYPES[self.dtype].max
        return int8_weight_max(7 if self.int8_weight_bits is None else self.int8_weight_bits)


Fp8Options = QdqOptions  # its name before int8


def quantize_bundle(bundle: Bundle, samples: Sequence[Mapping[str, np.ndarray]], opts: QdqOptions,
                    runtime: Runtime, progress: Any = None) -> tuple[dict[str, Any], dict[str, int]]:
    """Make every walk of a staged fp32 bundle `opts.dtype`, running it on `runtime`'s cpu engines;
    return the manifest's calibration entry and the Q/DQ pass counts summed over walks. Sets the
    manifest's precision weights/activations (the cpu engines fuse int8 Q/DQ by it)."""
    from walkforge.recipes.inputs import example_inputs

    paths = {name: bundle.path(w.onnx) for name, w in bundle.typed.walks.items()}
    runner = runtime.load(bundle, "cpu", spinning=False, prepack=False)
    held_out = [example_inputs(bundle, batch=2, seed=s) for s in HELD_OUT_SEEDS]
    first: dict[str, dict[str, np.ndarray]] = {}
    runner.chain.observer = lambda walk, inputs, _s: first.setdefault(walk, host_copy(runtime, inputs))
    reference = [runner.run(dict(s)) for s in held_out]
    if opts.reuse is not None:
        scales, meta = reused_scales(opts.reuse, bundle.manifest, opts.dtype, opts.weight_max)
    else:
        scales, meta = collected_scales(runner, runtime, paths, samples, opts, progress)
    del runner  # its sessions read the fp32 files about to be rewritten
    save_scales(bundle.path(SCALES_FILE), scales, meta)
    precision = MANIFEST_PRECISION[opts.dtype]
    bundle.manifest["precision"] |= {"weights": precision, "activations": precision}
    if opts.dtype == "int8":  # the cpu engines pick their int8 kernels by it (graphs.ort)
        bundle.manifest["precision"]["int8_weight_max"] = int(opts.weight_max)
    ranking: list[tuple[str, str, float]] = []
    with fp32_aside(bundle, paths) as fp32:

        def attempt(n: int) -> tuple[dict[str, set[str]], dict[str, int], dict[str, float]]:
            """Quantise with the n most sensitive nodes kept in fp32 (written to the bundle)."""
            excluded: dict[str, set[str]] = {name: set() for name in paths}
            for walk, node, _ in ranking[:n]:
                excluded[walk].add(node)
            counts = _quantize_all(bundle, fp32, scales, excluded, opts.exclude, opts.dtype)
            return excluded, counts, _end_to_end(runtime, bundle, held_out, reference)

        excluded, counts, e2e = attempt(0)
        if opts.dtype == "int8" and opts.int8_weight_bits is None:
            tried, floor = {"7": e2e["cosine"]}, max(SEVEN_BIT_MIN_COSINE, opts.min_cosine or 0)
            if e2e["cosine"] < floor:
                full = int8_weight_max(8)
                scales = rescaled(scales, weight_ratio=np.float32(meta["weight_max"] / full))
                meta = {**meta, "weight_max": full}
                save_scales(bundle.path(SCALES_FILE), scales, meta)
                bundle.manifest["precision"]["int8_weight_max"] = int(full)
                excluded, counts, e2e = attempt(0)
                tried["8"] = e2e["cosine"]
            meta = {**meta, "weight_bits": {"auto": True, "bits": 8 if "8" in tried else 7,
                                            "min_cosine": floor, "cosine": tried}}
        if opts.min_cosine is not None and e2e["cosine"] < opts.min_cosine:
            ranking = sensitivity_ranking(fp32, scales, first, opts.dtype)
            excluded, counts, e2e = _fewest_exclusions(attempt, len(ranking), opts.min_cosine, e2e,
                                                       opts.dtype)
    entry = {**meta, "scales": SCALES_FILE, "end_to_end": e2e,
             "gate": {"min_cosine": opts.min_cosine,
                      "excluded": sorted(f"{w}:{n}" for w, names in excluded.items() for n in names)}}
    return entry, counts


@contextlib.contextmanager
def fp32_aside(bundle: Bundle, paths: Mapping[str, Path]) -> Iterator[dict[str, Path]]:
    """Move each walk's fp32 ONNX and its weights file into a sibling folder of the staged bundle
    (a rename: no copy) and yield walk → that ONNX; removed on exit. The quantiser then loads one
    walk's fp32 weights at a time instead of all of them (full-size pi0: 12.5 GB, which with the
    calibration sessions did not fit in 24 GiB)."""
    aside = Path(tempfile.mkdtemp(prefix=".fp32-walks-", dir=bundle.root.parent))
    try:
        moved = {}
        for name, path in paths.items():
            for file in (path, path.with_name(path.name + ".data")):
                if file.exists():
                    os.replace(file, aside / file.name)
            moved[name] = aside / path.name
        yield moved
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def collected_scales(runner: Any, runtime: Runtime, paths: Mapping[str, Path],
                     samples: Sequence[Mapping[str, np.ndarray]], opts: QdqOptions,
                     progress: Any) -> tuple[Scales, dict[str, Any]]:
    """Activation amax from `samples` through the chained fp32 engines; weight amax per channel
    (each walk's weights loaded in turn)."""
    collectors = {name: AmaxCollector(onnx.load(str(p), load_external_data=False), opts.method,
                                      opts.percentile, p.parent) for name, p in paths.items()}
    _run_samples(runner, runtime, collectors, list(samples), progress)
    # a walk without GEMMs has nothing to calibrate, and may not have run (a flow VLA's guide)
    scales = {name: (qdq_scales(c.result() if c.tensors else {}, opts.dtype),
                     qdq_scales(weight_amax(onnx.load(str(paths[name]))), opts.dtype, opts.weight_max))
              for name, c in collectors.items()}
    meta = {"dtype": opts.dtype, "weight_max": opts.weight_max, "method": opts.method,
            "samples": len(samples), "calls": {name: c.samples for name, c in collectors.items()}}
    return scales, meta | ({"percentile": opts.percentile} if opts.method == "percentile" else {})


def reusable_manifest(old: Path, manifest: Manifest | Mapping[str, Any]) -> Manifest:
    """The manifest of an earlier bundle whose calibration may be reused: same weights only."""
    theirs = read_typed_manifest(Path(old))
    mine, their_fp = as_manifest(manifest).weights.fingerprint, theirs.weights.fingerprint
    if their_fp != mine:
        raise WalkforgeError(f"--reuse-calibration {old}: its weights fingerprint {their_fp[:19]}… "
                             f"differs from this compile's {mine[:19]}…")
    return theirs


def reused_scales(old: Path, manifest: Manifest | Mapping[str, Any], dtype: str = "fp8",
                  weight_max: float | None = None) -> tuple[Scales, dict[str, Any]]:
    """Scales of an earlier bundle for `dtype` with weights up to `weight_max` (default: the
    dtype's max): an fp8 bundle's serve an int8 compile and back, 8-bit int8 weights' a 7-bit
    compile (the amax is the same); refused unless its weights fingerprint and walks match."""
    manifest = as_manifest(manifest)
    calibration = reusable_manifest(old, manifest).precision.calibration
    if not calibration or calibration.get("scales") != SCALES_FILE:
        raise WalkforgeError(f"--reuse-calibration {old}: that bundle has no FP8/INT8 calibration")
    scales, meta = load_scales(Path(old) / SCALES_FILE)
    their_max = QDTYPES[meta.get("dtype", "fp8")].max
    act_ratio = np.float32(their_max / QDTYPES[dtype].max)
    weight_max = QDTYPES[dtype].max if weight_max is None else weight_max
    weight_ratio = np.float32(meta.get("weight_max", their_max) / weight_max)  # absent before 0.3.2
    scales = rescaled(scales, act_ratio, weight_ratio)
    if set(scales) != set(manifest.walks):
        raise WalkforgeError(f"--reuse-calibration {old}: walks {sorted(scales)} differ from "
                             f"{sorted(manifest.walks)}")
    return scales, {**meta, "dtype": dtype, "weight_max": weight_max, "reused_from": str(old)}


def rescaled(scales: Scales, act_ratio: float = 1.0, weight_ratio: float = 1.0) -> Scales:
    """`scales` with activations' times `act_ratio` and weights' times `weight_ratio` (float32):
    for another dtype's max or another int8 weight width (the amax they stand for is the same)."""
    if act_ratio == 1 and weight_ratio == 1:
        return scales
    act_ratio, weight_ratio = np.float32(act_ratio), np.float32(weight_ratio)
    return {walk: ({k: float(np.float32(v) * act_ratio) for k, v in act.items()},
                   {k: (v * weight_ratio).astype(np.float32) for k, v in weights.items()})
            for walk, (act, weights) in scales.items()}


def save_scales(path: Path, scales: Scales, meta: Mapping[str, Any]) -> None:
    """All walks' scales (float32) in one safetensors file; metadata values are JSON."""
    tensors = {}
    for walk, (act, weights) in scales.items():
        tensors |= {f"{walk}/act/{k}": np.asarray(v, np.float32).reshape(()) for k, v in act.items()}
        tensors |= {f"{walk}/weight/{k}": np.ascontiguousarray(v, np.float32).ravel()
                    for k, v in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})


def load_scales(path: Path) -> tuple[Scales, dict[str, Any]]:
    """Read what `save_scales` wrote."""
    scales: Scales = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            walk, kind, name = key.split("/", 2)
            act, weights = scales.setdefault(walk, ({}, {}))
            if kind == "act":
                act[name] = float(f.get_tensor(key))
            else:
                weights[name] = f.get_tensor(key)
    return scales, meta


def sensitivity_ranking(fp32: Mapping[str, Path], scales: Scales,
                        first: Mapping[str, Mapping[str, np.ndarray]], dtype: str = "fp8"
                        ) -> list[tuple[str, str, float]]:
    """(walk, node, cosine when only that node is `dtype`), most sensitive first, over all walks
    (`fp32`: walk → its fp32 ONNX, loaded one at a time)."""
    ranking = []
    for walk, path in fp32.items():
        if walk not in first:  # never ran on the held-out inputs (a flow VLA's guide): nothing to rank
            continue
        model = onnx.load(str(path))
        feeds = {i.name: first[walk][i.name] for i in model.graph.input}
        names = [o.name for o in model.graph.output]
        want = dict(zip(names, _session(model).run(names, feeds), strict=True))
        act, weights = scales[walk]
        ranking += [(walk, node, cos) for node, cos in
                    per_layer_sensitivity(model, act, weights, [feeds], [want], dtype=dtype)]
    return sorted(ranking, key=lambda item: item[2])


def _fewest_exclusions(attempt: Any, total: int, gate: float, ungated: dict[str, float],
                       dtype: str = "fp8") -> tuple:
    """Smallest n whose `attempt(n)` reaches the gate: double n until it holds, then bisect
    (assumes accuracy grows with n, true in practice as the ranking is most-sensitive first).
    The bundle is left quantised as the returned attempt."""
    failing, n = 0, 1
    while True:
        result = attempt(min(n, total))
        if result[2]["cosine"] >= gate:
            break
        if n >= total:
            raise WalkforgeError(f"{dtype.upper()} gate {gate} not reached (end-to-end cosine "
                                 f"{result[2]['cosine']:.6f}, {ungated['cosine']:.6f} with no layer "
                                 "excluded) even with every quantisable node kept in fp32")
        failing, n = n, 2 * n
    passing, best = min(n, total), result
    while passing - failing > 1:
        mid = (failing + passing) // 2
        result = attempt(mid)
        if result[2]["cosine"] >= gate:
            passing, best = mid, result
        else:
            failing = mid
    return best if result is best else attempt(passing)


def _quantize_all(bundle: Bundle, fp32: Mapping[str, Path], scales: Scales,
                  excluded: Mapping[str, set[str]], user: tuple[str, ...], dtype: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for name, source in fp32.items():
        model = onnx.load(str(source))  # this walk's fp32 weights, and only while it is quantised
        act, weights = scales[name]
        model, counts = run_pass(f"quantize_{dtype}", model, act, weights, exclude=set(user) | excluded[name])
        save_model(model, bundle.path(bundle.manifest["walks"][name]["onnx"]))
        bundle.manifest["walks"][name]["ops"] = op_counts(model)
        add_counts(totals, counts)
    return totals


def _end_to_end(runtime: Runtime, bundle: Bundle, held_out: list[dict[str, np.ndarray]],
                reference: list[dict[str, np.ndarray]]) -> dict[str, float]:
    runner = runtime.load(bundle, "cpu", spinning=False, prepack=False)
    results = [agreement(got[k], want[k]) for sample, want in zip(held_out, reference, strict=True)
               for got in [runner.run(dict(sample))] for k in want]
    return worst(results).to_json()

