"""BAGEL's walks, the run-time inputs of its front, and what its plugin kernels are built for.

A request (one image per batch row) is three walks:

    prefill  wrapped prompt [<|im_start|>] ids [<|im_end|>]   → context K/V in the page pool, the
                                                              two marker embeddings
    denoise  x_t, t, dt + every CFG branch's cache           → x_{t+dt}, run num_timesteps − 1 times
    decode   final latents [B, h, w, 64]                      → image [B, H, W, 3] in [0, 1]

The page pool holds one context per cache row: rows 0…B−1 are the prompts (written by prefill),
rows B…2B−1 the text-dropped contexts, which are empty (prefix length 0; denoise alone reads them).
The guidance settings are inputs of denoise, so the interval rule, all three renorm types and the
Euler update run inside its engine; the runtime only steps the shifted schedule.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from walkforge.graphs.walk import GraphNode, Loop, Sequential, TensorSpec
from walkforge.plugins.constants import PAGE_SIZE, kv_pages
from walkforge.recipes.bagel.config import GEN_HEADS, BagelConfig
from walkforge.recipes.bagel.model import BagelModel
from walkforge.recipes.blocks.flow import TORCH_POOL_DTYPES, PagedCache

SCHEDULE = "shifted_euler"  # runtimes/chain.py SCHEDULES: BAGEL's shifted timesteps, one Euler step each
DENOISE_INPUTS = (
    "x_t t dt markers kv_pool block_table prefix_lens kv_scales cfg_scale cfg_interval "
    "cfg_renorm_min cfg_renorm_type"
)


def fake_inputs(
    cfg: BagelConfig, batch: int = 1, seed: int = 0, height: int = 64, width: int = 48
) -> dict[str, np.ndarray]:
    """Valid inputs of the front's `run`: prompts (the prompt's own ids, no wrappers) of differing
    lengths right-padded with 0, and start noise in the latent grid [B, H/16, W/16, 64]."""
    rng = np.random.default_rng(seed)
    n = cfg.max_prompt_len
    lengths = n - (np.arange(batch) * max(1, n // 3)) % n
    prompt_mask = np.arange(n)[None, :] < lengths[:, None]
    prompt_ids = rng.integers(0, min(cfg.special_tokens.ids()), (batch, n)) * prompt_mask
    grid = (height // cfg.pixels_per_token, width // cfg.pixels_per_token)
    return {
        "prompt_ids": prompt_ids.astype(np.int64),
        "prompt_mask": prompt_mask,
        "noise": rng.standard_normal((batch, *grid, cfg.latent_dim)).astype(np.float32),
    }


class _Walk(BagelModel):
    """One walk's module: the model's methods over only the `parts` it uses, under the model's names."""

    parts: tuple[str, ...] = ()

    def __init__(self, model: BagelModel) -> None:
        nn.Module.__init__(self)
        self.cfg = model.cfg
        self.train(model.training)
        for name in self.parts:
            self.add_module(name, getattr(model, name))


class PrefillWalk(_Walk):
    parts = ("llm",)

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        kv_pool: torch.Tensor,
        block_table: torch.Tensor,
        kv_scales: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes each prompt row's valid tokens at positions 0…L−1 of its cache row (the block
        table's first B rows; the text-dropped rows after them stay empty)."""
        k, v = self.prefill(prompt_ids, prompt_mask)
        positions = torch.where(prompt_mask, torch.cumsum(prompt_mask.long(), -1) - 1, -1)  # -1: skip
        pool = torch.ops.walkforge.kv_cache_write(
            kv_pool, k, v, block_table[: prompt_ids.shape[0]], positions, kv_scales
        )
        return pool, self.markers()


class DenoiseWalk(_Walk):
    parts = ("llm", *GEN_HEADS)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        dt: torch.Tensor,
        markers: torch.Tensor,
        kv_pool: torch.Tensor,
        block_table: torch.Tensor,
        prefix_lens: torch.Tensor,
        kv_scales: torch.Tensor,
        cfg_scale: torch.Tensor,
        cfg_interval: torch.Tensor,
        cfg_renorm_min: torch.Tensor,
        cfg_renorm_type: torch.Tensor,
    ) -> torch.Tensor:
        cache = PagedCache(kv_pool, block_table, prefix_lens, kv_scales)
        return self.denoise_step(
            x_t, t, dt, markers, cache, cfg_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type
        )


class DecodeWalk(_Walk):
    parts = ("vae",)

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        return self.decode(x_t)


def specs(cfg: BagelConfig, kv_dtype: str) -> dict[str, TensorSpec]:
    """Every walk tensor by name: "batch" images, "rows" cache rows (branches × batch)."""
    b, llm = "batch", cfg.llm
    pool = (llm.layers, 2, "num_pages", PAGE_SIZE, llm.kv_heads, llm.head_dim)
    grid = (b, "grid_h", "grid_w", cfg.latent_dim)
    return {
        x.name: x
        for x in (
            TensorSpec("prompt_ids", "int64", (b, "prompt_len")),
            TensorSpec("prompt_mask", "bool", (b, "prompt_len")),
            TensorSpec("kv_pool", kv_dtype, pool),
            TensorSpec("kv_pool_out", kv_dtype, pool),
            TensorSpec("kv_scales", "float32", (llm.layers, 2)),
            TensorSpec("block_table", "int64", ("rows", "max_pages")),
            TensorSpec("prefix_lens", "int64", ("rows",)),
            TensorSpec("markers", "float32", (2, llm.width)),
            TensorSpec("x_t", "float32", grid),
            TensorSpec("x_next", "float32", grid),
            TensorSpec("t", "float32", (b,)),
            TensorSpec("dt", "float32", (1,)),
            TensorSpec("cfg_scale", "float32", (2,)),
            TensorSpec("cfg_interval", "float32", (2,)),
            TensorSpec("cfg_renorm_min", "float32", (1,)),
            TensorSpec("cfg_renorm_type", "int64", (1,)),
            TensorSpec("image", "float32", (b, "height", "width", 3)),
        )
    }


def walks(model: BagelModel, cfg: BagelConfig, kv_dtype: str = "float32") -> Sequential:
    """prefill → Loop(denoise, num_steps, shifted Euler) → decode; `kv_dtype` is the page pool's
    ("float32" or "float8_e4m3fn" with per-layer `kv_scales`)."""
    spec = specs(cfg, kv_dtype)
    examples = _example_inputs(cfg, spec, next(model.parameters()).device)

    def node(name: str, walk: type, ins: str, outs: str, aliases: dict | None = None) -> GraphNode:
        return GraphNode(
            name,
            walk(model),
            tuple(spec[i] for i in ins.split()),
            tuple(spec[o] for o in outs.split()),
            {i: examples[i] for i in ins.split()},
            aliases or {},
        )

    nodes = (
        node(
            "prefill",
            PrefillWalk,
            "prompt_ids prompt_mask kv_pool block_table kv_scales",
            "kv_pool_out markers",
            aliases={"kv_pool_out": "kv_pool"},
        ),
        node("denoise", DenoiseWalk, DENOISE_INPUTS, "x_next"),
        node("decode", DecodeWalk, "x_t", "image"),
    )
    loop = Loop(body="denoise", count="num_steps", carry={"x_next": "x_t"}, schedule=SCHEDULE)
    return Sequential(nodes=nodes, steps=("prefill", loop, "decode"), kv_tokens=cfg.context_len)


def _example_inputs(
    cfg: BagelConfig, spec: dict[str, TensorSpec], device: torch.device
) -> dict[str, torch.Tensor]:
    """Tracing inputs: 2 images, 4 cache rows (2 prompts, 2 empty), a 3 × 2 latent grid."""
    gen = torch.Generator().manual_seed(0)
    fake = fake_inputs(cfg, batch=2, height=3 * cfg.pixels_per_token, width=2 * cfg.pixels_per_token)
    pages = kv_pages(cfg.context_len)
    lens = torch.tensor([cfg.context_len, cfg.context_len // 2, 0, 0])
    mask = torch.arange(cfg.context_len)[None] < lens[:2, None]
    table = torch.full((4, pages), -1, dtype=torch.int64)
    table[:2] = torch.arange(2 * pages).reshape(2, pages) + 1
    pool = torch.randn(
        cfg.llm.layers, 2, 2 * pages + 1, PAGE_SIZE, cfg.llm.kv_heads, cfg.llm.head_dim, generator=gen
    )
    given = {
        "prompt_ids": torch.randint(0, cfg.llm.vocab, mask.shape, generator=gen) * mask,
        "prompt_mask": mask,
        "kv_pool": pool.to(TORCH_POOL_DTYPES[spec["kv_pool"].dtype]),
        "kv_scales": torch.ones(cfg.llm.layers, 2),
        "block_table": table,
        "prefix_lens": lens,
        "markers": torch.randn(2, cfg.llm.width, generator=gen),
        "x_t": torch.from_numpy(fake["noise"]),
        "t": torch.tensor([0.7, 0.7]),
        "dt": torch.tensor([-0.05]),
        "cfg_scale": torch.tensor([4.0, 1.5]),
        "cfg_interval": torch.tensor([0.4, 1.0]),
        "cfg_renorm_min": torch.tensor([0.0]),
        "cfg_renorm_type": torch.tensor([0]),
    }
    return {k: v.to(device) for k, v in given.items()}


def trt_dims(cfg: BagelConfig) -> dict[str, tuple[int, int, int]]:
    """TensorRT (min, opt, max): wrapped prompts of 3 to context_len tokens, 1 to 16 cache rows (two
    per image with text guidance), latent grids of 1 to max_latent_size tokens a side."""
    side, ctx = cfg.max_latent_size, cfg.context_len
    return {
        "prompt_len": (3, ctx, ctx),
        "rows": (1, 2, 16),
        "grid_h": (1, min(side, 4), side),
        "grid_w": (1, min(side, 3), side),
    }


def kernel_shapes(cfg: BagelConfig) -> dict[str, int]:
    """What the plugin kernels are specialised to when compiled ahead of time (denoise attention)."""
    return {
        "num_heads": cfg.llm.heads,
        "kv_heads": cfg.llm.kv_heads,
        "head_dim": cfg.llm.head_dim,
        "page_size": PAGE_SIZE,
    }
