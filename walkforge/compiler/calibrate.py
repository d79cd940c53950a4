"""Calibration for the Q/DQ pass (FP8 or INT8): activation and weight amax, per-layer sensitivity.

Activation amax comes from running the fp32 ONNX on onnxruntime with the activation inputs of
every MatMul/Gemm/Conv exposed as extra graph outputs. Two methods:

- `max`: max |x| over all elements of all samples (exact).
- `percentile`: the given percentile of |x| over all elements of all samples (numpy's
  `method="higher"`), read from one log2-spaced histogram per tensor (64 bins per octave,
  2^-40 … 2^24, 32 KiB): memory stays constant in the number of samples, and the result is
  at most 2^(1/64) (1.1%) above the exact order statistic and never above the max.

Weight amax is per output channel (MatMul [K, N] → N, Gemm transB [N, K] → N, Conv
[O, I, kh, kw] → O). Scales are amax / 448 for fp8, amax / 127 for int8
(`graphs.qdq.qdq_scales`); a bundle keeps them in its scales file (`compiler.quantize.save_scales`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from walkforge.artifacts.npz import read_npz
from walkforge.compiler.check import agreement, worst
from walkforge.compiler.runtime_protocol import host_copy
from walkforge.errors import WalkforgeError
from walkforge.graphs.ort import require_onnxruntime, session_kwargs, session_options
from walkforge.graphs.qdq import (
    GEMM_OPS,
    node_name,
    plan_qdq,
    quantize_qdq,
    read_tensor,
    weight_uses,
)

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)
METHODS = ("max", "percentile")
BINS_PER_OCTAVE = 64
LOG2_RANGE = (-40, 24)  # |x| below 2^-40 counts as zero; above 2^24 lands in the top bin
PROTO_LIMIT = (1 << 31) - (1 << 26)  # serialized protobuf limit, with headroom


class AmaxCollector:
    """Running amax (or |x| histogram) per activation tensor of one ONNX model."""

    def __init__(self, model: onnx.ModelProto, method: str = "max", percentile: float = 99.99,
                 base_dir: str | Path | None = None) -> None:
        if method not in METHODS:
            raise WalkforgeError(f"calibration method must be one of {METHODS}, got '{method}'")
        if not 0 < percentile <= 100:
            raise WalkforgeError(f"calibration percentile must be in (0, 100], got {percentile}")
        self.method, self.percentile, self.samples = method, percentile, 0
        self.tensors = activation_inputs(model)
        self.inputs = [i.name for i in model.graph.input]
        self.amax: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.session = _session(_with_outputs(model, self.tensors), base_dir)
        self.fetch = [o.name for o in self.session.get_outputs() if o.name in set(self.tensors)]

    def update(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Run one sample (extra keys in `feeds` are ignored) and fold its activations in."""
        feeds = {k: np.asarray(feeds[k]) for k in self.inputs}
        values = dict(zip(self.fetch, self.session.run(self.fetch, feeds), strict=True))
        for name in self.tensors:
            x = values[name] if name in values else feeds[name]
            if x.dtype.kind != "f" or x.size == 0:
                continue
            a = np.abs(x.astype(np.float32, copy=False)).ravel()
            self.amax[name] = max(self.amax.get(name, 0.0), float(a.max()))
            if self.method == "percentile":
                self.hist[name] = self.hist.get(name, 0) + _log2_histogram(a)
        self.samples += 1

    def result(self) -> dict[str, float]:
        if self.samples == 0:
            raise WalkforgeError("calibration got no samples")
        if self.method == "max":
            return dict(self.amax)
        return {k: min(_histogram_percentile(self.hist[k], self.percentile), v)
                for k, v in self.amax.items()}


def collect_amax(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], method: str = "max",
                 percentile: float = 99.99, progress: Any = None,
                 base_dir: str | Path | None = None) -> dict[str, float]:
    """Per-tensor amax of every MatMul/Gemm/Conv activation input over `feeds` (see module doc).

    `progress` is an optional live `rich.progress.Progress` to show a calibration bar on;
    `base_dir` locates external weight data not loaded into `model`.
    """
    collector = AmaxCollector(model, method, percentile, base_dir)
    total = len(feeds) if isinstance(feeds, Sequence) else None
    task = progress.add_task("calibrating", total=total) if progress is not None else None
    for sample in feeds:
        collector.update(sample)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    amax = collector.result()
    log.info("calibrated %d activation tensors over %d samples (%s)", len(amax), collector.samples, method)
    return amax


def activation_inputs(model: onnx.ModelProto) -> list[str]:
    """Non-weight inputs of every MatMul/Gemm/Conv of the main graph, in graph order, unique."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    weights = {u.node.input[1] for u in weight_uses(model)}
    names: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type in GEMM_OPS and node.domain in ("", "ai.onnx"):
            names.update((x, None) for x in node.input[:2] if x and x not in consts | weights)
    return list(names)


def weight_amax(model: onnx.ModelProto, base_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Per-output-channel max |w| of every MatMul/Gemm/Conv weight initializer, by its name."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for use in weight_uses(model):
        if use.weight not in out:
            w = np.abs(read_tensor(inits[use.weight], base_dir).astype(np.float32))
            other = tuple(i for i in range(w.ndim) if i != use.axis)
            out[use.weight] = w.max(axis=other).astype(np.float32)
    return out


def per_layer_sensitivity(model: onnx.ModelProto, act_scales: Mapping[str, float],
                          weight_scales: Mapping[str, np.ndarray],
                          feeds: Sequence[Mapping[str, np.ndarray]],
                          reference_outputs: Sequence[Mapping[str, np.ndarray]],
                          base_dir: str | Path | None = None, dtype: str = "fp8"
                          ) -> list[tuple[str, float]]:
    """Quantise one node at a time to `dtype`; return (node name, worst output cosine vs
    reference), lowest first. `reference_outputs[i]` holds the fp32 outputs (by name) for `feeds[i]`.
    """
    uses, _ = plan_qdq(model, base_dir=base_dir)
    result = []
    for use in uses:
        single = onnx.ModelProto()
        single.CopyFrom(model)
        quantize_qdq(single, act_scales, weight_scales, lambda n, keep=use.name: node_name(n) != keep,
                     base_dir, dtype)
        session = _session(single, base_dir, fuse_qdq=dtype == "int8")
        scores = []
        for sample, want in zip(feeds, reference_outputs, strict=True):
            names = list(want)
            got = session.run(names, {i.name: sample[i.name] for i in session.get_inputs()})
            scores += [agreement(g, want[k]) for k, g in zip(names, got, strict=True)]
        result.append((use.name, worst(scores).cosine))
    return sorted(result, key=lambda item: item[1])


def _run_samples(runner: Any, runtime: Any, collectors: Mapping[str, AmaxCollector], samples: list,
                 progress: Any) -> dict[str, dict[str, np.ndarray]]:
    """Run front-API samples through `runner`, feeding every engine call to its walk's collector;
    return each walk's first call inputs."""
    first: dict[str, dict[str, np.ndarray]] = {}

    def observe(walk: str, inputs: Mapping[str, Any], _seconds: float) -> None:
        feeds = host_copy(runtime, inputs)
        collectors[walk].update(feeds)
        first.setdefault(walk, feeds)

    run_observed(runner, samples, observe, progress, "calibrating")
    return first


def run_observed(runner: Any, samples: Sequence[Mapping[str, np.ndarray]], observe: Any,
                 progress: Any, label: str) -> None:
    """Run front-API `samples` through `runner` with `observe(walk, inputs, seconds)` seeing
    every engine call, under a progress task when `progress` (a live rich Progress) is given."""
    runner.chain.observer = observe
    task = progress.add_task(label, total=len(samples)) if progress is not None else None
    try:
        for sample in samples:
            runner.run(dict(sample))
            if progress is not None:
                progress.advance(task)
    finally:
        runner.chain.observer = None
        if progress is not None:
            progress.remove_task(task)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` (weights loaded) to `path`, its weights to a fresh `<path>.data`."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name)


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A shallow-graph copy of `model` with `names` (that are not graph inputs) as extra outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return out


def _session(model: onnx.ModelProto, base_dir: str | Path | None = None,
             fuse_qdq: bool = False) -> ort.InferenceSession:
    """A CPU session for a throwaway model (a large one may be moved to external data);
    `fuse_qdq` for an int8 model, to run it on the integer kernels the engines use."""
    ort = require_onnxruntime()
    opts = session_options(spinning=False, fuse_qdq=fuse_qdq, prepack=False)
    kw = session_kwargs(["CPUExecutionProvider"], fuse_qdq)
    if base_dir is None and model.ByteSize() < PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, **kw)
    if base_dir is not None:  # external data paths are relative to base_dir: put the graph there
        fd, name = tempfile.mkstemp(suffix=".onnx", dir=base_dir)
        os.close(fd)
        try:
            onnx.save(model, name)
            return ort.InferenceSession(name, opts, **kw)
        finally:
            os.unlink(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, opts, **kw)


def _log2_histogram(a: np.ndarray) -> np.ndarray:
    lo, hi = LOG2_RANGE
    bins = (hi - lo) * BINS_PER_OCTAVE
    with np.errstate(divide="ignore"):
        idx = np.floor((np.log2(a) - lo) * BINS_PER_OCTAVE)
    idx = np.clip(np.nan_to_num(idx, neginf=0), 0, bins - 1).astype(np.int64)
    return np.bincount(idx, minlength=bins)


def _histogram_percentile(hist: np.ndarray, percentile: float) -> float:
    """Upper edge of the bin holding numpy's `method="higher"` order statistic."""
    cum = np.cumsum(hist)
    rank = int(np.ceil((cum[-1] - 1) * percentile / 100)) + 1  # 1-based
    b = int(np.searchsorted(cum, rank))
    return float(2.0 ** (LOG2_RANGE[0] + (b + 1) / BINS_PER_OCTAVE))


def calibration_samples(bundle: Any, data: Path | None, count: int, seed: int
                        ) -> list[dict[str, np.ndarray]]:
    """Front-API inputs to calibrate on: the user's npz (one run), else `count` seeded example
    batches from the recipe's `fake_inputs` (its documented synthetic distribution)."""
    if data is not None:
        return [read_npz(data, "--calib-data")]
    from walkforge.recipes.inputs import example_inputs

    return [example_inputs(bundle, batch=2, seed=seed + 1000 + k) for k in range(count)]
