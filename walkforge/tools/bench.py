"""Latency of a bundle's backends, each measured in its own process.

`measure` runs in-process on one backend (what the child process does); `bench` starts one
child per backend with `python -m walkforge.tools.bench` so onnxruntime's and torch's
thread pools never compete, then reports per-walk and end-to-end median/p90 and the ratio
of each backend to the torch reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError
from walkforge.graphs.ort import cpu_flags
from walkforge.recipes.inputs import example_inputs
from walkforge.runtimes import load

REFERENCES = ("torch", "torch-bf16")  # torch eager fp32, and under CPU bf16 autocast


def stats(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "n": len(samples)}


def measure(bundle_path: Path, backend: str, warmup: int = 2, iters: int = 10, batch: int = 1,
            threads: int | None = None, dims: Mapping[str, int] | None = None,
            settings: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Time `iters` end-to-end runs after `warmup`, with per-walk times from the same runs;
    `settings` go to the front's `run` (pi0: num_steps; vae: tiled, tile_size)."""
    bundle = Bundle.open(bundle_path)
    runner = load(bundle, backend, threads=threads)
    feeds = example_inputs(bundle, batch=batch, seed=0, **(dims or {}))
    for _ in range(warmup):
        runner.run(feeds, **(settings or {}))
    walks: dict[str, list[float]] = {}
    runner.chain.observer = lambda walk, _inputs, sec: walks.setdefault(walk, []).append(sec)
    total = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.run(feeds, **(settings or {}))
        total.append(time.perf_counter() - t0)
    return {"backend": backend, "end_to_end": stats(total),
            "walks": {name: stats(s) for name, s in walks.items()}}


# The ISA flags CPU speed depends on here: fp32/bf16 GEMM width, and whether int8 GEMMs run
# on VNNI/AMX or on the exact but slower u8×u8 kernels (graphs.ort.int8_pairs_saturate).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine() -> str:
    """The CPU model and its ISA flags (every CPU number is reported with them), cores, Python."""
    flags = " ".join(isa_flags()) or "none of " + "/".join(ISA_FLAGS)
    return (f"{platform.system()} {cpu_model()} [{flags}], {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def isa_flags() -> list[str]:
    """Which of ISA_FLAGS the CPU has (empty where its flags are unreadable)."""
    flags = cpu_flags() or frozenset()
    return [f for f in ISA_FLAGS if f in flags]


def cpu_model() -> str:
    """'Intel(R) Xeon(R) …' from /proc/cpuinfo on Linux; platform's answer elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench(bundle_path: Path, backends: tuple[str, ...] = ("cpu", "torch", "torch-bf16"), warmup: int = 2,
          iters: int = 10, batch: int = 1, threads: int | None = None,
          dims: Mapping[str, int] | None = None, digest: str | None = None,
          settings: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Measure each backend in a separate process; ratios are relative to each reference that
    ran (`ratio_vs_torch`, `ratio_vs_torch_bf16`). `digest` pins the bundle (refused if its
    digest differs)."""
    Bundle.open(bundle_path, digest=digest)  # refuse a bad bundle before spawning anything
    results = {b: _child(bundle_path, b, warmup, iters, batch, threads, dims or {}, settings or {})
               for b in backends}
    report = {"bundle": str(bundle_path), "machine": machine(), "batch": batch, "results": results}
    for ref_name in REFERENCES:
        if ref_name in results:
            report[ratio_key(ref_name)] = _ratios(results, ref_name)
    return report


def ratio_key(reference: str) -> str:
    """The report key of the ratios to `reference`: "ratio_vs_torch", "ratio_vs_torch_bf16"."""
    return "ratio_vs_" + reference.replace("-", "_")


def _ratios(results: Mapping[str, dict[str, Any]], reference: str) -> dict[str, dict[str, float]]:
    """Median time of every other backend / the reference's, end to end and per walk."""
    ref = results[reference]
    return {b: {"end_to_end": r["end_to_end"]["median_ms"] / ref["end_to_end"]["median_ms"],
                **{w: s["median_ms"] / ref["walks"][w]["median_ms"] for w, s in r["walks"].items()}}
            for b, r in results.items() if b != reference}


def _child(bundle_path: Path, backend: str, warmup: int, iters: int, batch: int,
           threads: int | None, dims: Mapping[str, int], settings: Mapping[str, int]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "walkforge.tools.bench", str(bundle_path), backend,
           "--warmup", str(warmup), "--iters", str(iters), "--batch", str(batch),
           "--dims", json.dumps(dict(dims)), "--settings", json.dumps(dict(settings))]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise WalkforgeError(f"bench on backend '{backend}' failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    ap = argparse.ArgumentParser(description="internal: one backend's measurement, as JSON")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("backend")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dims", default="{}")
    ap.add_argument("--settings", default="{}")
    a = ap.parse_args()
    try:
        out = measure(a.bundle, a.backend, a.warmup, a.iters, a.batch, a.threads, json.loads(a.dims),
                      json.loads(a.settings))
    except WalkforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
