"""A tiny walk using both plugin ops, for export tests."""

from __future__ import annotations

import torch

import walkforge.plugins  # noqa: F401  (registers the ops)

INPUT_NAMES = ["pool", "q", "k_all", "v_all", "block_table", "positions", "prefix_lens", "suffix_mask",
               "kv_scales"]
OUTPUT_NAMES = ["out", "pool_out"]


class TinyWalk(torch.nn.Module):
    """Append the suffix K/V of every layer to the pool, then attend at one layer."""

    def __init__(self, layer: int, scale: float) -> None:
        super().__init__()
        self.layer, self.scale = layer, scale

    def forward(self, pool, q, k_all, v_all, block_table, positions, prefix_lens, suffix_mask, kv_scales):
        # pool: [L, 2, NP, PS, KVH, D]; q: [B, H, S, D]; k_all, v_all: [L, B, KVH, S, D]; kv_scales: [L, 2]
        pool = torch.ops.walkforge.kv_cache_write(pool, k_all, v_all, block_table, positions, kv_scales)
        k, v = k_all[self.layer], v_all[self.layer]
        out = torch.ops.walkforge.paged_attention(
            q, k, v, pool, block_table, prefix_lens, suffix_mask, self.layer, self.scale, kv_scales
        )
        return out, pool
