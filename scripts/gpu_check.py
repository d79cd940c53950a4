#!/usr/bin/env python3
"""`make gpu-check`: the GPU paths of walkforge against their references, on one CUDA GPU.

    a  Triton kernels (through torch on CUDA) vs the eager reference ops, on the plugin test
       shapes and pi0 shapes; the registered CUDA dispatch of torch.ops.walkforge.* too
    b  AOT cubins of `walkforge.plugins.aot.compile_kernels` for this GPU's arch, launched through
       the CUDA driver (cupy), vs the reference; the PTX through the driver's JIT as well
    c  paged_attention (Triton) vs gather + torch SDPA on pi0 denoise shapes: median time (CUDA
       events) and achieved bandwidth
    d  pi0 full size (bf16, 3 views, 10 steps, B = 1): torch eager, the torch-cuda backend, and
       parity vs an fp32 reference; then a bundle (--bundle, else pi0 tiny compiled here) through
       walkforge.load on torch-cuda and, where onnxruntime-gpu imports, the cuda target

Every section is guarded: a failure becomes its row's error and the next section runs. Prints
one table; writes JSON to $OUT/gpu-check.json if $OUT is set, else build/gpu-check.json.
Usage: python scripts/gpu_check.py [--sections abcd] [--bundle PATH] [--iters N] [--out FILE]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests" / "plugins"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

TOL = {"kv_write": 0.0, "attention": 1e-4, "attention_bf16_q": 3e-2, "sdpa": 1e-4}
COS_MIN = {"bf16": 0.98, "fp32": 0.9999}
PI0 = {"heads": 8, "kv_heads": 1, "head_dim": 256, "seq": 51, "prefix": 816, "page_size": 16}
BATCHES = (1, 2, 4, 8)
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DEFAULT_SHARED_LIMIT = 48 * 1024


# ---------------------------------------------------------------- pure helpers (tested on CPU)


@dataclass
class Row:
    section: str
    item: str
    status: str  # ok | FAIL | error | skip | info
    value: str = ""
    detail: str = ""


def paged_attention_bytes(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int,
                          prefix_tokens: int, itemsize: int = 4) -> int:
    """Bytes one paged_attention call must move at least: the prefix K and V pages of every
    request (`prefix_tokens` summed over the batch), the suffix K/V and q read, out written."""
    kv_pages = 2 * prefix_tokens * kv_heads * head_dim
    suffix_kv = 2 * batch * kv_heads * seq * head_dim
    q_and_out = 2 * batch * heads * seq * head_dim
    return (kv_pages + suffix_kv + q_and_out) * itemsize


def bandwidth_gbs(nbytes: int, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def within(err: float, tol: float) -> str:
    return "ok" if err <= tol else "FAIL"


_GRID_BINDING = re.compile(r"^\s*(\w+)\s*=\s*(\w+)\.shape\[(-?\d+)\]\s*$")
_GRID_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b,
}  # fmt: skip


def eval_grid(rule: str, shapes: Mapping[str, Sequence[int]], constexprs: Mapping[str, Any]
              ) -> tuple[int, int, int]:
    """Evaluate a kernel record's grid rule, e.g. "(cdiv(S, BLOCK_M), H, B): S = q.shape[2], ...",
    with tensor shapes by name and the kernel's constexprs. Returns a 3-D grid."""
    head, _, bindings = rule.partition(":")
    names: dict[str, int] = {k: v for k, v in constexprs.items() if isinstance(v, int)}
    for binding in filter(str.strip, bindings.split(",")):
        match = _GRID_BINDING.match(binding)
        if match is None:
            raise ValueError(f"grid rule binding {binding.strip()!r} is not 'NAME = tensor.shape[i]'")
        name, tensor, axis = match.groups()
        names[name] = int(shapes[tensor][int(axis)])
    node = ast.parse(head.strip(), mode="eval").body
    dims = [_eval_dim(n, names) for n in (node.elts if isinstance(node, ast.Tuple) else [node])]
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"grid rule {rule!r} has {len(dims)} dims")
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def _eval_dim(node: ast.AST, names: Mapping[str, int]) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _GRID_OPS:
        return _GRID_OPS[type(node.op)](_eval_dim(node.left, names), _eval_dim(node.right, names))
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cdiv" and len(node.args) == 2:
        a, b = (_eval_dim(arg, names) for arg in node.args)
        return -(-a // b)
    raise ValueError(f"unsupported grid expression {ast.unparse(node)!r}")


def format_table(rows: Sequence[Row], width: int = 70) -> str:
    """One fixed-width text table; long details are cut to `width` characters."""
    header = Row("sec", "item", "status", "value", "detail")
    cells = [[r.section, r.item, r.status, r.value, _cut(r.detail, width)] for r in (header, *rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def output_path(explicit: str | None, env: Mapping[str, str]) -> Path:
    if explicit:
        return Path(explicit)
    return Path(env["OUT"]) / "gpu-check.json" if env.get("OUT") else ROOT / "build" / "gpu-check.json"


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------- inputs


def pi0_inputs(batch: int, prefix_lens: Sequence[int], layers: int = 2, seed: int = 0,
               room_for_suffix: bool = True) -> dict:
    """paged-op inputs of pi0 denoise shapes (keys as tests/plugins/plugin_cases.make_inputs), CPU
    float32, pages shuffled across the pool. With `room_for_suffix`, the block table also covers
    the suffix and `positions` appends it after each prefix (the last token of request 0 skipped);
    without, the table holds exactly the prefix pages and nothing is written."""
    import torch
    from plugin_cases import block_causal_mask

    p = PI0
    gen = torch.Generator().manual_seed(seed)
    ps, seq = p["page_size"], p["seq"]
    lens = torch.tensor(prefix_lens)
    extra = seq if room_for_suffix else 0
    used = -(-(lens + extra) // ps)
    max_pages = int(used.max())
    num_pages = batch * max_pages + 1
    pages = torch.randperm(num_pages, generator=gen)[: batch * max_pages].reshape(batch, max_pages)
    block_table = torch.where(torch.arange(max_pages) < used[:, None], pages, -1)
    positions = lens[:, None] + torch.arange(seq) if room_for_suffix else torch.full((batch, seq), -1)
    positions[0, -1] = -1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    kvh, d = p["kv_heads"], p["head_dim"]
    return {
        "pool": randn(layers, 2, num_pages, ps, kvh, d),
        "q": randn(batch, p["heads"], seq, d),
        "k_all": randn(layers, batch, kvh, seq, d), "v_all": randn(layers, batch, kvh, seq, d),
        "block_table": block_table, "positions": positions, "prefix_lens": lens,
        "suffix_mask": block_causal_mask([1, seq - 1]),
        "layer": layers - 1,
        "scale": d**-0.5,
    }  # fmt: skip


def attention_args(x: Mapping[str, Any], device: str = "cpu") -> tuple:
    layer = x["layer"]
    tensors = (x["q"], x["k_all"][layer], x["v_all"][layer], x["pool"], x["block_table"], x["prefix_lens"],
               x["suffix_mask"])  # fmt: skip
    return (*(t.to(device) for t in tensors), layer, x["scale"])


def kv_args(x: Mapping[str, Any], device: str = "cpu") -> tuple:
    return tuple(x[k].to(device) for k in ("pool", "k_all", "v_all", "block_table", "positions"))


def cuda_time_ms(fn: Callable[[], Any], warmup: int = 10, iters: int = 100) -> float:
    """Median per-call time of `fn` in ms, from CUDA events around each call."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def wall_time_ms(fn: Callable[[], Any], warmup: int = 2, iters: int = 5) -> tuple[float, Any]:
    """(median wall ms of `fn` with a device sync, its last result)."""
    import torch

    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), result


# ---------------------------------------------------------------- a: Triton vs reference


def section_a(rows: list[Row], details: dict, args: argparse.Namespace) -> None:
    from plugin_cases import ALL_CASES, make_inputs

    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa

    cases = [(c.id, make_inputs(c)) for c in ALL_CASES]
    cases.append(("pi0-b2-p816,600", pi0_inputs(2, (816, 600))))
    errors: dict[str, dict[str, float]] = {}
    for case_id, x in cases:
        ref_pool = kvw.kv_cache_write(*kv_args(x))
        pool = kvw.kv_cache_write_triton(*kv_args(x, "cuda"))
        ref = pa.paged_attention(*attention_args(x))
        out = pa.paged_attention_triton(*attention_args(x, "cuda"))
        errors[case_id] = {"kv_write": (pool.cpu() - ref_pool).abs().max().item(),
                           "attention": (out.cpu() - ref).abs().max().item()}  # fmt: skip
    details["a_errors"] = errors
    for op in ("kv_write", "attention"):
        worst = max(errors, key=lambda c, op=op: errors[c][op])
        err = errors[worst][op]
        rows.append(Row("a", f"{op} Triton/CUDA", within(err, TOL[op]), f"max err {err:.2e}",
                        f"{len(cases)} cases, worst {worst}; tol {TOL[op]:g}"))
    _dispatch_row(rows, cases[-1][1])


def _dispatch_row(rows: list[Row], x: Mapping[str, Any]) -> None:
    """torch.ops.walkforge.* on CUDA tensors, as the torch-cuda backend calls them (bf16 q)."""
    import torch

    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa
    from walkforge.runtimes.cuda import register_cuda_kernels

    register_cuda_kernels()
    ref = pa.paged_attention(*attention_args(x))
    q, k, v, *rest = attention_args(x, "cuda")
    out = torch.ops.walkforge.paged_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), *rest)
    err = (out.float().cpu() - ref).abs().max().item()
    pool = torch.ops.walkforge.kv_cache_write(*kv_args(x, "cuda"))
    kv_err = (pool.cpu() - kvw.kv_cache_write(*kv_args(x))).abs().max().item()
    ok = err <= TOL["attention_bf16_q"] and kv_err == 0.0
    rows.append(Row("a", "torch.ops dispatch (cuda)", "ok" if ok else "FAIL",
                    f"bf16 err {err:.2e}", f"kv_write err {kv_err:.1e}; q/k/v bf16, pool fp32"))


# ---------------------------------------------------------------- b: AOT cubin / PTX via the driver


def section_b(rows: list[Row], details: dict, args: argparse.Namespace) -> None:
    import cupy
    import torch

    from walkforge.plugins import kv_cache_write as kvw
    from walkforge.plugins import paged_attention as pa
    from walkforge.plugins.aot import compile_kernels

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    p = PI0
    records = compile_kernels((arch,), num_heads=p["heads"], kv_heads=p["kv_heads"], head_dim=p["head_dim"],
                              page_size=p["page_size"])  # fmt: skip
    driver = cupy.cuda.driver.driverGetVersion()
    details["b_records"] = [{k: v for k, v in r.items() if k not in ("cubin", "ptx")} for r in records]
    x = pi0_inputs(2, (816, 333))
    refs = {"kv_cache_write_kernel": kvw.kv_cache_write(*kv_args(x)),
            "paged_attention_kernel": pa.paged_attention(*attention_args(x))}  # fmt: skip
    for record in records:
        tol = TOL["kv_write"] if record["kernel"] == "kv_cache_write_kernel" else TOL["attention"]
        for image in ("cubin", "ptx"):
            item = f"{record['kernel']} {image} {arch}"
            try:
                out = launch_aot(record, image, x)
            except cupy.cuda.driver.CUDADriverError as exc:
                rows.append(Row("b", item, "FAIL", "driver refused",
                                f"PTX ISA {record['ptx_isa']}, driver {driver}: {exc}"))
                continue
            err = (out.cpu() - refs[record["kernel"]]).abs().max().item()
            rows.append(Row("b", item, within(err, tol), f"max err {err:.2e}",
                            f"smem {record['shared_mem']} B, {record['num_warps']} warps, hidden "
                            f"{record['hidden_params']}, PTX ISA {record['ptx_isa']}, driver {driver}"))


def aot_values(kernel: str, x: Mapping[str, Any], device: str = "cuda"
               ) -> tuple[dict[str, Any], dict[str, Sequence[int]], Any]:
    """(argument values by signature name without '_ptr', shapes for the grid rule, output tensor)."""
    import torch

    if kernel == "kv_cache_write_kernel":
        pool, k, v, block_table, positions = kv_args(x, device)
        ones = torch.ones(pool.shape[0], 2, device=device)  # kv_scales: a float32 pool ignores them
        values = {"pool": pool, "k": k, "v": v, "block_table": block_table, "positions": positions,
                  "kv_scales": ones, "num_layers": pool.shape[0], "batch": positions.shape[0],
                  "seq_len": positions.shape[1], "num_pages": pool.shape[2],
                  "max_pages": block_table.shape[1]}  # fmt: skip
        return values, {"k": k.shape}, pool
    q, k, v, pool, block_table, prefix_lens, mask, layer, _ = attention_args(x, device)
    out = torch.empty_like(q)
    values = {"out": out, "q": q, "k": k, "v": v, "pool": pool, "block_table": block_table,
              "prefix_lens": prefix_lens, "mask": mask,
              "kv_scales": torch.ones(pool.shape[0], 2, device=device),
              "seq_len": q.shape[2], "num_pages": pool.shape[2],
              "max_pages": block_table.shape[1], "layer": layer}  # fmt: skip
    return values, {"q": q.shape}, out


def launch_aot(record: Mapping[str, Any], image: str, x: Mapping[str, Any]) -> Any:
    """Load the record's cubin (or PTX, JIT-compiled by the driver) and launch it once on `x`.

    Arguments in signature order (pointers as u64, i32 scalars), then `hidden_params` null
    pointers; dynamic shared memory above 48 KiB is opted into on the function first."""
    import ctypes

    import cupy
    import torch

    drv = cupy.cuda.driver
    if record["global_scratch_size"] or record["profile_scratch_size"]:
        raise RuntimeError(f"{record['kernel']} wants scratch memory; this launcher passes null pointers")
    values, shapes, out = aot_values(record["kernel"], x)
    data = record["cubin"] if image == "cubin" else record["ptx"].encode() + b"\0"
    module = drv.moduleLoadData(data)
    try:
        func = drv.moduleGetFunction(module, record["function_name"])
        shared = int(record["shared_mem"])
        if shared > DEFAULT_SHARED_LIMIT:
            drv.funcSetAttribute(func, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
        signature = record["signature"].items()
        params = [c_arg(values[name.removesuffix("_ptr")], kind) for name, kind in signature]
        params += [ctypes.c_uint64(0) for _ in range(record["hidden_params"])]
        pointers = (ctypes.c_void_p * len(params))(*(ctypes.addressof(p) for p in params))
        grid = eval_grid(record["grid"], shapes, record["constexprs"])
        torch.cuda.synchronize()
        drv.launchKernel(func, *grid, record["block_dim"], 1, 1, shared, 0, ctypes.addressof(pointers), 0)
        torch.cuda.synchronize()
    finally:
        drv.moduleUnload(module)
    return out


def c_arg(value: Any, kind: str) -> Any:
    """A ctypes value for one kernel argument: a pointer as u64, an i32 scalar."""
    import ctypes

    if kind.startswith("*"):
        return ctypes.c_uint64(value.data_ptr())
    if kind == "i32":
        return ctypes.c_int32(int(value))
    raise ValueError(f"no launcher for argument type {kind!r}")


# ---------------------------------------------------------------- c: paged attention vs SDPA


def sdpa_reference(q, k, v, pool, block_table, prefix_lens, suffix_mask, layer: int, scale: float):
    """Gather each request's prefix pages to dense K/V, then F.scaled_dot_product_attention."""
    import torch
    import torch.nn.functional as F

    def dense(kv: int):
        pages = pool[layer, kv][block_table.clamp(min=0)]  # [B, MP, PS, KVH, D]
        b, mp, ps, kvh, d = pages.shape
        return pages.reshape(b, mp * ps, kvh, d).transpose(1, 2)  # [B, KVH, T, D]

    keys, values = torch.cat([dense(0), k], dim=2), torch.cat([dense(1), v], dim=2)
    n_prefix, seq = keys.shape[2] - k.shape[2], q.shape[2]
    prefix_ok = torch.arange(n_prefix, device=q.device) < prefix_lens[:, None]  # [B, T]
    mask = torch.cat([prefix_ok[:, None].expand(-1, seq, -1), suffix_mask.expand(q.shape[0], -1, -1)], -1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=scale,
                                          enable_gqa=True)  # fmt: skip


def section_c(rows: list[Row], details: dict, args: argparse.Namespace) -> None:
    import torch

    from walkforge.plugins import paged_attention as pa

    p = PI0
    details["c"] = {}
    for batch in BATCHES:
        x = pi0_inputs(batch, (p["prefix"],) * batch, layers=1, seed=batch, room_for_suffix=False)
        fp32 = attention_args(x, "cuda")
        bf16 = tuple(t.bfloat16() if torch.is_tensor(t) and t.is_floating_point() else t for t in fp32)
        triton_ms = cuda_time_ms(lambda a=fp32: pa.paged_attention_triton(*a), iters=args.iters)
        sdpa_ms = cuda_time_ms(lambda a=fp32: sdpa_reference(*a), iters=args.iters)
        sdpa_bf16_ms = cuda_time_ms(lambda a=bf16: sdpa_reference(*a), iters=args.iters)
        err = (pa.paged_attention_triton(*fp32) - sdpa_reference(*fp32)).abs().max().item()
        nbytes = paged_attention_bytes(batch, p["heads"], p["kv_heads"], p["seq"], p["head_dim"],
                                       batch * p["prefix"])  # fmt: skip
        gbs = bandwidth_gbs(nbytes, triton_ms)
        details["c"][batch] = {"triton_ms": triton_ms, "sdpa_fp32_ms": sdpa_ms, "sdpa_bf16_ms": sdpa_bf16_ms,
                               "bytes": nbytes, "triton_gbs": gbs, "max_err_vs_sdpa": err}  # fmt: skip
        rows.append(Row("c", f"paged attn B={batch}", within(err, TOL["sdpa"]),
                        f"{triton_ms:.3f} ms {gbs:.0f} GB/s",
                        f"sdpa fp32 {sdpa_ms:.3f} ms ({sdpa_ms / triton_ms:.2f}x), sdpa bf16 "
                        f"{sdpa_bf16_ms:.3f} ms; err {err:.1e}; {nbytes / 1e6:.1f} MB"))


# ---------------------------------------------------------------- d: pi0 end to end


def run_pi0_chain(chain: Any, cfg: Any, feeds: Mapping[str, np.ndarray], pool: Any) -> Any:
    """What Pi0Policy.infer does around its chain: pages per request, block table, loop."""
    valid = feeds["image_masks"].sum(1) * cfg.vision.tokens + feeds["prompt_mask"].sum(1)
    requests = list(range(len(valid)))
    for request, n in zip(requests, valid, strict=True):
        pool.allocate(request, int(n))
    try:
        env = {k: feeds[k] for k in ("images", "image_masks", "prompt_ids", "prompt_mask", "state")}
        env.update(x_t=feeds["noise"], kv_pool=pool.buffer, block_table=pool.block_table(requests),
                   kv_scales=np.ones((pool.spec.layers, 2), np.float32))  # a float32 pool ignores them
        return chain.run(env, {"num_steps": cfg.num_steps})["x_t"]
    finally:
        for request in requests:
            pool.free(request)


def section_d(rows: list[Row], details: dict, args: argparse.Namespace) -> None:
    import torch

    details["d"] = {}
    _guarded(rows, "d", "pi0 full size", lambda: _pi0_full_size(rows, details, args))
    torch.cuda.empty_cache()  # the full-size model is gone once _pi0_full_size returns
    _guarded(rows, "d", "bundle backends", lambda: _bundle_backends(rows, details, args))


def _pi0_full_size(rows: list[Row], details: dict, args: argparse.Namespace) -> None:
    """Random-init full-size pi0 built on the GPU: fp32 reference, bf16 eager, torch-cuda."""
    import torch

    from walkforge.recipes import pi0

    cfg = pi0.VARIANTS["pi0"]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = pi0.build(cfg).eval()
    feeds = pi0.fake_inputs(cfg, batch=1, seed=0)
    tensors = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    with torch.inference_mode():
        ref_ms, ref = wall_time_ms(lambda: model.sample_actions(**tensors), warmup=1, iters=3)
    ref = ref.float().cpu().numpy()
    details["d"]["fp32_ms"] = ref_ms
    rows.append(Row("d", "pi0 fp32 eager (reference)", "info", f"{ref_ms:.1f} ms", "B=1, 3 views, 10 steps"))
    model.to(torch.bfloat16)
    _guarded(rows, "d", "pi0 bf16 eager", lambda: _pi0_eager(rows, details, model, tensors, ref, args))
    _guarded(rows, "d", "pi0 torch-cuda",
             lambda: _pi0_torch_cuda(rows, details, model, cfg, feeds, ref, args))  # fmt: skip


def _parity_row(rows: list[Row], details: dict, item: str, ms: float, actions: Any, ref: np.ndarray,
                precision: str) -> None:
    cos, err = cosine(actions, ref), max_abs(actions, ref)
    details["d"][item] = {"ms": ms, "cosine": cos, "max_abs": err}
    status = "ok" if cos >= COS_MIN[precision] else "FAIL"
    rows.append(Row("d", item, status, f"{ms:.1f} ms", f"cos {cos:.5f} max abs {err:.3g} vs fp32 "
                                                       f"(min cos {COS_MIN[precision]})"))


def _pi0_eager(rows: list[Row], details: dict, model: Any, tensors: dict, ref: np.ndarray,
               args: argparse.Namespace) -> None:
    import torch

    def sample() -> Any:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model.sample_actions(**tensors)

    ms, actions = wall_time_ms(sample, iters=args.e2e_iters)
    _parity_row(rows, details, "pi0 bf16 eager", ms, actions.float().cpu().numpy(), ref, "bf16")


def _pi0_torch_cuda(rows: list[Row], details: dict, model: Any, cfg: Any, feeds: dict, ref: np.ndarray,
                    args: argparse.Namespace) -> None:
    from walkforge.plugins.constants import PAGE_SIZE
    from walkforge.recipes import pi0
    from walkforge.runtimes.chain import Chain
    from walkforge.runtimes.cuda import torch_cuda_walk_engines
    from walkforge.runtimes.kv_pool import KVPagePool

    walks = pi0.walks(model, cfg)
    chain = Chain(torch_cuda_walk_engines(walks), walks.plan())
    pages = len(feeds["state"]) * -(-cfg.prefix_len // PAGE_SIZE)
    pool = KVPagePool(cfg.llm.layers, cfg.llm.kv_heads, cfg.llm.head_dim, PAGE_SIZE, pages)
    ms, actions = wall_time_ms(lambda: run_pi0_chain(chain, cfg, feeds, pool), iters=args.e2e_iters)
    _parity_row(rows, details, "pi0 torch-cuda (graphed)", ms, actions.float().cpu().numpy(), ref, "bf16")


def _bundle_backends(rows: list[Row], details: dict, args: argparse.Namespace) -> None:
    """A bundle through walkforge.load: torch (CPU fp32) reference vs torch-cuda and cuda."""
    import walkforge
    from walkforge.artifacts.bundle import Bundle
    from walkforge.runtimes.backends import probe
    from walkforge.runtimes.inputs import example_inputs

    bundle = Path(args.bundle) if args.bundle else _compile_tiny()
    feeds = example_inputs(Bundle.open(bundle), batch=1, seed=0)
    ref = walkforge.load(bundle, "torch").run(feeds)["actions"]
    for backend, precision in (("torch-cuda", "bf16"), ("cuda", "fp32")):
        item = f"{bundle.name} {backend}"
        ok, reason = probe(backend)
        if not ok:
            rows.append(Row("d", item, "skip", "", reason))
            continue
        runner = walkforge.load(bundle, backend)
        ms, out = wall_time_ms(lambda r=runner: r.run(feeds)["actions"], iters=args.e2e_iters)
        _parity_row(rows, details, item, ms, out, ref, precision)


def _compile_tiny() -> Path:
    from walkforge.compiler.pipeline import CompileRequest, compile_bundle

    out = ROOT / "build" / "gpu-check-pi0-tiny"
    compile_bundle(CompileRequest("pi0", out, variant="tiny", seed=0, force=True))
    return out


# ---------------------------------------------------------------- main


def _guarded(rows: list[Row], section: str, item: str, fn: Callable[[], None]) -> None:
    """Run `fn`; on any failure add an error row (with its one-line cause) and carry on."""
    try:
        fn()
    except Exception as exc:  # a failing section must not stop the others: it is reported
        rows.append(Row(section, item, "error", "", one_line(exc)))
        traceback.print_exc(file=sys.stderr)


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "cupy", "onnxruntime"):
        try:
            info[module] = __import__(module).__version__
        except ImportError as exc:
            info[module] = f"absent ({exc})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    return info


SECTIONS = {"a": ("Triton vs reference", section_a), "b": ("AOT cubin/PTX", section_b),
            "c": ("paged attention vs SDPA", section_c), "d": ("pi0 end to end", section_d)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="abcd")
    ap.add_argument("--bundle", help="pi0 bundle for the torch-cuda/cuda rows of d (default: tiny, compiled)")
    ap.add_argument("--iters", type=int, default=100, help="timed kernel calls per measurement (c)")
    ap.add_argument("--e2e-iters", type=int, default=5, help="timed pi0 runs per measurement (d)")
    ap.add_argument("--out", help="JSON path (default: $OUT/gpu-check.json or build/gpu-check.json)")
    args = ap.parse_args(argv)
    if set(args.sections) - set(SECTIONS):
        ap.error(f"--sections takes letters from {''.join(SECTIONS)}, got {args.sections!r}")
    import torch

    rows: list[Row] = []
    details: dict[str, Any] = {"machine": machine(), "seconds": {}}
    if not torch.cuda.is_available():
        rows.append(Row("-", "CUDA device", "error", "", "torch.cuda.is_available() is False"))
    else:
        for key in args.sections:
            title, fn = SECTIONS[key]
            print(f"[gpu-check] {key}: {title} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            _guarded(rows, key, title, lambda fn=fn: fn(rows, details, args))
            details["seconds"][key] = round(time.perf_counter() - start, 1)
    print(f"gpu-check on {details['machine'].get('gpu', 'no GPU')}: {details['machine']}")
    print(format_table(rows))
    path = output_path(args.out, os.environ)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": [asdict(r) for r in rows], **details}, indent=1, default=str))
    print(f"wrote {path}")
    return 1 if any(r.status in ("FAIL", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
