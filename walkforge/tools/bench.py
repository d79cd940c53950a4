"""Latency of a bundle's backends, each measured in its own process.

`Measurement` times one backend in-process (`measure`, and what each child process runs);
`bench` starts one child per backend with `python -m walkforge.tools.bench`, so onnxruntime's
and torch's thread pools never compete, lets them take turns run by run, then reports
per-walk and end-to-end median/p90 and the ratio of each backend to the torch references.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from walkforge.artifacts.bundle import Bundle
from walkforge.artifacts.npz import read_npz
from walkforge.errors import WalkforgeError
from walkforge.graphs.ort import cpu_flags
from walkforge.recipes.inputs import example_inputs
from walkforge.runtimes import load

REFERENCES = ("torch", "torch-bf16")  # torch eager fp32, and under CPU bf16 autocast
SETTLE_S = 0.05  # idle time before each backend's turn: the last one's pool threads stop spinning


def stats(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "n": len(samples)}


class Measurement:
    """One backend's timed runs of a bundle, end to end and per walk (from the same runs), on
    the arrays of the `inputs` npz or else the recipe's seeded example inputs; `settings` go to
    the front's `run` (pi0: num_steps; vae: tiled, tile_size)."""

    def __init__(self, bundle_path: Path, backend: str, batch: int = 1, threads: int | None = None,
                 dims: Mapping[str, int] | None = None, settings: Mapping[str, int] | None = None,
                 inputs: Path | None = None) -> None:
        bundle = Bundle.open(bundle_path)
        self.backend = backend
        self.runner = load(bundle, backend, threads=threads)
        self.feeds = (read_npz(inputs, "--inputs") if inputs is not None
                      else example_inputs(bundle, batch=batch, seed=0, **(dims or {})))
        self.settings = dict(settings or {})
        self.total: list[float] = []
        self.starts: list[float] = []  # wall clock of each timed run (shows how runs interleave)
        self.walks: dict[str, list[float]] = {}

    def warmup(self) -> None:
        self.runner.chain.observer = None
        self.runner.run(self.feeds, **self.settings)

    def timed(self) -> None:
        self.runner.chain.observer = lambda walk, _inputs, sec: self.walks.setdefault(walk, []).append(sec)
        self.starts.append(time.time())
        t0 = time.perf_counter()
        self.runner.run(self.feeds, **self.settings)
        self.total.append(time.perf_counter() - t0)

    def report(self) -> dict[str, Any]:
        return {"backend": self.backend, "end_to_end": stats(self.total),
                "walks": {name: stats(s) for name, s in self.walks.items()}, "run_starts": self.starts}


def measure(bundle_path: Path, backend: str, warmup: int = 2, iters: int = 10, batch: int = 1,
            threads: int | None = None, dims: Mapping[str, int] | None = None,
            settings: Mapping[str, int] | None = None, inputs: Path | None = None) -> dict[str, Any]:
    """Time `iters` end-to-end runs after `warmup` in this process (`Measurement`)."""
    m = Measurement(bundle_path, backend, batch, threads, dims, settings, inputs)
    for _ in range(warmup):
        m.warmup()
    for _ in range(iters):
        m.timed()
    return m.report()


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
          settings: Mapping[str, int] | None = None, inputs: Path | None = None) -> dict[str, Any]:
    """Measure each backend in its own process, the processes taking turns: all load and warm
    up one after another, then every round runs each backend once, in order, with the others
    idle (`SETTLE_S` apart, so no thread pool still spins). A host whose speed drifts (shared
    cloud cores do, between identical runs minutes apart) then slows every backend
    alike instead of whichever ran last; the backends' processes are resident together. Ratios
    are relative to each reference that ran (`ratio_vs_torch`, `ratio_vs_torch_bf16`). `digest`
    pins the bundle (refused if its digest differs). `inputs` is an npz of the front's inputs
    (`walkforge inputs` writes one; the report's batch is its arrays'), else the recipe's example
    inputs of `batch` and `dims` are used."""
    Bundle.open(bundle_path, digest=digest)  # refuse a bad bundle before spawning anything
    if inputs is not None:
        if dims or batch != 1:
            raise WalkforgeError("bench --inputs takes no --batch or --dim: the npz's arrays set the sizes")
        batch = _batch_of(read_npz(inputs, "--inputs"), inputs)
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(_Child(bundle_path, b, batch, threads, dims or {}, settings or {},
                                               inputs))
                    for b in dict.fromkeys(backends)]
        for child in children:
            for _ in range(warmup):
                child.call("warmup")
        for _ in range(iters):
            for child in children:
                time.sleep(SETTLE_S)
                child.call("timed")
        results = {child.backend: child.call("report") for child in children}
    report = {"bundle": str(bundle_path), "machine": machine(), "batch": batch,
              **({"inputs": str(inputs)} if inputs is not None else {}), "results": results}
    for ref_name in REFERENCES:
        if ref_name in results:
            report[ratio_key(ref_name)] = _ratios(results, ref_name)
    return report


def _batch_of(feeds: Mapping[str, np.ndarray], path: Path) -> int:
    """The batch of an inputs npz: its arrays' leading size."""
    sizes = {a.shape[0] for a in feeds.values() if a.ndim}
    if len(sizes) != 1:
        raise WalkforgeError(f"--inputs {path}: arrays of one batch expected, got leading sizes "
                             f"{sorted(sizes) or 'none'}")
    return sizes.pop()


def ratio_key(reference: str) -> str:
    """The report key of the ratios to `reference`: "ratio_vs_torch", "ratio_vs_torch_bf16"."""
    return "ratio_vs_" + reference.replace("-", "_")


def _ratios(results: Mapping[str, dict[str, Any]], reference: str) -> dict[str, dict[str, float]]:
    """Median time of every other backend / the reference's, end to end and per walk."""
    ref = results[reference]
    return {b: {"end_to_end": r["end_to_end"]["median_ms"] / ref["end_to_end"]["median_ms"],
                **{w: s["median_ms"] / ref["walks"][w]["median_ms"] for w, s in r["walks"].items()}}
            for b, r in results.items() if b != reference}


class _Child:
    """One backend's `Measurement` in a child process (`python -m walkforge.tools.bench`), driven
    over its stdin/stdout one JSON line per call; loaded (and ready) when entered."""

    def __init__(self, bundle_path: Path, backend: str, batch: int, threads: int | None,
                 dims: Mapping[str, int], settings: Mapping[str, int], inputs: Path | None) -> None:
        self.backend = backend
        self.cmd = [sys.executable, "-m", "walkforge.tools.bench", str(bundle_path), backend,
                    "--batch", str(batch), "--dims", json.dumps(dict(dims)),
                    "--settings", json.dumps(dict(settings)),
                    *(["--threads", str(threads)] if threads else []),
                    *(["--inputs", str(inputs)] if inputs is not None else [])]

    def __enter__(self) -> _Child:
        self.stderr = tempfile.TemporaryFile("w+")  # a pipe could fill and stall the child
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self._reply()  # loaded
        return self

    def call(self, op: str) -> Any:
        try:
            self.proc.stdin.write(op + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it exited: _reply says why
        return self._reply()

    def _reply(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            last = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
            raise WalkforgeError(f"bench on backend '{self.backend}' failed: {last}")
        return json.loads(line)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def _main() -> None:
    ap = argparse.ArgumentParser(description="internal: one backend's measurement, driven over "
                                             "stdin (warmup, timed, report), one JSON line per reply")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("backend")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dims", default="{}")
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--inputs", type=Path, default=None)
    a = ap.parse_args()
    replies, sys.stdout = sys.stdout, sys.stderr  # nothing else printed can garble a reply
    try:
        m = Measurement(a.bundle, a.backend, a.batch, a.threads, json.loads(a.dims), json.loads(a.settings),
                        a.inputs)
        print(json.dumps(True), file=replies, flush=True)
        for op in sys.stdin:
            op = op.strip()
            if op == "report":
                print(json.dumps(m.report()), file=replies, flush=True)
                return
            {"warmup": m.warmup, "timed": m.timed}[op]()
            print(json.dumps(True), file=replies, flush=True)
    except WalkforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _main()
