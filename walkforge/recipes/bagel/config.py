"""BAGEL sizes: `BagelConfig` and its named variants (the 7B-MoT, a small one, a tiny one)."""

from __future__ import annotations

from dataclasses import dataclass

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.qwen2 import Qwen2Config

LATENT_PATCH = 2  # one latent token = 2×2 latent pixels (BAGEL's latent_patch_size)
TIME_FREQS = 256  # time_embedder's sinusoid width
# The generation-side modules besides the LLM: Bagel's attribute names and checkpoint keys alike.
GEN_HEADS = ("time_embedder", "vae2llm", "llm2vae", "latent_pos_embed")


@dataclass(frozen=True)
class SpecialTokens:
    """The four token ids BAGEL wraps prompts and images with (Qwen2.5's by default)."""

    bos: int = 151644  # <|im_start|>
    eos: int = 151645  # <|im_end|>
    start_of_image: int = 151652  # <|vision_start|>
    end_of_image: int = 151653  # <|vision_end|>

    def ids(self) -> tuple[int, int, int, int]:
        return (self.bos, self.eos, self.start_of_image, self.end_of_image)


@dataclass(frozen=True)
class BagelConfig:
    """Sizes of BAGEL's text-to-image path: the MoT LLM, the generation heads, the FLUX decoder.

    `max_latent_size`: the latent position table's side (images up to 16·max_latent_size pixels
    for an 8× VAE); `max_prompt_len`: prompt tokens a bundle takes (the wrappers not counted).
    """

    llm: Qwen2Config
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)  # diffusers block_out_channels = BFL ch·ch_mult
    vae_blocks: int = 2  # BFL num_res_blocks (diffusers layers_per_block)
    vae_latent_channels: int = 16
    vae_groups: int = 32
    vae_scale: float = 0.3611
    vae_shift: float = 0.1159
    max_latent_size: int = 64
    max_prompt_len: int = 64
    special_tokens: SpecialTokens = SpecialTokens()

    def __post_init__(self) -> None:
        object.__setattr__(self, "vae_channels", tuple(self.vae_channels))
        if not self.llm.moe_gen or not self.llm.vocab:
            raise WalkforgeError("bagel: the LLM needs its gen expert (moe_gen) and a vocabulary")
        if self.llm.width % 4:
            raise WalkforgeError(
                f"bagel: llm.width {self.llm.width} must be a multiple of 4 "
                "(the 2-D sin-cos latent position table)"
            )
        if self.llm.heads % self.llm.kv_heads:
            raise WalkforgeError(
                f"bagel: {self.llm.heads} heads do not group over {self.llm.kv_heads} KV heads"
            )
        if any(c % self.vae_groups for c in self.vae_channels) or not self.vae_channels:
            raise WalkforgeError(
                f"bagel: vae_channels {list(self.vae_channels)} must divide by vae_groups={self.vae_groups}"
            )
        bad = [t for t in self.special_tokens.ids() if not 0 <= t < self.llm.vocab]
        if bad:
            raise WalkforgeError(
                f"bagel: special token ids {bad} lie outside the vocabulary of {self.llm.vocab}"
            )
        if self.max_latent_size < 1 or self.max_prompt_len < 1:
            raise WalkforgeError("bagel: max_latent_size and max_prompt_len must be ≥ 1")

    @property
    def latent_dim(self) -> int:
        """Values per latent token: 2·2 latent pixels × latent channels (64)."""
        return LATENT_PATCH * LATENT_PATCH * self.vae_latent_channels

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per latent token along each axis: 2 × the VAE's upscale (16)."""
        return LATENT_PATCH * 2 ** (len(self.vae_channels) - 1)

    @property
    def context_len(self) -> int:
        """Most context tokens one request caches: [<|im_start|>] + prompt + [<|im_end|>]."""
        return self.max_prompt_len + 2


VARIANTS: dict[str, BagelConfig] = {
    "bagel": BagelConfig(
        llm=Qwen2Config(
            width=3584, layers=28, heads=28, kv_heads=4, head_dim=128, mlp=18944, vocab=152064, rope_base=1e6
        ),
    ),
    "small": BagelConfig(  # ≈ 0.33 B: 12 MoT layers of 2 × 11 M, a 32 k vocabulary, the FLUX decoder
        llm=Qwen2Config(width=1024, layers=12, heads=16, kv_heads=4, head_dim=64, mlp=2816, vocab=32000),
        max_latent_size=32,
        special_tokens=SpecialTokens(31996, 31997, 31998, 31999),
    ),
    "tiny": BagelConfig(
        llm=Qwen2Config(width=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=1000),
        vae_channels=(16, 16, 32, 32),
        vae_blocks=1,
        vae_groups=8,
        max_latent_size=8,
        max_prompt_len=12,
        special_tokens=SpecialTokens(996, 997, 998, 999),
    ),
}
