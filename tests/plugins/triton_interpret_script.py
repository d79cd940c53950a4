"""Run the Triton kernels under TRITON_INTERPRET=1 and print their max errors vs the eager ops as JSON.

Run as a subprocess (see test_triton_interpret.py): Triton picks interpreter vs JIT for all its
`@triton.jit` functions when it is imported, so the variable must be set before `import triton`.
Usage: python triton_interpret_script.py CASE_ID...
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from plugin_cases import ALL_CASES, fp8_pool, make_inputs  # noqa: E402

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
    attention_err = (pa.paged_attention_triton(*args) - pa.paged_attention(*args)).abs().max().item()
    attention_s = time.perf_counter() - start
    return {
        "kv_write": (pool - expected_pool).abs().max().item(),
        "attention": attention_err,
        "attention_s": attention_s,
        **fp8_errors(x),
    }


def fp8_errors(x: dict) -> dict:
    """fp8 pool: bytes that differ after the write (must be 0), attention max abs error."""
    scales, pool8 = x["kv_scales"], fp8_pool(x["pool"], x["kv_scales"])
    kv_args = (x["k_all"], x["v_all"], x["block_table"], x["positions"], scales)
    expected = kvw.kv_cache_write(pool8, *kv_args).view(torch.uint8)
    written = kvw.kv_cache_write_triton(pool8.clone(), *kv_args).view(torch.uint8)
    layer = x["layer"]
    args = (x["q"], x["k_all"][layer], x["v_all"][layer], pool8, x["block_table"], x["prefix_lens"],
            x["suffix_mask"], layer, x["scale"], scales)  # fmt: skip
    return {
        "kv_write_fp8": int((written != expected).sum()),
        "attention_fp8": (pa.paged_attention_triton(*args) - pa.paged_attention(*args)).abs().max().item(),
    }


if __name__ == "__main__":
    by_id = {case.id: case for case in ALL_CASES}
    print(json.dumps({case_id: errors(by_id[case_id]) for case_id in sys.argv[1:]}))
