"""What every flow-matching VLA here (pi0, pi0.5, SmolVLA) shares: the time embedding, the
attention rule over ar flags, the prefix caches the expert reads, and how a model becomes its walks.

A request is a prefix (cameras, prompt, …) run once through the VLM, whose per-layer K/V are the
cache, then `num_steps` Euler steps of the action expert over the suffix, each reading the cache:
dense tensors in the eager reference (`DenseCache`), the runtime's page pool through the
PagedAttention op in the walks (`PagedCache`). `Parts` cuts one walk's module out of the model
(only the parts it uses, under the model's own names), `flow_chain` chains the walks:
vision → prefill → Loop(denoise, num_steps), prefill writing the page pool in place, with the
`guide` walk (real-time chunking, `GuideWalk`) after each denoise step when the caller asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from walkforge.graphs.walk import GraphNode, Loop, Sequential, TensorSpec
from walkforge.plugins import kv_cache_write, paged_attention  # noqa: F401  registers torch.ops.walkforge
from walkforge.plugins.constants import PAGE_SIZE, kv_pages
from walkforge.recipes.blocks.gemma import attend

TORCH_POOL_DTYPES = {"float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}
"""The page pool's dtype names (the manifest's) → torch dtypes."""


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0
                   ) -> torch.Tensor:
    """Sinusoid of flow time t [B] → [B, dim]: periods min…max on a log scale, in float64."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    x = (1.0 / period * 2 * math.pi)[None, :] * t.double()[:, None]  # [B, dim / 2]
    return torch.cat([x.sin(), x.cos()], dim=-1).float()



def make_attention_mask(pad_mask: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom: bool [B, N, N], True where token i (row) may see token j.

    Every token carries a flag ar ("starts a new block"). Token i sees token j iff
    cumsum(ar)[j] <= cumsum(ar)[i] and both are real (pad_mask). So flags 0 everywhere give
    bidirectional attention; a 1 starts a block that sees everything before it, while nothing
    before it sees into it. pad_mask: bool [B, N]; ar_mask: bool [N] or [B, N].
    """
    cum = torch.cumsum(ar_mask.long(), dim=-1)
    allowed = cum[..., None, :] <= cum[..., :, None]
    return allowed & pad_mask[:, None, :] & pad_mask[:, :, None]



def suffix_attention_mask(prefix_mask: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
    """The suffix rows of the full mask, over keys [prefix, suffix]: bool [B, 1, S, P+S].

    The suffix's ar cumsum is ≥ 1 > 0 = the prefix's, so every suffix token sees every real
    prefix token; among themselves the suffix tokens follow `suffix_mask` [S, S] (from
    `make_attention_mask`). prefix_mask: bool [B, P].
    """
    to_prefix = prefix_mask[:, None, :].expand(-1, suffix_mask.shape[0], -1)  # [B, S, P]
    return torch.cat([to_prefix, suffix_mask.expand(prefix_mask.shape[0], -1, -1)], dim=-1)[:, None]



class DenseCache:
    """The prefix K/V as dense tensors (the eager reference): k/v [L, B, KVH, P, Dh], mask [B, P]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        self.k, self.v, self.mask = k, v, mask

    def lengths(self) -> torch.Tensor:
        return self.mask.long().sum(-1)  # [B]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               suffix_mask: torch.Tensor) -> torch.Tensor:
        """q: [B, H, S, Dh]; k, v: [B, KVH, S, Dh] → [B, S, H·Dh]; keys = [prefix, own suffix]."""
        mask = suffix_attention_mask(self.mask, suffix_mask)
        keys, values = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        return attend(q, keys, values, mask)



class PagedCache:
    """The prefix K/V in the runtime's page pool, read through the PagedAttention op.

    pool [L, 2, NP, PS, KVH, Dh] (float32 or float8_e4m3fn); block_table int64 [B, MP]; lengths
    int64 [B] (valid tokens, stored compactly at logical positions 0..lengths-1); kv_scales [L, 2]
    (an fp8 pool's K and V scale per layer; a float32 pool ignores them).
    """

    def __init__(self, pool: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor,
                 kv_scales: torch.Tensor) -> None:
        self.pool, self.block_table, self._lengths, self.kv_scales = pool, block_table, lengths, kv_scales

    def lengths(self) -> torch.Tensor:
        return self._lengths

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               suffix_mask: torch.Tensor) -> torch.Tensor:
        out = torch.ops.walkforge.paged_attention(q, k, v, self.pool, self.block_table, self._lengths,
                                                  suffix_mask, layer, q.shape[-1] ** -0.5, self.kv_scales)
        return out.transpose(1, 2).flatten(2)  # [B, H, S, Dh] → [B, S, H·Dh]


class Parts:
    """One walk's module, a mixin before the model class (`class VisionWalk(Parts, Pi0Model)`):
    the model's methods, holding only the `parts` this walk uses under the model's own names (so
    state-dict keys and the recipe's KEY_MAP apply unchanged and the engine carries no other
    walk's weights). Subclasses name their inputs in `forward`."""

    parts: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        self.cfg = model.cfg
        self.train(model.training)
        for name in self.parts:
            self.add_module(name, getattr(model, name))


GUIDE_INPUTS = ("prev_chunk", "prefix_weights", "max_guidance")
"""The guide walk's inputs that only a real-time-chunking caller gives (runtimes/fronts/flow.py
makes them); the chain runs the guide when they are there."""


def guidance_weight(tau: torch.Tensor, max_guidance: torch.Tensor) -> torch.Tensor:
    """LeRobot's RTC guidance weight at flow time τ = 1 − t [B]: min(c·r, max) with c = (1 − τ)/τ
    and r = ((1 − τ)² + τ²)/(1 − τ)²; at τ = 0 (the first step) c is +inf, which LeRobot turns
    into max_guidance (`nan_to_num(posinf=…)`), so the weight is max_guidance there."""
    one_minus = 1 - tau
    c = one_minus / torch.where(tau > 0, tau, torch.ones_like(tau))
    r = (one_minus * one_minus + tau * tau) / (one_minus * one_minus)
    return torch.minimum(torch.where(tau > 0, c * r, max_guidance), max_guidance)


class GuideWalk(nn.Module):
    """Real-time chunking's guided Euler step (LeRobot 0.6.1 `RTCProcessor.denoise_step`), run
    after the denoise body's plain one: x_t, x_next = x_t + dt·v [B, H, A], t [B], dt [1],
    prev_chunk [B, H, A] (the previous chunk's unexecuted rows, zero-padded), prefix_weights [B, H],
    max_guidance [B] → x_t + dt·(v − w·err) = x_next − dt·w·err [B, H, A], where x1 = x_t − t·v,
    err = (prev_chunk − x1)·W and w = `guidance_weight`. LeRobot's correction is a vector–Jacobian
    product taken with x_t marked for gradients only after v was computed, so it equals err: no
    gradient goes through the network, and none is taken here. A row whose weights are all 0 comes
    out exactly as the body's (robots with and without RTC share a batch)."""

    def forward(self, x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                prev_chunk: torch.Tensor, prefix_weights: torch.Tensor, max_guidance: torch.Tensor
                ) -> torch.Tensor:
        v = (x_next - x_t) / dt  # the body's velocity
        x1 = x_t - t.reshape(-1, 1, 1) * v  # its clean-chunk prediction
        err = (prev_chunk - x1) * prefix_weights.unsqueeze(-1)
        w = guidance_weight(1 - t, max_guidance)  # [B]
        return x_next - (dt * w).reshape(-1, 1, 1) * err


def guide_node(spec: Mapping[str, TensorSpec], examples: Mapping[str, torch.Tensor]) -> GraphNode:
    """The `guide` walk over the denoise walk's x_t, x_next, t, dt (their specs and examples) and
    the caller's GUIDE_INPUTS."""
    x_t = spec["x_t"]
    batch, horizon = x_t.shape[0], x_t.shape[1]
    ins = (x_t, spec["x_next"], spec["t"], spec["dt"], TensorSpec("prev_chunk", "float32", x_t.shape),
           TensorSpec("prefix_weights", "float32", (batch, horizon)),
           TensorSpec("max_guidance", "float32", (batch,)))
    out = TensorSpec("x_guided", "float32", x_t.shape)
    x = examples["x_t"]
    gen = torch.Generator().manual_seed(2)
    weights = torch.linspace(1.0, 0.0, x.shape[1]).expand(x.shape[0], -1).clone()
    weights[0, x.shape[1] // 2:] = 0  # row 0: a shorter horizon
    given = {"x_t": x, "x_next": x + 0.1 * torch.randn(x.shape, generator=gen).to(x.device),
             "t": examples["t"], "dt": examples["dt"],
             "prev_chunk": torch.randn(x.shape, generator=gen).to(x.device),
             "prefix_weights": weights.to(x.device),
             "max_guidance": torch.tensor([10.0, 5.0], device=x.device)}
    return GraphNode("guide", GuideWalk(), ins, (out,), given)


def flow_chain(model: nn.Module, spec: Mapping[str, TensorSpec], examples: Mapping[str, torch.Tensor],
               walks: Mapping[str, tuple[type, str, str]], kv_tokens: int) -> Sequential:
    """vision → prefill → Loop(denoise, num_steps, guide): `walks` maps each of the three names to
    (its `Parts` module class, its inputs, its outputs), space-separated spec names. Prefill writes
    the page pool in place (`kv_pool_out` aliases `kv_pool`); each Euler step reads it and
    carries `x_next` into `x_t`, guided first by the `guide` walk when the caller gives its
    GUIDE_INPUTS (real-time chunking)."""

    def node(name: str) -> GraphNode:
        cls, ins, outs = walks[name]
        aliases = {"kv_pool_out": "kv_pool"} if "kv_pool_out" in outs.split() else {}
        return GraphNode(name, cls(model), tuple(spec[i] for i in ins.split()),
                         tuple(spec[o] for o in outs.split()), {i: examples[i] for i in ins.split()},
                         aliases)

    loop = Loop(body="denoise", count="num_steps", carry={"x_next": "x_t"}, schedule="euler", guide="guide")
    nodes = (*(node(n) for n in ("vision", "prefill", "denoise")), guide_node(spec, examples))
    return Sequential(nodes=nodes, steps=("vision", "prefill", loop), kv_tokens=kv_tokens)


def prefix_inputs(cfg: object, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fake prefix inputs of a VLA config (its num_views, max_prompt_len, vision.image_size,
    llm.vocab): images in [0, 1], camera masks (request 0's last camera off when V > 1), prompts
    of differing lengths (right-padded with id 0)."""
    v, n, s = cfg.num_views, cfg.max_prompt_len, cfg.vision.image_size  # type: ignore[attr-defined]
    image_masks = np.ones((batch, v), dtype=bool)
    if v > 1:
        image_masks[0, -1] = False
    lengths = n - (np.arange(batch) * max(1, n // 3)) % n
    prompt_mask = np.arange(n)[None, :] < lengths[:, None]
    prompt_ids = rng.integers(1, cfg.llm.vocab, (batch, n)) * prompt_mask  # type: ignore[attr-defined]
    return {
        "images": rng.random((batch, v, 3, s, s), dtype=np.float32),
        "image_masks": image_masks,
        "prompt_ids": prompt_ids.astype(np.int64),
        "prompt_mask": prompt_mask,
    }


def example_inputs(cfg: object, spec: Mapping[str, TensorSpec], fake: Mapping[str, np.ndarray],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Tracing inputs with batch = 2: the recipe's `fake` run-time inputs (batch 2; `noise` is
    the start x_t), a random page pool holding two requests' pages (+ 1 spare) with prefix
    lengths that differ, t = 0.7, one Euler dt, image tokens of every camera, random values of
    the spec for the rest. `cfg` has prefix_len, num_steps, num_views and image_tokens (per
    camera)."""
    pages = kv_pages(cfg.prefix_len)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(1)
    pool = spec["kv_pool"]
    pool_shape = [2 * pages + 1 if d == "num_pages" else d for d in pool.shape]
    given = {k: torch.from_numpy(a) for k, a in fake.items()}
    given |= {
        "kv_pool": torch.randn(pool_shape, generator=gen).to(TORCH_POOL_DTYPES[pool.dtype]),
        "kv_scales": torch.ones(spec["kv_scales"].shape),
        "block_table": torch.arange(2 * pages).reshape(2, pages) + 1,
        "prefix_lens": torch.tensor([cfg.prefix_len - 3, cfg.prefix_len // 2]),  # type: ignore[attr-defined]
        "x_t": given.pop("noise"), "t": torch.full((2,), 0.7),
        "dt": torch.full((1,), -1.0 / cfg.num_steps),  # type: ignore[attr-defined]
    }
    gen = torch.Generator().manual_seed(0)
    tokens = cfg.num_views * cfg.image_tokens  # type: ignore[attr-defined]  all cameras: the dim is dynamic
    out = {}
    for name, s in spec.items():
        if name in ("kv_pool_out", "x_next"):
            continue
        shape = tuple(tokens if d == "image_tokens" else 2 if isinstance(d, str) else d for d in s.shape)
        out[name] = (given[name] if name in given else torch.randn(shape, generator=gen)).to(device)
    return out


def prefix_trt_dims(cfg: object) -> dict[str, tuple[int, int, int]]:
    """`Recipe.trt_dims` of a flow VLA whose front compacts its prefix: TensorRT (min, opt, max)
    of 1 camera up to the compiled `num_views`, their `image_tokens` each, 1 prompt token up to
    `max_prompt_len` (opt: a full request)."""
    views, tokens, prompt = cfg.num_views, cfg.image_tokens, cfg.max_prompt_len  # type: ignore[attr-defined]
    return {"views": (1, views, views), "image_tokens": (tokens, views * tokens, views * tokens),
            "prompt_len": (1, prompt, prompt)}


def prefix_kv(layers: Sequence[nn.Module], x: torch.Tensor, pad: torch.Tensor, ar: torch.Tensor,
              table: tuple[torch.Tensor, torch.Tensor], layer_qkv: Callable, layer_finish: Callable
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of a VLM's `layers` over the prefix `x` [B, P, D] (pad, ar: its masks; `table`:
    RoPE at the valid positions), with the block's `layer_qkv` / `layer_finish`: per layer K
    (after RoPE) and V, stacked [L, B, KVH, P, Dh]. The last layer's output is never read, so it
    is not computed."""
    mask = make_attention_mask(pad, ar)[:, None]  # [B, 1, P, P]
    ks, vs = [], []
    for i, layer in enumerate(layers):
        q, k, v = layer_qkv(layer, x, table)
        ks.append(k)
        vs.append(v)
        if i + 1 < len(layers):
            x = layer_finish(layer, x, attend(q, k, v, mask))
    return torch.stack(ks), torch.stack(vs)


def euler(denoise_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
          noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The eager references' sampling loop: from t = 1 (`noise` [B, H, A]) towards 0 in `steps`
    Euler steps, dt = −1/steps, t_k = 1 + k·dt; `denoise_step(x, t [B], dt [1])` gives the next x."""
    dt = -1.0 / steps
    x = noise
    for k in range(steps):
        t = torch.full((x.shape[0],), 1.0 + k * dt, device=x.device)
        x = denoise_step(x, t, torch.tensor([dt], device=x.device))
    return x


def expert_kernel_shapes(cfg: object) -> dict[str, int]:
    """`Recipe.kernel_shapes` of a flow VLA: what the plugin kernels are specialised to when
    compiled ahead of time (the expert's attention over the pages)."""
    expert = cfg.expert  # type: ignore[attr-defined]
    return {"num_heads": expert.heads, "kv_heads": expert.kv_heads, "head_dim": expert.head_dim,
            "page_size": PAGE_SIZE}
