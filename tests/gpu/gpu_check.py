"""One GPU run, one markdown table: the issue-17 measurements, prepared to finish in < 8 minutes.

    PYTHONPATH=. python3 tests/gpu/gpu_check.py [--budget-s 420] [--calls 20]

Sections (each a function returning rows; a failing one prints its error in its row, the rest go on;
a section that would start after the time budget is skipped, said so in its row; each section's rows
also go to stderr as it ends, so a run killed by a timeout still shows what finished; pi0, the
headline, runs first):

1. kernels: the Triton kernels (JIT) vs the eager ops on pi0's shapes — KV write and paged attention
   with a float32 pool, an fp8 (E4M3) pool, and bf16 q/k/v over a float32 pool (what torch-cuda
   passes; there is no bf16 pool dtype).
2. aot: the plugin kernels compiled ahead of time here (this GPU's arch, and sm_80 whose PTX the
   driver JITs forward), the image `plugins.arch.select_kernel` picks, launched through the CUDA
   driver (cupy) vs the eager op; plus the exact cubin and PTX.
3. attention: paged attention on pi0 denoise shapes (8 heads, 1 KV head, d 256, 51 suffix tokens,
   816-token prefix), B = 1 and 8: time, achieved GB/s vs HBM, vs torch SDPA on the same dense K/V.
4. pi0: full-size pi0 (random weights built on the GPU), 3 cameras, 48 prompt tokens, 10 steps,
   B = 1: median and p90 over `--calls` calls after warm-up of torch eager bf16 (autocast, dense
   cache) and the torch-cuda backend's engines (bf16, paged KV, CUDA graph over the denoise loop),
   each with actions cosine vs the fp32 eager reference on the same GPU (TF32 off).

Without CUDA every section is one row "skipped: <why>" (tests/gpu/test_gpu_check.py runs that on CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for extra in (HERE.parent, HERE.parent / "plugins", HERE):  # tolerances, plugin_cases, test helpers
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "B200": 8000.0, "A100": 2039.0}
"""Peak HBM bandwidth by GPU name fragment (vendor data sheets; H200: 4.8 TB/s)."""
Row = tuple[str, str, str, str]  # section, item, result, detail
HEADER = ("section", "item", "result", "detail")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def markdown(rows: list[Row]) -> str:
    """The table: a header row, a rule, one line per row (pipes in cells escaped)."""
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def run_sections(
    sections: list[tuple[str, Callable[[], list[Row]]]], budget_s: float, why_not: str = ""
) -> list[Row]:
    """Every section's rows; `why_not` (no GPU) or an exhausted budget skips a section, an exception
    becomes its row (first line of the error) with the traceback on stderr."""
    rows: list[Row] = []
    start = time.perf_counter()
    for name, section in sections:
        if why_not:
            rows.append((name, "-", "skipped", why_not))
            continue
        if time.perf_counter() - start > budget_s:
            rows.append((name, "-", "skipped", f"time budget of {budget_s:.0f} s spent"))
            continue
        t0 = time.perf_counter()
        try:
            rows += section()
        except Exception as exc:  # a failing section is reported in its row; the others still run
            traceback.print_exc(file=sys.stderr)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            rows.append((name, "-", "ERROR", f"{type(exc).__name__}: {first}"))
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        done = [row for row in rows if row[0] == name]
        print(markdown(done), file=sys.stderr, flush=True)  # what finished, should a timeout kill the run
    return rows


def cuda_missing() -> str:
    from walkforge.runtimes.backends._cuda import cuda_device

    missing = cuda_device()
    return f"no CUDA device: {missing}" if missing else ""


def device() -> tuple[str, tuple[int, int]]:
    import torch

    return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))


# ---------------------------------------------------------------- 1. Triton kernels vs eager


def kernel_rows() -> list[Row]:
    import torch
    from plugin_cases import case_tol, make_inputs
    from test_gpu_kernels import PI0_LIKE, same_bytes, with_pool
    from tolerances import BF16_EPS, rel_err

    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa
    from walkforge.plugins import register_cuda_kernels
    from walkforge.plugins.arch import FP8_MIN_CC

    rows: list[Row] = []
    _, cc = device()
    register_cuda_kernels()
    for pool in ("float32", "float8_e4m3fn"):
        if pool != "float32" and cc < FP8_MIN_CC:
            rows.append(("kernels", f"{pool} pool", "skipped", f"sm_{cc[0]}{cc[1]} has no FP8"))
            continue
        x = with_pool(make_inputs(PI0_LIKE), pool)
        written = kvw.kv_cache_write_triton(*kvw.case_args(x, "cuda"))
        ok = same_bytes(written, kvw.kv_cache_write(*kvw.case_args(x)))
        rows.append(
            (
                "kernels",
                f"KV write, {pool} pool",
                "ok" if ok else "FAIL",
                "bytes equal" if ok else "bytes differ",
            )
        )
        err = rel_err(
            pa.paged_attention_triton(*pa.case_args(x, "cuda")), pa.paged_attention(*pa.case_args(x))
        )
        tol = case_tol(PI0_LIKE)
        rows.append(
            (
                "kernels",
                f"paged attention, {pool} pool",
                "ok" if err <= tol else "FAIL",
                f"rel err {err:.2e} (tol {tol:.1e})",
            )
        )
    x = make_inputs(PI0_LIKE)
    bf16 = {**x, **{n: x[n].bfloat16() for n in ("q", "k_all", "v_all")}}
    held = {**x, **{n: bf16[n].float() for n in ("q", "k_all", "v_all")}}
    out = torch.ops.walkforge.paged_attention(*pa.case_args(bf16, "cuda"))
    err = rel_err(out, pa.paged_attention(*pa.case_args(held)))
    rows.append(
        (
            "kernels",
            "paged attention, bf16 q/k/v, float32 pool",
            "ok" if err <= BF16_EPS else "FAIL",
            f"rel err {err:.2e} (tol {BF16_EPS:.1e}), out {out.dtype}",
        )
    )
    return rows


# ---------------------------------------------------------------- 2. AOT images through the driver


def aot_rows() -> list[Row]:
    import cupy
    from plugin_cases import HEADS, case_tol, make_inputs
    from test_gpu_kernels import PI0_LIKE, same_bytes

    from walkforge.plugins import aot
    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa
    from walkforge.plugins.arch import bundle_archs, select_kernel

    name, cc = device()
    drv = cupy.cuda.driver.driverGetVersion()
    driver = (drv // 1000, (drv % 1000) // 10)
    arch = f"sm_{cc[0]}{cc[1]}"
    case = PI0_LIKE
    t0 = time.perf_counter()
    archs = tuple(dict.fromkeys((arch, "sm_80")))
    records = aot.compile_kernels(archs, num_heads=HEADS, kv_heads=case.kv_heads,
                                  head_dim=case.head_dim, page_size=case.page_size)  # fmt: skip
    compile_s = time.perf_counter() - t0
    x = make_inputs(case)
    rows: list[Row] = [("aot", f"compiled {arch} + sm_80", "ok",
                        f"{len(records)} records in {compile_s:.1f} s; targets {bundle_archs(records)}; "
                        f"PTX ISA {', '.join(sorted({r['ptx_isa'] for r in records}))}; driver CUDA "
                        f"{driver[0]}.{driver[1]}")]  # fmt: skip

    def check(record: dict, image: str) -> tuple[str, str]:
        out = aot.launch_aot(record, image, x)
        if aot.op_of_kernel(record["kernel"]) is kvw:
            ok = same_bytes(out, kvw.kv_cache_write(*kvw.case_args(x)))
            return ("ok" if ok else "FAIL"), "bytes equal" if ok else "bytes differ"
        from tolerances import rel_err

        err = rel_err(out, pa.paged_attention(*pa.case_args(x)))
        return ("ok" if err <= case_tol(case) else "FAIL"), f"rel err {err:.2e}"

    for kernel in sorted({r["kernel"] for r in records}):
        mine = [r for r in records if r["kernel"] == kernel]
        for label, pool in (
            ("selected", mine),
            ("sm_80 only (PTX JIT forward)", [r for r in mine if r["arch"] == "sm_80"]),
        ):
            try:
                choice = select_kernel(pool, kernel, cc, driver, name)
                result, detail = check(choice.record, choice.image)
                rows.append(("aot", f"{kernel}: {label}", result, f"{choice.reason}; {detail}"))
            except Exception as exc:  # a refused image is a result of this row
                rows.append(("aot", f"{kernel}: {label}", "ERROR", str(exc).splitlines()[0][:300]))
        exact = next(r for r in mine if r["arch"] == arch)
        for image in ("cubin", "ptx"):
            try:
                result, detail = check(exact, image)
            except Exception as exc:
                result, detail = "ERROR", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(("aot", f"{kernel}: {arch} {image}", result, f"PTX ISA {exact['ptx_isa']}; {detail}"))
    return rows


# ---------------------------------------------------------------- 3. paged attention bandwidth


def attention_rows() -> list[Row]:
    from walkforge.plugins import register_cuda_kernels

    name, _ = device()
    peak = next((gbps for key, gbps in HBM_GBPS.items() if key in name), None)
    register_cuda_kernels()
    return [row for batch in (1, 8) for row in _attention_batch(batch, peak)]


def _attention_batch(batch: int, peak: float | None) -> list[Row]:
    """Paged (Triton) vs torch SDPA over the same dense K/V, one batch size."""
    import torch
    import torch.nn.functional as F
    from test_gpu_attention import (
        HEAD_DIM,
        HEADS,
        KV_HEADS,
        SEQ,
        cuda_time_ms,
        paged_attention_bytes,
        pi0_caches,
    )
    from tolerances import rel_err

    from walkforge.recipes.blocks.flow import PagedCache

    caches = pi0_caches(batch, seed=batch)
    paged = PagedCache(*(t.cuda() for t in caches["paged"]))
    q, k, v, mask = (t.cuda() for t in caches["suffix"])
    paged_ms = cuda_time_ms(lambda: paged.attend(0, q, k, v, mask), warmup=20, iters=200)
    tokens = int(caches["paged"][2].sum())
    nbytes = paged_attention_bytes(batch, HEADS, KV_HEADS, SEQ, HEAD_DIM, tokens)
    gbps = nbytes / paged_ms / 1e6
    of_peak = f", {100 * gbps / peak:.1f}% of {peak / 1000:.1f} TB/s HBM" if peak else ""
    # the same K/V dense: [B, KVH, P + S, D], prefix padding masked, suffix block-causal
    kd, vd, pmask = (t.cuda() for t in caches["dense"])
    keys, values = torch.cat([kd[0], k], 2), torch.cat([vd[0], v], 2)
    full = torch.cat([pmask[:, None, None, :].expand(batch, 1, SEQ, -1), mask.expand(batch, 1, SEQ, SEQ)], -1)
    kb, vb, qb = keys.bfloat16(), values.bfloat16(), q.bfloat16()

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True)

    sdpa_ms = cuda_time_ms(lambda: sdpa(q, keys, values), warmup=20, iters=200)
    sdpa16_ms = cuda_time_ms(lambda: sdpa(qb, kb, vb), warmup=20, iters=200)
    same = rel_err(
        sdpa(q, keys, values).transpose(1, 2).reshape(batch, SEQ, -1), paged.attend(0, q, k, v, mask)
    )
    paged_row = (f"paged (Triton), B={batch}, {tokens} prefix tokens", f"{paged_ms * 1e3:.1f} µs",
                 f"{gbps:.0f} GB/s (fp32 pool, {nbytes / 1e6:.2f} MB){of_peak}")
    sdpa_row = (f"torch SDPA dense, B={batch}",
                f"{sdpa_ms * 1e3:.1f} µs fp32 / {sdpa16_ms * 1e3:.1f} µs bf16",
                f"SDPA time / paged time {sdpa_ms / paged_ms:.2f}x (fp32); outputs rel err {same:.1e}")
    return [("attention", *paged_row), ("attention", *sdpa_row)]


# ---------------------------------------------------------------- 4. full-size pi0


def pi0_rows(calls: int = 20, warmup: int = 3, variant: str = "pi0", device: str = "cuda",
             policy: Callable | None = None) -> list[Row]:
    """The pi0 section on `variant` (full size) on `device`; `policy(model16, cfg)` builds the
    engines' path (default `torch_cuda_policy`; the CPU test passes one over the torch backend)."""
    import copy

    import torch

    from walkforge.recipes.pi0.config import VARIANTS
    from walkforge.recipes.pi0.model import build
    from walkforge.recipes.pi0.walks import fake_inputs

    cfg = VARIANTS[variant]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model32 = build(cfg).eval()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    built_s = time.perf_counter() - t0
    feeds = fake_inputs(cfg, batch=1, seed=0)
    views, prompt = feeds["images"].shape[1], feeds["prompt_ids"].shape[1]
    args = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
    order = ("images", "image_masks", "prompt_ids", "prompt_mask", "state", "noise")
    with torch.inference_mode():
        reference = model32.sample_actions(*(args[k] for k in order), num_steps=10).float().cpu().numpy()
    del model32
    if device == "cuda":
        torch.cuda.empty_cache()

    def eager() -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
            return model16.sample_actions(*(args[k] for k in order), num_steps=10).float().cpu().numpy()

    valid = int(feeds["image_masks"].sum())
    setup = (f"pi0 {variant} built on {device} in {built_s:.1f} s; {views} cameras ({valid} unmasked), "
             f"{prompt} prompt tokens ({int(feeds['prompt_mask'].sum())} valid), 10 steps, B=1; "
             "reference fp32 eager, TF32 off")
    rows: list[Row] = [("pi0", "setup", "ok", setup)]
    rows.append(latency_row("torch eager bf16 (autocast, dense cache)", eager, reference, calls, warmup))
    infer = (policy or torch_cuda_policy)(model16, cfg)
    rows.append(latency_row("torch-cuda backend (bf16, paged KV, CUDA graph denoise loop)",
                            lambda: infer(feeds), reference, calls, warmup))  # fmt: skip
    return rows


def latency_row(
    label: str, fn: Callable[[], np.ndarray], reference: np.ndarray, calls: int, warmup: int
) -> Row:
    """Median and p90 wall time of `fn` (which returns host actions, so each call ends synchronised)."""
    for _ in range(warmup):
        actions = fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        actions = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    median, p90 = np.median(times), np.percentile(times, 90)
    goal = (
        "; goal ≤ 20 ms "
        + ("met" if median <= 20 else "not met")
        + (", stretch ≤ 12 ms met" if median <= 12 else "")
    )
    return (
        "pi0",
        label,
        f"median {median:.2f} ms, p90 {p90:.2f} ms",
        f"{calls} calls after {warmup} warm-up; actions cosine vs fp32 "
        f"{cosine(actions, reference):.6f}{goal}",
    )


def torch_cuda_policy(
    model16, cfg, make_engines: Callable | None = None, allocate_pool: Callable | None = None
) -> Callable[[dict], np.ndarray]:
    """The torch-cuda backend's engines (runtimes/backends/torch_cuda.walk_engines) over `model16`,
    chained and paged as a loaded bundle's are, without writing a bundle: the manifest parts the
    chain reads (walk contracts, plan, paging) come from the recipe's walks, as the compile's trace
    stage writes them. Returns feeds -> actions, as Pi0Policy.infer does. `make_engines(walks)` and
    `allocate_pool(spec)` default to torch-cuda's (the CPU test passes the torch backend's)."""
    import walkforge
    from walkforge.plugins.constants import PAGE_SIZE
    from walkforge.recipes.pi0.walks import walks
    from walkforge.runtimes.backends import torch_cuda
    from walkforge.runtimes.chain import Chain, Paging
    from walkforge.runtimes.fronts.pi0 import compact
    from walkforge.runtimes.values import to_numpy

    graph = walks(model16, cfg)
    manifest = {  # what a compile writes before its file table, less what the chain never reads
        "walkforge_version": walkforge.__version__, "created": "", "recipe": "pi0", "variant": None,
        "config": {}, "weights": {"fingerprint": "", "source": "random"}, "front": "pi0", "dim_ranges": {},
        "precision": {"weights": "bf16", "activations": "bf16", "kv": "fp32", "calibration": None},
        "walks": {n.name: {"onnx": f"walks/{n.name}.onnx", **n.contract(), "ops": {}} for n in graph.nodes},
        "plan": graph.plan(),
        "paging": {"max_tokens": graph.kv_tokens, "page_size": PAGE_SIZE},
        "targets": {},
    }
    engines = (make_engines or torch_cuda.walk_engines)(graph)
    chain = Chain(
        engines, manifest["plan"], Paging(manifest, engines, allocate_pool or torch_cuda.allocate_pool)
    )
    tokens_per_view = (cfg.vision.image_size // cfg.vision.patch) ** 2
    dynamic_views = isinstance(manifest["walks"]["vision"]["inputs"][0]["shape"][1], str)

    def infer(feeds: dict) -> np.ndarray:
        run = {k: feeds[k] for k in ("images", "image_masks", "prompt_ids", "prompt_mask", "state")}
        if dynamic_views:
            run |= compact(run["images"], run["image_masks"], run["prompt_ids"], run["prompt_mask"])
        run["x_t"] = feeds["noise"]
        valid = feeds["image_masks"].sum(1) * tokens_per_view + feeds["prompt_mask"].sum(1)
        env = chain.run(run, {"num_steps": 10}, kv_tokens=[int(n) for n in valid])
        return to_numpy(env["x_t"])

    return infer


SECTIONS = (("kernels", kernel_rows), ("aot", aot_rows), ("attention", attention_rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="start no section after this many seconds"
    )
    parser.add_argument("--calls", type=int, default=20, help="timed pi0 calls per path (after warm-up)")
    opts = parser.parse_args(argv)
    why_not = cuda_missing()
    sections = [("pi0", lambda: pi0_rows(opts.calls)), *SECTIONS]  # the headline first
    rows = run_sections(sections, opts.budget_s, why_not)
    title = "no GPU" if why_not else "{} (sm_{}{})".format(device()[0], *device()[1])
    print(f"### walkforge GPU check: {title}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
