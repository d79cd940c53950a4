"""pi0: a PaliGemma VLM (SigLIP + Gemma-2B) and a Gemma-300M action expert, flow matching.

A request is three walks:

    vision   images [B, V, 3, 224, 224] in [0, 1]  → image tokens [B, V·256, D_llm]
    prefill  image tokens + prompt                 → per-layer prefix K/V (the KV cache)
    denoise  x_t, t, state + the cache             → x_{t+dt}, run num_steps times (Euler)

The prefix (images, then the prompt) goes through the VLM once. Each Euler step runs only
the expert over the suffix [state token, action tokens]; in every layer the suffix attends
to the cached prefix K/V followed by its own K/V. t = 1 is noise, t = 0 is data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import GraphNode, Loop, Sequential, TensorSpec
from walkforge.plugins import kv_cache_write, paged_attention  # noqa: F401  registers torch.ops.walkforge
from walkforge.plugins.constants import PAGE_SIZE
from walkforge.recipes.blocks.gemma import Gemma, GemmaConfig, attend, layer_finish, layer_qkv, rope
from walkforge.recipes.blocks.siglip import SiglipConfig, SiglipVision
from walkforge.recipes.weights import KeyMap

NAME = "pi0"
TORCH_POOL_DTYPES = {"float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Pi0Config:
    """pi0 sizes. `num_views` is the compiled camera count; the VLM and expert share depth,
    KV heads and head dim (the expert attends to the VLM's K/V)."""

    vision: SiglipConfig
    llm: GemmaConfig
    expert: GemmaConfig
    num_views: int = 3
    max_prompt_len: int = 48
    action_horizon: int = 50
    action_dim: int = 32
    state_dim: int = 32
    num_steps: int = 10

    def __post_init__(self) -> None:
        for field in ("layers", "kv_heads", "head_dim"):
            if getattr(self.llm, field) != getattr(self.expert, field):
                raise WalkforgeError(f"pi0: llm.{field} = {getattr(self.llm, field)} but expert."
                                     f"{field} = {getattr(self.expert, field)}; they must match")

    @property
    def prefix_len(self) -> int:
        """P = V·256 image tokens + max_prompt_len prompt tokens."""
        return self.num_views * self.vision.tokens + self.max_prompt_len

    @property
    def suffix_len(self) -> int:
        """S = 1 state token + action_horizon action tokens."""
        return 1 + self.action_horizon


Config = Pi0Config

VARIANTS: dict[str, Pi0Config] = {
    "pi0": Pi0Config(
        vision=SiglipConfig(width=1152, layers=27, heads=16, mlp=4304),
        llm=GemmaConfig(width=2048, layers=18, heads=8, kv_heads=1, head_dim=256, mlp=16384, vocab=257152),
        expert=GemmaConfig(width=1024, layers=18, heads=8, kv_heads=1, head_dim=256, mlp=4096),
    ),
    "small": Pi0Config(
        vision=SiglipConfig(width=384, layers=6, heads=6, mlp=1536),
        llm=GemmaConfig(width=1024, layers=6, heads=8, kv_heads=1, head_dim=128, mlp=4096, vocab=32000),
        expert=GemmaConfig(width=512, layers=6, heads=8, kv_heads=1, head_dim=128, mlp=2048),
        num_views=2,
    ),
    "tiny": Pi0Config(
        vision=SiglipConfig(width=32, layers=2, heads=2, mlp=64),
        llm=GemmaConfig(width=64, layers=2, heads=2, kv_heads=1, head_dim=16, mlp=128, vocab=1000),
        expert=GemmaConfig(width=32, layers=2, heads=2, kv_heads=1, head_dim=16, mlp=64),
        num_views=2, max_prompt_len=16,
    ),
}


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


class Pi0Model(nn.Module):
    """pi0 modules (names follow LeRobot's checkpoint through KEY_MAP) and its three walks."""

    def __init__(self, cfg: Pi0Config) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.expert.width
        self.vision = SiglipVision(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.llm.width)
        self.llm = Gemma(cfg.llm)
        self.expert = Gemma(cfg.expert)
        self.state_proj = nn.Linear(cfg.state_dim, d)
        self.action_in_proj = nn.Linear(cfg.action_dim, d)
        self.action_out_proj = nn.Linear(d, cfg.action_dim)
        self.action_time_mlp_in = nn.Linear(2 * d, d)
        self.action_time_mlp_out = nn.Linear(d, d)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, V, 3, 224, 224] in [0, 1] → unscaled image tokens [B, V·256, D_llm]."""
        x = images.reshape(-1, *images.shape[2:]) * 2.0 - 1.0  # [B·V, 3, 224, 224] in [-1, 1]
        tokens = self.projector(self.vision(x))  # [B·V, 256, D_llm]
        return tokens.reshape(images.shape[0], -1, tokens.shape[-1])

    def embed_prefix(self, image_tokens: torch.Tensor, image_masks: torch.Tensor,
                     prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix = [256 tokens per camera] ++ [prompt], all ar flags 0 (bidirectional).

        Returns tokens [B, P, D_llm], pad mask bool [B, P] (each camera's mask repeated 256
        times, then the prompt mask), ar mask bool [P].
        """
        n = self.cfg.vision.tokens
        image_pad = image_masks[:, :, None].expand(-1, -1, n).reshape(image_masks.shape[0], -1)
        tokens = torch.cat([image_tokens, self.llm.embed(prompt_ids)], dim=1)
        pad = torch.cat([image_pad, prompt_mask], dim=1)
        return tokens, pad, torch.zeros(pad.shape[1], dtype=torch.bool, device=pad.device)

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Suffix = [state token, one token per action], ar flags [1, 1, 0, …].

        The state token starts a block (the prefix cannot see it), the actions start another
        (the state cannot see them; they see the state and each other). Each action token is
        mlp_out(silu(mlp_in([action_in_proj(x_t), time_embedding(t)]))).
        Returns tokens [B, S, D_exp], pad mask bool [B, S] (all real), ar mask bool [S].
        """
        actions = self.action_in_proj(x_t)  # [B, H, D]
        emb = time_embedding(t, actions.shape[-1]).to(actions.dtype)
        emb = emb[:, None, :].expand(-1, actions.shape[1], -1)
        actions = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, emb], -1))))
        tokens = torch.cat([self.state_proj(state)[:, None, :], actions], dim=1)
        pad = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ar = torch.arange(tokens.shape[1], device=tokens.device) < 2
        return tokens, pad, ar

    make_attention_mask = staticmethod(make_attention_mask)

    def prefill(self, image_tokens: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the VLM over the prefix once; return its KV cache.

        prefix_k/v: [layers, B, KVH, P, Dh] (K after RoPE), prefix_mask: bool [B, P].
        Positions count real tokens only: cumsum(pad) - 1.
        """
        x, pad, ar = self.embed_prefix(image_tokens, image_masks, prompt_ids, prompt_mask)
        mask = make_attention_mask(pad, ar)[:, None]  # [B, 1, P, P]
        table = rope(torch.cumsum(pad.long(), dim=-1) - 1, self.cfg.llm.head_dim, self.cfg.llm.rope_base)
        ks, vs = [], []
        for i, layer in enumerate(self.llm.layers):
            q, k, v = layer_qkv(layer, x, table)
            ks.append(k)
            vs.append(v)
            if i + 1 < len(self.llm.layers):  # the last layer's output is never read
                x = layer_finish(layer, x, attend(q, k, v, mask))
        return torch.stack(ks), torch.stack(vs), pad

    def denoise_step(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, state: torch.Tensor,
                     cache: DenseCache | PagedCache) -> torch.Tensor:
        """One Euler step: x_t [B, H, A], t [B], dt [1] → x_t + dt · v(x_t, t), [B, H, A].

        Suffix positions continue after the real prefix tokens: n_valid_prefix + arange(S).
        Every real suffix token sees every real prefix token (its ar cumsum is ≥ 1 > 0); among
        themselves the suffix tokens follow `make_attention_mask`.
        """
        x, pad, ar = self.embed_suffix(state, x_t, t)
        suffix_mask = make_attention_mask(pad[:1], ar)[0]  # [S, S]; the suffix has no padding
        positions = cache.lengths()[:, None] + torch.arange(x.shape[1], device=x.device)
        table = rope(positions, self.cfg.expert.head_dim, self.cfg.expert.rope_base)
        for i, layer in enumerate(self.expert.layers):
            q, k, v = layer_qkv(layer, x, table)
            x = layer_finish(layer, x, cache.attend(i, q, k, v, suffix_mask))
        velocity = self.action_out_proj(self.expert.norm(x)[:, -self.cfg.action_horizon:])
        return x_t + dt * velocity

    def prefill_paged(self, image_tokens: torch.Tensor, image_masks: torch.Tensor,
                      prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, kv_pool: torch.Tensor,
                      block_table: torch.Tensor, kv_scales: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill, writing the valid tokens' K/V compactly into the page pool (KVCacheWrite; an
        fp8 pool stores them quantised with kv_scales [L, 2]).

        Returns (the updated pool — the runtime binds it to the same buffer — and lengths [B]).
        """
        k, v, pad = self.prefill(image_tokens, image_masks, prompt_ids, prompt_mask)
        positions = torch.where(pad, torch.cumsum(pad.long(), dim=-1) - 1, -1)  # [B, P]; -1 = skip
        pool = torch.ops.walkforge.kv_cache_write(kv_pool, k, v, block_table, positions, kv_scales)
        return pool, pad.long().sum(-1)

    def sample_actions(self, images: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, state: torch.Tensor, noise: torch.Tensor,
                       num_steps: int | None = None) -> torch.Tensor:
        """Eager reference: prefill once, then Euler from t = 1 (noise [B, H, A]) towards 0.

        dt = -1/steps, t_k = 1 + k·dt. Returns actions [B, H, A].
        """
        steps = num_steps or self.cfg.num_steps
        cache = self.prefill(self.embed_images(images), image_masks, prompt_ids, prompt_mask)
        dt = -1.0 / steps
        x = noise
        for k in range(steps):
            t = torch.full((x.shape[0],), 1.0 + k * dt, device=x.device)
            x = self.denoise_step(x, t, torch.tensor([dt], device=x.device), state, DenseCache(*cache))
        return x


def build(cfg: Pi0Config) -> Pi0Model:
    """pi0 modules with default init; the caller seeds them or loads a checkpoint."""
    return Pi0Model(cfg)


# --- weights -----------------------------------------------------------------------------

_PG = "model.paligemma_with_expert."
_VIS = _PG + "paligemma.model.vision_tower.vision_model."
_LLM = _PG + "paligemma.model.language_model."
_EXP = _PG + "gemma_expert.model."
_HEADS = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out")

KEY_MAP = KeyMap(
    prefixes=(
        (_VIS, "vision."),
        (_PG + "paligemma.model.multi_modal_projector.linear.", "projector."),
        (_LLM, "llm."),
        (_EXP, "expert."),
        *((f"model.{h}.", f"{h}.") for h in _HEADS),
    ),
    ignore=(r"(^|\.)lm_head\.weight$",),  # the VLM's and the expert's lm_heads never make actions
)


def read_checkpoint(folder: Path) -> tuple[Pi0Config, dict[str, torch.Tensor]]:
    """A LeRobot pi0 policy folder (config.json + model.safetensors): its config (sizes inferred
    from tensor shapes, see recipes/lerobot_pi0.py) and its tensors, for `load_strict` + KEY_MAP."""
    from walkforge.recipes.lerobot_pi0 import read_checkpoint as read

    return read(folder)


# --- walks and inputs --------------------------------------------------------------------

def fake_inputs(cfg: Pi0Config, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid run-time inputs (Pi0Policy's, `noise` = the initial x_t). Request 0's last camera
    is masked off (when V > 1) and prompt lengths differ per request (right-padded with id 0)."""
    rng = np.random.default_rng(seed)
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
        "state": rng.uniform(-1, 1, (batch, cfg.state_dim)).astype(np.float32),
        "noise": rng.standard_normal((batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32),
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
    parts = ("expert", *_HEADS)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, state: torch.Tensor,
                kv_pool: torch.Tensor, block_table: torch.Tensor, prefix_lens: torch.Tensor,
                kv_scales: torch.Tensor) -> torch.Tensor:
        return self.denoise_step(x_t, t, dt, state, PagedCache(kv_pool, block_table, prefix_lens, kv_scales))


def walks(model: Pi0Model, cfg: Pi0Config, kv_dtype: str = "float32") -> Sequential:
    """vision → prefill → Loop(denoise, num_steps): contracts with a dynamic "batch".

    `kv_dtype` is the page pool's: "float32" or "float8_e4m3fn" (stored with the per-layer
    `kv_scales` [L, 2] that prefill and denoise take; a float32 pool ignores them).
    """
    b, v, s = "batch", cfg.num_views, cfg.vision.image_size
    pool = (cfg.llm.layers, 2, "num_pages", PAGE_SIZE, cfg.llm.kv_heads, cfg.llm.head_dim)
    spec = {x.name: x for x in (
        TensorSpec("images", "float32", (b, v, 3, s, s)),
        TensorSpec("image_tokens", "float32", (b, v * cfg.vision.tokens, cfg.llm.width)),
        TensorSpec("image_masks", "bool", (b, v)),
        TensorSpec("prompt_ids", "int64", (b, cfg.max_prompt_len)),
        TensorSpec("prompt_mask", "bool", (b, cfg.max_prompt_len)),
        TensorSpec("kv_pool", kv_dtype, pool), TensorSpec("kv_pool_out", kv_dtype, pool),
        TensorSpec("kv_scales", "float32", (cfg.llm.layers, 2)),
        TensorSpec("block_table", "int64", (b, "max_pages")), TensorSpec("prefix_lens", "int64", (b,)),
        TensorSpec("x_t", "float32", (b, cfg.action_horizon, cfg.action_dim)),
        TensorSpec("t", "float32", (b,)), TensorSpec("dt", "float32", (1,)),
        TensorSpec("state", "float32", (b, cfg.state_dim)),
        TensorSpec("x_next", "float32", (b, cfg.action_horizon, cfg.action_dim)),
    )}
    examples = _example_inputs(cfg, spec, next(model.parameters()).device)

    def node(name: str, walk: type[_Walk], ins: str, outs: str, aliases: dict | None = None) -> GraphNode:
        return GraphNode(name, walk(model), tuple(spec[i] for i in ins.split()),
                         tuple(spec[o] for o in outs.split()), {i: examples[i] for i in ins.split()},
                         aliases or {})

    nodes = (
        node("vision", VisionWalk, "images", "image_tokens"),
        node("prefill", PrefillWalk,
             "image_tokens image_masks prompt_ids prompt_mask kv_pool block_table kv_scales",
             "kv_pool_out prefix_lens", aliases={"kv_pool_out": "kv_pool"}),
        node("denoise", DenoiseWalk, "x_t t dt state kv_pool block_table prefix_lens kv_scales", "x_next"),
    )
    loop = Loop(body="denoise", count="num_steps", carry={"x_next": "x_t"}, schedule="euler")
    return Sequential(nodes=nodes, steps=("vision", "prefill", loop))


def _example_inputs(cfg: Pi0Config, spec: dict[str, TensorSpec], device: torch.device
                    ) -> dict[str, torch.Tensor]:
    """Tracing inputs with batch = 2: fake_inputs where they exist, random of the spec else."""
    given = {k: torch.from_numpy(a) for k, a in fake_inputs(cfg, batch=2).items()}
    pages = math.ceil(cfg.prefix_len / PAGE_SIZE)  # per request; 2 requests + 1 spare page
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
    out = {}
    for name, s in spec.items():
        if name == "kv_pool_out":
            continue
        shape = tuple(2 if isinstance(d, str) else d for d in s.shape)
        out[name] = (given[name] if name in given else torch.randn(shape, generator=gen)).to(device)
    return out


def kernel_shapes(cfg: Pi0Config) -> dict[str, int]:
    """What the plugin kernels are specialised to when compiled ahead of time (denoise attention)."""
    return {"num_heads": cfg.expert.heads, "kv_heads": cfg.expert.kv_heads,
            "head_dim": cfg.expert.head_dim, "page_size": PAGE_SIZE}
