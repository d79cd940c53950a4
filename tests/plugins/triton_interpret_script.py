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

from plugin_cases import ALL_CASES, make_inputs  # noqa: E402

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
    return {
        "kv_write": (pool - expected_pool).abs().max().item(),
        "attention": attention_err,
        "attention_s": time.perf_counter() - start,
    }


if __name__ == "__main__":
    by_id = {case.id: case for case in ALL_CASES}
    print(json.dumps({case_id: errors(by_id[case_id]) for case_id in sys.argv[1:]}))
