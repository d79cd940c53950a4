"""pi0's walks, the run-time inputs of its front, and what its plugin kernels are built for.

A request is three walks:

    vision   images [B, V, 3, 224, 224] in [0, 1]  → image tokens [B, V·256, D_llm]
    prefill  image tokens + prompt                 → per-layer prefix K/V (the KV cache)
    denoise  x_t, t, state + the cache             → x_{t+dt}, run num_steps times (Euler)

The camera count V ("views", up to the compiled `num_views`) and the prompt length ("prompt_len",
up to `max_prompt_len`) are dynamic: the front hands vision only the cameras some request uses
and prefill only the prompt columns some request fills (a compacted prefix), so masked cameras
and prompt padding cost nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from walkforge.graphs.walk import GraphNode, Loop, Sequential, TensorSpec
from walkforge.plugins.constants import PAGE_SIZE, kv_pages
from walkforge.recipes.pi0.config import ACTION_HEADS, Pi0Config
from walkforge.recipes.pi0.model import PagedCache, Pi0Model

TORCH_POOL_DTYPES = {"float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}


def fake_inputs(cfg: Pi0Config, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid run-time inputs (Pi0Policy's, `noise` = the initial x_t). Request 0's last camera
    is masked off (when V > 1) and prompt lengths differ per request (right-padded with id 0)."""
    rng = np.random.default_rng(seed)
    return {
        **prefix_inputs(cfg, batch, rng),
        "state": rng.uniform(-1, 1, (batch, cfg.state_dim)).astype(np.float32),
        "noise": rng.standard_normal((batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32),
    }


def prefix_inputs(cfg: Pi0Config, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The prefix part of fake inputs, shared with pi0.5: images, camera masks (request 0's last
    camera off when V > 1), prompts of differing lengths (right-padded with id 0)."""
    v, n, s = cfg.num_views, cfg.max_prompt_len, cfg.vision.image_size
    image_masks = np.ones((batch, v), dtype=bool)
    if v > 1:
        image_masks[0, -1] = False
    lengths = n - (np.arange(batch) * max(1, n // 3)) % n
    prompt_mask = np.arange(n)[None, :] < lengths[:, None]
    prompt_ids = rng.integers(1, cfg.llm.vocab, (batch, n)) * prompt_mask
    return {
        "images": rng.random((batch, v, 3, s, s), dtype=np.float32),
        "image_masks": image_masks,
        "prompt_ids": prompt_ids.astype(np.int64),
        "prompt_mask": prompt_mask,
    }


class _Walk(Pi0Model):
    """One walk's module: the model's methods, holding only the `parts` this walk uses under
    the model's own names (so state-dict keys and KEY_MAP apply unchanged and the engine
    carries no other walk's weights). Subclasses name their inputs in `forward`."""

    parts: tuple[str, ...] = ()

    def __init__(self, model: Pi0Model) -> None:
        nn.Module.__init__(self)
        self.cfg = model.cfg
        self.train(model.training)
        for name in self.parts:
            self.add_module(name, getattr(model, name))


class VisionWalk(_Walk):
    parts = ("vision", "projector")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_images(images)


class PrefillWalk(_Walk):
    parts = ("llm",)

    def forward(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor, kv_pool: torch.Tensor, block_table: torch.Tensor,
                kv_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prefill_paged(image_tokens, image_masks, prompt_ids, prompt_mask, kv_pool, block_table,
                                  kv_scales)


class DenoiseWalk(_Walk):
    parts = ("expert", *ACTION_HEADS)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, state: torch.Tensor,
                kv_pool: torch.Tensor, block_table: torch.Tensor, prefix_lens: torch.Tensor,
                kv_scales: torch.Tensor) -> torch.Tensor:
        return self.denoise_step(x_t, t, dt, state, PagedCache(kv_pool, block_table, prefix_lens, kv_scales))


def walks(model: Pi0Model, cfg: Pi0Config, kv_dtype: str = "float32") -> Sequential:
    """vision → prefill → Loop(denoise, num_steps): contracts with a dynamic "batch", "views"
    (≤ cfg.num_views cameras) and "prompt_len" (≤ cfg.max_prompt_len).

    `kv_dtype` is the page pool's: "float32" or "float8_e4m3fn" (stored with the per-layer
    `kv_scales` [L, 2] that prefill and denoise take; a float32 pool ignores them).
    """
    b, s = "batch", cfg.vision.image_size
    pool = (cfg.llm.layers, 2, "num_pages", PAGE_SIZE, cfg.llm.kv_heads, cfg.llm.head_dim)
    spec = {x.name: x for x in (
        TensorSpec("images", "float32", (b, "views", 3, s, s)),
        TensorSpec("image_tokens", "float32", (b, "image_tokens", cfg.llm.width)),  # views · 256
        TensorSpec("image_masks", "bool", (b, "views")),
        TensorSpec("prompt_ids", "int64", (b, "prompt_len")),
        TensorSpec("prompt_mask", "bool", (b, "prompt_len")),
        TensorSpec("kv_pool", kv_dtype, pool), TensorSpec("kv_pool_out", kv_dtype, pool),
        TensorSpec("kv_scales", "float32", (cfg.llm.layers, 2)),
        TensorSpec("block_table", "int64", (b, "max_pages")), TensorSpec("prefix_lens", "int64", (b,)),
        TensorSpec("x_t", "float32", (b, cfg.action_horizon, cfg.action_dim)),
        TensorSpec("t", "float32", (b,)), TensorSpec("dt", "float32", (1,)),
        TensorSpec("state", "float32", (b, cfg.state_dim)),
        TensorSpec("x_next", "float32", (b, cfg.action_horizon, cfg.action_dim)),
    )}
    examples = _example_inputs(cfg, spec, next(model.parameters()).device)
    return chain_walks(model, spec, examples, DenoiseWalk,
                       "x_t t dt state kv_pool block_table prefix_lens kv_scales", cfg.prefix_len)


def chain_walks(model: nn.Module, spec: dict[str, TensorSpec], examples: dict[str, torch.Tensor],
                denoise: type, denoise_inputs: str, kv_tokens: int) -> Sequential:
    """vision → prefill → Loop(`denoise`, num_steps), the chain pi0 and pi0.5 share: prefill
    writes the page pool in place (`kv_pool_out` aliases `kv_pool`), each Euler step reads it."""

    def node(name: str, walk: type, ins: str, outs: str, aliases: dict | None = None) -> GraphNode:
        return GraphNode(name, walk(model), tuple(spec[i] for i in ins.split()),
                         tuple(spec[o] for o in outs.split()), {i: examples[i] for i in ins.split()},
                         aliases or {})

    nodes = (
        node("vision", VisionWalk, "images", "image_tokens"),
        node("prefill", PrefillWalk,
             "image_tokens image_masks prompt_ids prompt_mask kv_pool block_table kv_scales",
             "kv_pool_out prefix_lens", aliases={"kv_pool_out": "kv_pool"}),
        node("denoise", denoise, denoise_inputs, "x_next"),
    )
    loop = Loop(body="denoise", count="num_steps", carry={"x_next": "x_t"}, schedule="euler")
    return Sequential(nodes=nodes, steps=("vision", "prefill", loop), kv_tokens=kv_tokens)


def _example_inputs(cfg: Pi0Config, spec: dict[str, TensorSpec], device: torch.device
                    ) -> dict[str, torch.Tensor]:
    """Tracing inputs with batch = 2: fake_inputs where they exist, random of the spec else."""
    given = {k: torch.from_numpy(a) for k, a in fake_inputs(cfg, batch=2).items()}
    pages = kv_pages(cfg.prefix_len)  # per request; 2 requests + 1 spare page
    given["kv_pool"] = torch.randn(cfg.llm.layers, 2, 2 * pages + 1, PAGE_SIZE, cfg.llm.kv_heads,
                                   cfg.llm.head_dim, generator=torch.Generator().manual_seed(1))
    given["kv_pool"] = given["kv_pool"].to(TORCH_POOL_DTYPES[spec["kv_pool"].dtype])
    given["kv_scales"] = torch.ones(cfg.llm.layers, 2)
    given["block_table"] = torch.arange(2 * pages).reshape(2, pages) + 1
    given["prefix_lens"] = torch.tensor([cfg.prefix_len - 3, cfg.prefix_len // 2])
    given["x_t"] = given.pop("noise")
    given["t"] = torch.full((2,), 0.7)
    given["dt"] = torch.full((1,), -1.0 / cfg.num_steps)
    gen = torch.Generator().manual_seed(0)
    given["image_tokens"] = torch.randn(2, cfg.num_views * cfg.vision.tokens, cfg.llm.width,
                                        generator=gen)  # all views: its dim is dynamic
    out = {}
    for name, s in spec.items():
        if name == "kv_pool_out":
            continue
        shape = tuple(2 if isinstance(d, str) else d for d in s.shape)
        out[name] = (given[name] if name in given else torch.randn(shape, generator=gen)).to(device)
    return out


def trt_dims(cfg: Pi0Config) -> dict[str, tuple[int, int, int]]:
    """TensorRT (min, opt, max) of the compacted prefix's dims: 1 camera up to the compiled count,
    its image tokens, 1 prompt token up to the compiled maximum (opt: a full request)."""
    views, tokens, prompt = cfg.num_views, cfg.vision.tokens, cfg.max_prompt_len
    return {"views": (1, views, views), "image_tokens": (tokens, views * tokens, views * tokens),
            "prompt_len": (1, prompt, prompt)}


def kernel_shapes(cfg: Pi0Config) -> dict[str, int]:
    """What the plugin kernels are specialised to when compiled ahead of time (denoise attention)."""
    return {"num_heads": cfg.expert.heads, "kv_heads": cfg.expert.kv_heads,
            "head_dim": cfg.expert.head_dim, "page_size": PAGE_SIZE}
