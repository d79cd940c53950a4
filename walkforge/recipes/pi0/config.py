"""pi0 sizes: `Pi0Config` and its named variants (the real pi0, a small one, a tiny one)."""

from __future__ import annotations

from dataclasses import dataclass

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.gemma import GemmaConfig
from walkforge.recipes.blocks.siglip import SiglipConfig

# The expert-side modules besides its Gemma stack; Pi0Model's attribute names and LeRobot's
# `model.<name>.*` keys alike.
ACTION_HEADS = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in",
                "action_time_mlp_out")


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
    def image_tokens(self) -> int:
        """Image tokens per camera: SigLIP's patches (256 at 224 px)."""
        return self.vision.tokens

    @property
    def prefix_len(self) -> int:
        """P = V·256 image tokens + max_prompt_len prompt tokens."""
        return self.num_views * self.image_tokens + self.max_prompt_len

    @property
    def suffix_len(self) -> int:
        """S = 1 state token + action_horizon action tokens."""
        return 1 + self.action_horizon


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
