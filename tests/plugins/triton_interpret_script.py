"""Run the Triton kernels under TRITON_INTERPRET=1 and print their errors vs the eager ops as JSON.

Run as a subprocess (see test_triton_interpret.py): Triton picks interpreter vs JIT for all its
`@triton.jit` functions when it is imported, so the variable must be set before `import triton`.
Usage: PYTHONPATH=tests python triton_interpret_script.py CASE_ID...  (tests/ holds tolerances.py)
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from plugin_cases import ALL_CASES, fp8_pool, make_inputs  # noqa: E402
from tolerances import rel_err  # noqa: E402  (tests/ is on PYTHONPATH, see test_triton_interpret.py)

from walkforge.plugins import kv_cache_write as kvw  # noqa: E402
from walkforge.plugins import paged_attention as pa  # noqa: E402


def errors(case) -> dict:
    x = make_inputs(case)
    kv_args = (x["k_all"], x["v_all"], x["block_table"], x["positions"])
    expected_pool = kvw.kv_cache_write(x["pool"], *kv_args)
    pool = kvw.kv_cache_write_triton(x["pool"].clone(), *kv_args)
    layer = x["layer"]
    args = (x["q"], x["k_all"][layer], x["v_all"][layer], x["pool"], x["block_table"], x["prefix_lens"],
            x["suffix_mask"], layer, x["scale"])  # fmt: skip
    start = time.perf_counter()
    attention_err = rel_err(pa.paged_attention_triton(*args), pa.paged_attention(*args))
    attention_s = time.perf_counter() - start
    return {
        "kv_write": (pool - expected_pool).abs().max().item(),
        "attention": attention_err,
        "attention_s": attention_s,
        **fp8_errors(x),
    }


def fp8_errors(x: dict) -> dict:
    """fp8 pool: bytes that differ after the write (must be 0), attention error relative to its scale."""
    scales, pool8 = x["kv_scales"], fp8_pool(x["pool"], x["kv_scales"])
    kv_args = (x["k_all"], x["v_all"], x["block_table"], x["positions"], scales)
    expected = kvw.kv_cache_write(pool8, *kv_args).view(torch.uint8)
    written = kvw.kv_cache_write_triton(pool8.clone(), *kv_args).view(torch.uint8)
    layer = x["layer"]
    args = (x["q"], x["k_all"][layer], x["v_all"][layer], pool8, x["block_table"], x["prefix_lens"],
            x["suffix_mask"], layer, x["scale"], scales)  # fmt: skip
    return {
        "kv_write_fp8": int((written != expected).sum()),
        "attention_fp8": rel_err(pa.paged_attention_triton(*args), pa.paged_attention(*args)),
    }


def dispatch_errors(case) -> dict:
    """What `register_cuda` dispatches CUDA tensors to (`_*_cuda`), here on CPU: bf16 q/k/v into a
    float32 pool, vs the eager ops on the same bf16-rounded values."""
    x = make_inputs(case)
    layer = x["layer"]
    q, k, v = x["q"].bfloat16(), x["k_all"][layer].bfloat16(), x["v_all"][layer].bfloat16()
    rest = (x["pool"], x["block_table"], x["prefix_lens"], x["suffix_mask"], layer, x["scale"])
    out = pa._paged_attention_cuda(q, k, v, *rest)
    k_all, v_all = x["k_all"].bfloat16(), x["v_all"].bfloat16()
    pool = kvw._kv_cache_write_cuda(x["pool"], k_all, v_all, x["block_table"], x["positions"])
    expected = kvw.kv_cache_write(x["pool"], k_all.float(), v_all.float(), x["block_table"], x["positions"])
    return {
        "attention_dtype": str(out.dtype),
        "attention": rel_err(out, pa.paged_attention(q.float(), k.float(), v.float(), *rest)),
        "kv_write": (pool - expected).abs().max().item(),
        "pool_untouched": bool(torch.equal(x["pool"], make_inputs(case)["pool"])),
    }


if __name__ == "__main__":
    by_id = {case.id: case for case in ALL_CASES}
    results = {case_id: errors(by_id[case_id]) for case_id in sys.argv[1:]}
    print(json.dumps(results | {"cuda_dispatch": dispatch_errors(by_id[sys.argv[1]])}))
