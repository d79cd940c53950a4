"""Constants shared by the plugin references, ONNX bodies and Triton kernels.

Pool layout (docs/design.md, "KV cache"): float32 or float8_e4m3fn `[layers, 2, num_pages, page_size,
kv_heads, head_dim]`, index 0 of dim 1 is K, index 1 is V. An fp8 pool has per-layer scales
`kv_scales` float32 `[layers, 2]` (K, V): stored = E4M3(x / scale), read = stored * scale.
"""

from __future__ import annotations

DOMAIN = "walkforge"
"""ONNX domain of every walkforge op; also the torch.library namespace."""
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "walkforge"
"""Value of the `plugin_namespace` string attribute TensorRT's parser keys plugins on."""

PAGE_SIZE = 16
"""Default tokens per KV page."""


def kv_pages(tokens: int, page_size: int = PAGE_SIZE) -> int:
    """Pages that hold `tokens` KV positions: the one place this is computed."""
    return -(-int(tokens) // int(page_size))


POOL_K, POOL_V = 0, 1
"""Index of K and V along dim 1 of the pool."""
POOL_IN, POOL_OUT = "pool", "pool_out"
"""Names of the formal input and output that carry the page pool in every op's schema (found by name)."""

MAX_HEAD_DIM = 256
"""Largest head_dim the Triton kernels are built for (a constexpr, padded to a power of two)."""

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn: FP8 weights, activations and pool writes saturate to ±FP8_MAX."""
FP8_KERNEL_SUFFIX = "_fp8"
"""Appended to a kernel's AOT record name when it was compiled for an fp8 pool."""
FP8_POOL_DTYPE = "float8_e4m3fn"
"""TensorSpec dtype of an fp8 pool (numpy: ml_dtypes.float8_e4m3fn; torch: torch.float8_e4m3fn)."""

MASK_FILL = -2.3819763e38
"""Finite logit fill for masked keys (a fully masked row becomes uniform, never NaN)."""
