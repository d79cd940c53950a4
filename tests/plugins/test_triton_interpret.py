"""Triton kernels under TRITON_INTERPRET=1 vs the eager ops, in one subprocess.

A subprocess because Triton fixes interpreter vs JIT for every `@triton.jit` function, its own
`tl.zeros`/`tl.max` included, when `triton` is imported; in this pytest process other test
modules have already imported it without the variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugin_cases import ALL_CASES, case_tol
from tolerances import BF16_EPS

from walkforge.plugins.kv_cache_write import kv_cache_write_triton

HERE = Path(__file__).parent
# kv_write: max abs difference, a scatter of copies; kv_write_fp8: bytes that differ, x / scale
# rounded to E4M3 nearest-even is correctly rounded: both exact on any CPU. attention (fp32 and fp8
# pools): rel_err of the interpreter's numpy sums vs torch's, the fp32 attention tolerance of the case
TOL = {"kv_write": lambda case: 0.0, "attention": case_tol, "kv_write_fp8": lambda case: 0,
       "attention_fp8": case_tol}  # fmt: skip
CASE = {c.id: c for c in ALL_CASES}
INTERPRET_TIMEOUT_S = 1800  # bounds a hang only: ~1 min on an idle 2-core machine, 3 min loaded
# every S=1 case plus S=51 cases covering both page sizes, both KV head counts and both head dims
CASES = [c.id for c in ALL_CASES if c.seq == 1] + [
    "ps8-kvh1-d16-s51-b4", "ps16-kvh2-d16-s51-b4", "ps8-kvh2-d256-s51-b1", "ps16-kvh1-d256-s51-b1",
]  # fmt: skip


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(HERE / "triton_interpret_script.py"), *CASES],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=INTERPRET_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("kernel", sorted(TOL))
def test_kernel_matches_eager(interpreted, case_id, kernel):
    assert interpreted[case_id][kernel] <= TOL[kernel](CASE[case_id])


def test_cuda_dispatch_casts_bf16_in_and_out(interpreted):
    """`register_cuda`'s kernels (bf16 q/k/v as torch-cuda passes them, float32 pool): attention comes
    back in q's dtype within one bf16 rounding (BF16_EPS, the output's own rounding ≤ 2**-9 plus the
    fp32 attention differences); the write is exact and leaves the input pool untouched."""
    got = interpreted["cuda_dispatch"]
    assert got["attention_dtype"] == "torch.bfloat16" and got["attention"] <= BF16_EPS
    assert got["kv_write"] == 0.0 and got["pool_untouched"]


def test_cpu_launch_without_interpreter_fails_clearly():
    pool = torch.zeros(1, 2, 1, 16, 1, 16)
    k = torch.zeros(1, 1, 1, 1, 16)
    index = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kv_cache_write_triton(pool, k, k, index, index)
