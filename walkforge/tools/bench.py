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
from walkforge.recipes.inputs import example_inputs
from walkforge.runtimes import load


def stats(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "n": len(samples)}


def measure(bundle_path: Path, backend: str, warmup: int = 2, iters: int = 10, batch: int = 1,
            threads: int | None = None, dims: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Time `iters` end-to-end runs after `warmup`, with per-walk times from the same runs."""
    bundle = Bundle.open(bundle_path)
    runner = load(bundle, backend, threads=threads)
    feeds = example_inputs(bundle, batch=batch, seed=0, **(dims or {}))
    for _ in range(warmup):
        runner.run(feeds)
    walks: dict[str, list[float]] = {}
    runner.chain.observer = lambda walk, _inputs, sec: walks.setdefault(walk, []).append(sec)
    total = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.run(feeds)
        total.append(time.perf_counter() - t0)
    return {"backend": backend, "end_to_end": stats(total),
            "walks": {name: stats(s) for name, s in walks.items()}}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def bench(bundle_path: Path, backends: tuple[str, ...] = ("cpu", "torch"), warmup: int = 2,
          iters: int = 10, batch: int = 1, threads: int | None = None,
          dims: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Measure each backend in a separate process; ratios are relative to `torch`."""
    Bundle.open(bundle_path)  # refuse a bad bundle before spawning anything
    results = {b: _child(bundle_path, b, warmup, iters, batch, threads, dims or {}) for b in backends}
    report = {"bundle": str(bundle_path), "machine": machine(), "batch": batch, "results": results}
    if "torch" in results:
        ref = results["torch"]
        report["ratio_vs_torch"] = {
            b: {"end_to_end": r["end_to_end"]["median_ms"] / ref["end_to_end"]["median_ms"],
                **{w: s["median_ms"] / ref["walks"][w]["median_ms"] for w, s in r["walks"].items()}}
            for b, r in results.items() if b != "torch"
        }
    return report


def _child(bundle_path: Path, backend: str, warmup: int, iters: int, batch: int,
           threads: int | None, dims: Mapping[str, int]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "walkforge.tools.bench", str(bundle_path), backend,
           "--warmup", str(warmup), "--iters", str(iters), "--batch", str(batch),
           "--dims", json.dumps(dict(dims))]
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
    a = ap.parse_args()
    try:
        out = measure(a.bundle, a.backend, a.warmup, a.iters, a.batch, a.threads, json.loads(a.dims))
    except WalkforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
