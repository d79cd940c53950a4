"""Fuzzed loading: every mutation of a tiny bundle loads and runs to the original's outputs or is
refused with a WalkforgeError — never another exception, a hang or a crash.

The tiny VAE bundle, plus a stub kernel (cubin + PTX, listed under `kernels`), is mutated
FUZZ_MUTATIONS times: truncations, bit flips and random bytes in every file (manifest, ONNX,
external data, safetensors, cubin, PTX), with the files table left as it was (the hashes must
catch it) or rewritten to vouch for the mutation (then onnxruntime itself reads the damage),
plus deleted and added files. Each mutant is loaded and run once in a worker process — a fresh
one per FUZZ_CHUNK mutants, two at a time — so a segfault or a hang is caught, counted and
reported rather than taking the test run down. A mutant that runs to other outputs is a
different bundle that its files table vouches for: loading it with the original's digest
pinned must refuse it.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from walkforge.artifacts.bundle import MANIFEST, manifest_digest, write_manifest

FUZZ_SEED = 18
FUZZ_CHUNK = 65  # mutants per worker process
FUZZ_WORKERS = 2
LOAD_TIMEOUT_S = 120  # one load + run of the tiny VAE takes ~0.2 s; this only bounds a hang
WORKER_START_TIMEOUT_S = 300  # a python importing walkforge: seconds, a minute on a loaded machine
LATENTS_SHAPE = (1, 4, 8, 8)
STUB_KERNEL = "kernels/vae_stub-sm_90"
GOOD = ("equal", "refused", "differs, refused when pinned")

FILES = (MANIFEST, "walks/decode.onnx", "walks/decode.onnx.data", "weights/model.safetensors",
         f"{STUB_KERNEL}.cubin", f"{STUB_KERNEL}.ptx")
BYTE_OPS = ("truncate", "flip", "random")
JSON_VALUES = (None, True, 0, -1, 1.5, 10**12, float("nan"), "", "x", "../x", "/etc/passwd", [], [1], {},
               {"a": 1})


def mutations() -> list[dict]:
    """The mutation plan (670 mutants): file, op, rehash, seed and backend per mutant."""
    plan = [(MANIFEST, op, False) for op in BYTE_OPS for _ in range(40)]
    plan += [(f, op, False) for f in FILES[1:] for op in BYTE_OPS for _ in range(12)]
    plan += [(f, op, True) for f in FILES[1:3] for op in BYTE_OPS for _ in range(25)]
    plan += [(f, "delete", False) for f in FILES for _ in range(5)]
    plan += [(None, "add", False) for _ in range(40)]
    plan += [(MANIFEST, "json", False) for _ in range(120)]
    jobs = [{"file": f, "op": op, "rehash": rehash, "seed": FUZZ_SEED * 10_000 + i, "backend": "cpu"}
            for i, (f, op, rehash) in enumerate(plan)]
    return jobs + [{"file": FILES[3], "op": op, "rehash": True, "seed": FUZZ_SEED * 20_000 + i,
                    "backend": "torch"} for i, op in enumerate(BYTE_OPS * 10)]  # the reference weights


def mutate(root: Path, job: dict) -> None:
    """Apply one mutation to the bundle at `root` (its files may be hard links: replaced, never
    written in place)."""
    rng = random.Random(job["seed"])
    if job["op"] == "add":
        _add(root, rng)
        return
    if job["op"] == "json":
        _edit_json(root / MANIFEST, rng)
        return
    path = root / job["file"]
    data = bytearray(path.read_bytes())
    path.unlink()
    if job["op"] == "delete":
        return
    if job["op"] == "truncate":
        data = data[:rng.randrange(len(data))]
    elif job["op"] == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        start = rng.randrange(len(data))
        data[start:start + rng.randint(1, 64)] = rng.randbytes(rng.randint(1, 64))
    path.write_bytes(bytes(data))
    if job["rehash"]:
        rewrite_files_table(root)


def _add(root: Path, rng: random.Random) -> None:
    folder = rng.choice(["", "walks/", "weights/", "kernels/", "calib/"])
    name = root / f"{folder}{rng.choice(['extra', 'decode.onnx.tmp', '.hidden', 'x' * 40])}"
    name.parent.mkdir(exist_ok=True)
    kind = rng.choice(["file", "empty", "symlink", "dir"])
    if kind == "file":
        name.write_bytes(rng.randbytes(rng.randint(1, 4096)))
    elif kind == "empty":
        name.write_bytes(b"")
    elif kind == "symlink":
        name.symlink_to(rng.choice(["/etc/hostname", "../manifest.json", "/nonexistent"]))
    else:
        name.mkdir()  # an empty folder holds no file: the bundle stays as it was


def _edit_json(path: Path, rng: random.Random) -> None:
    """A parseable manifest with one value replaced by another of any type, or one key dropped."""
    manifest = json.loads(path.read_text())
    holders = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            holders.extend((node, key) for key in node)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            holders.extend((node, i) for i in range(len(node)))
            for value in node:
                collect(value)

    collect(manifest)
    holder, key = rng.choice(holders)
    if isinstance(holder, dict) and rng.random() < 0.3:
        del holder[key]
    else:
        holder[key] = rng.choice(JSON_VALUES)
    path.unlink()
    path.write_text(json.dumps(manifest))


def rewrite_files_table(root: Path) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})


def with_stub_kernel(root: Path) -> Path:
    """Add a (never executed) AOT kernel record and its cubin/PTX files to the bundle at `root`."""
    (root / "kernels").mkdir()
    (root / f"{STUB_KERNEL}.cubin").write_bytes(random.Random(0).randbytes(4096))
    (root / f"{STUB_KERNEL}.ptx").write_text(".version 8.0\n.target sm_90\n.address_size 64\n" * 20)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["kernels"] = [{"kernel": "vae_stub", "arch": "sm_90", "cubin_file": f"{STUB_KERNEL}.cubin",
                            "ptx_file": f"{STUB_KERNEL}.ptx"}]
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})
    return root


# -- the worker: one process, many mutants ------------------------------------------------


def load_and_run(root: Path, latents: np.ndarray, backend: str, digest: str | None = None) -> np.ndarray:
    import walkforge

    return walkforge.load(root, backend, digest=digest, threads=1, spinning=False).decode(latents)


def outcome(base: Path, work: Path, job: dict, latents: np.ndarray, want: dict[str, np.ndarray]) -> str:
    """What loading the mutant of `base` described by `job` did (one of GOOD, or what went wrong)."""
    from walkforge.errors import WalkforgeError

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work, copy_function=os.link)
    mutate(work, job)
    try:
        got = load_and_run(work, latents, job["backend"])
    except WalkforgeError as exc:
        return "refused" if "\n" not in str(exc) else f"multi-line WalkforgeError: {exc!r}"
    except Exception as exc:  # what this test exists to find
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if job["backend"] not in want:
        want[job["backend"]] = load_and_run(base, latents, job["backend"])
    if np.array_equal(got, want[job["backend"]], equal_nan=True):
        return "equal"
    try:
        load_and_run(work, latents, job["backend"], digest=manifest_digest(base))
    except WalkforgeError:
        return "differs, refused when pinned"
    return "differs, and loads when pinned"


def worker(base: Path, work: Path) -> None:
    """Read jobs (JSON lines) on stdin; write one JSON line per job, its outcome, to stdout.

    Only the replies go to stdout: fd 1 is pointed at stderr first, because libraries print there
    too (onnxruntime prints an "EP Error" banner to stdout when a session fails to build).
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    latents = np.random.default_rng(0).standard_normal(LATENTS_SHAPE, dtype=np.float32)
    want = {"cpu": load_and_run(base, latents, "cpu")}  # by backend; others on first use
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps({"outcome": outcome(base, work, job, latents, want)}), file=replies, flush=True)


WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_fuzz_bundle import worker
worker(Path(sys.argv[2]), Path(sys.argv[3]))
"""


# -- the driver: workers started per chunk, crashes and hangs counted -------------------------


class Worker:
    def __init__(self, base: Path, work: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(Path(__file__).parent), str(base),
                                      str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.reply(WORKER_START_TIMEOUT_S) == {"ready": True}, "fuzz worker did not start"

    def reply(self, timeout: float) -> dict | None:
        """The worker's next line, or None if it died or timed out (then it is killed)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            return None
        return json.loads(line)

    def run(self, job: dict) -> tuple[str, bool]:
        """(outcome, whether the worker is still usable)."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        t0 = time.monotonic()
        got = self.reply(LOAD_TIMEOUT_S)
        if got is not None:
            return got["outcome"], True
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"crash (signal {-code})", False
        return ("hang" if time.monotonic() - t0 >= LOAD_TIMEOUT_S else f"worker exited {code}"), False

    def stop(self) -> None:
        self.proc.kill()
        self.proc.communicate()


def run_chunk(base: Path, work: Path, jobs: list[dict]) -> list[tuple[dict, str]]:
    results, worker_ = [], None
    for job in jobs:
        worker_ = worker_ or Worker(base, work)
        result, alive = worker_.run(job)
        results.append((job, result))
        if not alive:
            worker_ = None
    if worker_ is not None:
        worker_.stop()
    return results


@pytest.mark.slow
def test_fuzzed_bundles_load_equal_or_refuse(tiny_bundle: Path, tmp_path: Path) -> None:
    base = with_stub_kernel(Path(shutil.copytree(tiny_bundle, tmp_path / "base")))
    jobs = mutations()
    assert len(jobs) >= 500
    chunks = [jobs[i:i + FUZZ_CHUNK] for i in range(0, len(jobs), FUZZ_CHUNK)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(FUZZ_WORKERS) as pool:
        done = pool.map(lambda ic: run_chunk(base, tmp_path / f"work{ic[0]}", ic[1]), enumerate(chunks))
        results = [r for chunk in done for r in chunk]
    counts = Counter(result if result in GOOD else "FAILED" for _, result in results)
    print(f"\nfuzzed {len(results)} mutants in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    by_kind = Counter((job["file"], job["op"], job["rehash"], job["backend"], result)
                      for job, result in results)
    for (file, op, rehash, backend, result), n in sorted(by_kind.items(), key=str):
        print(f"  {file} {op}{' (rehashed)' if rehash else ''} [{backend}]: {result} ×{n}")
    bad = [(job, result) for job, result in results if result not in GOOD]
    assert not bad, f"{len(bad)} mutant(s) neither loaded equal nor were refused; first: {bad[:3]}"
