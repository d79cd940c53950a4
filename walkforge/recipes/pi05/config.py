"""pi0.5 sizes: `Pi05Config` and its named variants (the real pi0.5, a small one, a tiny one).

The blocks are pi0's; the expert's norms are adaRMS, conditioned on the flow time
(`expert.cond_dim` = the expert width), and the model takes no state tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.gemma import GemmaConfig
from walkforge.recipes.blocks.siglip import SiglipConfig

# The expert-side modules besides its Gemma stack; Pi05Model's attribute names and LeRobot's
# `model.<name>.*` keys alike.
ACTION_HEADS = ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out")


@dataclass(frozen=True)
class Pi05Config:
    """pi0.5 sizes. `num_views` is the compiled camera count; the VLM and expert share depth,
    KV heads and head dim (the expert attends to the VLM's K/V); the expert's adaRMS norms are
    conditioned on a time vector of the expert's width."""

    vision: SiglipConfig
    llm: GemmaConfig
    expert: GemmaConfig
    num_views: int = 3
    max_prompt_len: int = 200
    action_horizon: int = 50
    action_dim: int = 32
    num_steps: int = 10

    def __post_init__(self) -> None:
        for field in ("layers", "kv_heads", "head_dim"):
            if getattr(self.llm, field) != getattr(self.expert, field):
                raise WalkforgeError(f"pi05: llm.{field} = {getattr(self.llm, field)} but expert."
                                     f"{field} = {getattr(self.expert, field)}; they must match")
        if self.expert.cond_dim != self.expert.width or self.llm.cond_dim:
            raise WalkforgeError(f"pi05: expert.cond_dim must be the expert width {self.expert.width} "
                                 f"and llm.cond_dim 0, got {self.expert.cond_dim} and {self.llm.cond_dim}")

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
        """S = action_horizon action tokens (no state token)."""
        return self.action_horizon


def _adarms(expert: GemmaConfig) -> GemmaConfig:
    return replace(expert, cond_dim=expert.width)


VARIANTS: dict[str, Pi05Config] = {
    "pi05": Pi05Config(
        vision=SiglipConfig(width=1152, layers=27, heads=16, mlp=4304),
        llm=GemmaConfig(width=2048, layers=18, heads=8, kv_heads=1, head_dim=256, mlp=16384, vocab=257152),
        expert=_adarms(GemmaConfig(width=1024, layers=18, heads=8, kv_heads=1, head_dim=256, mlp=4096)),
    ),
    "small": Pi05Config(
        vision=SiglipConfig(width=384, layers=6, heads=6, mlp=1536),
        llm=GemmaConfig(width=1024, layers=6, heads=8, kv_heads=1, head_dim=128, mlp=4096, vocab=32000),
        expert=_adarms(GemmaConfig(width=512, layers=6, heads=8, kv_heads=1, head_dim=128, mlp=2048)),
        num_views=2,
    ),
    "tiny": Pi05Config(
        vision=SiglipConfig(width=32, layers=2, heads=2, mlp=64),
        llm=GemmaConfig(width=64, layers=2, heads=2, kv_heads=1, head_dim=16, mlp=128, vocab=1000),
        expert=_adarms(GemmaConfig(width=32, layers=2, heads=2, kv_heads=1, head_dim=16, mlp=64)),
        num_views=2, max_prompt_len=24,
    ),
}
