"""SmolVLA sizes: `SmolVLAConfig` and its named variants (the published one, a small one, a tiny one).

Where the published sizes were read:
- LeRobot v0.6.1 `configuration_smolvla.py` (smolvla_base's defaults): 16 kept VLM layers, expert
  width ×0.75, `self_attn_every_n_layers` 2, chunk 50, 10 steps, max state/action dim 32,
  tokenizer_max_length 48, 512² images; `smolvlm_with_expert.py`: the expert's MLP width
  `get_intermediate_size(720)` = 2048, its heads, KV heads and head_dim copied from the text model.
  smolvla_base's config.json lists three cameras (observation.images.camera1…3).
- HuggingFaceTB/SmolVLM2-500M-Video-Instruct: `processor_config.json` image_seq_len 64 (its hub
  page); the SmolVLM-500M architecture it shares (vidore/ColSmolVLM-Instruct-500M-base config.json
  on the hub: scale_factor 4, text hidden 960, intermediate 2560, 15 heads, 5 KV heads, head_dim 64);
  vision tower 768 wide, 12 layers, 12 heads, MLP 3072, patch 16, 512 px, vocab 49280, RMS eps 1e-5
  (a model description of SmolVLM2-500M, mintlify.wiki/kvark/meganeura; its scale factor 2
  contradicts the 64 image tokens and is not used). 512/16 = 32 patches a side, /4 → 64 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.llama import LlamaConfig
from walkforge.recipes.blocks.siglip import SiglipConfig
from walkforge.recipes.blocks.smolvlm import image_tokens

# The expert-side modules besides its Llama stack; SmolVLAModel's attribute names and LeRobot's
# `model.<name>.*` keys alike (state_proj is the prefix's state token, at the VLM's width).
ACTION_HEADS = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in",
                "action_time_mlp_out")


@dataclass(frozen=True)
class SmolVLAConfig:
    """SmolVLA sizes. `llm` is the VLM's text model cut to its kept layers; the expert has as many
    layers, the same heads, KV heads and head dim (LeRobot's attention uses the VLM's head counts
    for both, and the cross-attention K/V share the VLM's page pool). Expert layer i is a
    self-attention layer when `self_attn_every_n_layers` > 0 divides i, else a cross-attention
    layer (1: all self-attention, LeRobot's attention_mode "self_attn"; ≤ 0: all cross).
    `vision` is the SigLIP tower (`vision.tokens`: its patches per image); `scale_factor` the
    connector's pixel shuffle (SmolVLM's config's own field)."""

    vision: SiglipConfig
    llm: LlamaConfig
    expert: LlamaConfig
    scale_factor: int = 4
    num_views: int = 3
    max_prompt_len: int = 48
    action_horizon: int = 50
    action_dim: int = 32
    state_dim: int = 32
    num_steps: int = 10
    self_attn_every_n_layers: int = 2

    def __post_init__(self) -> None:
        for field in ("layers", "heads", "kv_heads", "head_dim"):
            if getattr(self.llm, field) != getattr(self.expert, field):
                raise WalkforgeError(f"smolvla: llm.{field} = {getattr(self.llm, field)} but expert."
                                     f"{field} = {getattr(self.expert, field)}; they must match")
        image_tokens(self.vision, self.scale_factor)  # the shuffle tiles the patch grid

    @property
    def image_tokens(self) -> int:
        """Image tokens per camera: the tower's patches / scale_factor² (64 at 512 px)."""
        return image_tokens(self.vision, self.scale_factor)

    @property
    def prefix_len(self) -> int:
        """P = V·image_tokens + max_prompt_len prompt tokens + 1 state token."""
        return self.num_views * self.image_tokens + self.max_prompt_len + 1

    @property
    def suffix_len(self) -> int:
        """S = action_horizon action tokens (the state is in the prefix)."""
        return self.action_horizon

    @property
    def cross_layers(self) -> tuple[int, ...]:
        """The expert layers that cross-attend to the prefix, in order."""
        n = self.self_attn_every_n_layers
        return tuple(i for i in range(self.expert.layers) if n <= 0 or i % n)

    @property
    def pool_layers(self) -> int:
        """Layers of the page pool: the VLM's K/V, then each cross layer's projected K/V."""
        return self.llm.layers + len(self.cross_layers)


def expert_mlp(width: int) -> int:
    """LeRobot's `get_intermediate_size`: ⌊4·⌊2w/3⌋⌋ rounded up to a multiple of 256."""
    return -(-4 * int(2 * width / 3) // 256) * 256


VARIANTS: dict[str, SmolVLAConfig] = {
    "smolvla": SmolVLAConfig(
        vision=SiglipConfig(width=768, layers=12, heads=12, mlp=3072, patch=16, image_size=512),
        llm=LlamaConfig(width=960, layers=16, heads=15, kv_heads=5, head_dim=64, mlp=2560, vocab=49280),
        expert=LlamaConfig(width=720, layers=16, heads=15, kv_heads=5, head_dim=64, mlp=expert_mlp(720)),
    ),
    "small": SmolVLAConfig(
        vision=SiglipConfig(width=192, layers=4, heads=3, mlp=768, patch=16, image_size=256),
        llm=LlamaConfig(width=256, layers=4, heads=4, kv_heads=2, head_dim=64, mlp=640, vocab=49280),
        expert=LlamaConfig(width=192, layers=4, heads=4, kv_heads=2, head_dim=64, mlp=expert_mlp(192)),
        num_views=2,
    ),
    "tiny": SmolVLAConfig(
        vision=SiglipConfig(width=32, layers=2, heads=2, mlp=64, patch=4, image_size=32),
        llm=LlamaConfig(width=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=1000),
        expert=LlamaConfig(width=48, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=96),
        scale_factor=2, num_views=2, max_prompt_len=16,
    ),
}
