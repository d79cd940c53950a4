"""pi0.5 modules: pi0's PaliGemma VLM and prefix pass, a Gemma action expert whose norms are
adaRMS, conditioned on the flow time.

The prefix (images, then the prompt, which also carries the discretised state) goes through
the VLM once, exactly as in pi0 (the prefix methods are PaliGemma's, recipes/blocks/paligemma.py).
Each Euler step runs only the expert over the suffix of action tokens `action_in_proj(x_t)`; time
enters only through
cond = silu(time_mlp_out(silu(time_mlp_in(sinusoid(t))))), which every expert norm turns into
(scale, shift, gate). t = 1 is noise, t = 0 is data.
Read top to bottom: Pi05Model (embed_suffix → denoise_step → sample_actions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from walkforge.recipes.blocks.flow import DenseCache, PagedCache, euler, make_attention_mask, time_embedding
from walkforge.recipes.blocks.gemma import Gemma, layer_finish, layer_qkv, rope
from walkforge.recipes.blocks.paligemma import PaliGemmaPrefix
from walkforge.recipes.blocks.siglip import SiglipVision
from walkforge.recipes.pi05.config import Pi05Config

__all__ = ["DenseCache", "PagedCache", "Pi05Model", "build", "suffix_ar"]


def suffix_ar(horizon: int, device: torch.device | None = None) -> torch.Tensor:
    """The suffix's ar flags [1, 0, …]: the action tokens start one block (the prefix cannot see
    it) and see each other bidirectionally."""
    return torch.arange(horizon, device=device) < 1


class Pi05Model(PaliGemmaPrefix, nn.Module):
    """pi0.5 modules (names follow LeRobot's checkpoint through checkpoint.KEY_MAP). The prefix
    is PaliGemma's, as pi0's (blocks/paligemma.py): images → SigLIP → projector, prompt
    embeddings, one VLM pass whose K/V are the cache (dense, or written into the page pool)."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.expert.width
        self.vision = SiglipVision(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.llm.width)
        self.llm = Gemma(cfg.llm)
        self.expert = Gemma(cfg.expert)
        self.action_in_proj = nn.Linear(cfg.action_dim, d)
        self.action_out_proj = nn.Linear(d, cfg.action_dim)
        self.time_mlp_in = nn.Linear(d, d)
        self.time_mlp_out = nn.Linear(d, d)

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Suffix = one token per action, `action_in_proj(x_t)`, ar flags [1, 0, …].

        Returns tokens [B, H, D_exp], pad mask bool [B, H] (all real), ar mask bool [H] and the
        adaRMS conditioning cond [B, D_exp] = silu(time_mlp_out(silu(time_mlp_in(sinusoid(t))))).
        """
        tokens = self.action_in_proj(x_t)  # [B, H, D]
        emb = time_embedding(t, tokens.shape[-1]).to(tokens.dtype)  # [B, D]
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))
        pad = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, pad, suffix_ar(tokens.shape[1], tokens.device), cond

    def denoise_step(self, x_t: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                     cache: DenseCache | PagedCache) -> torch.Tensor:
        """One Euler step: x_t [B, H, A], t [B], dt [1] → x_t + dt · v(x_t, t), [B, H, A].

        Suffix positions continue after the real prefix tokens: n_valid_prefix + arange(H).
        Every action token sees every real prefix token and every action token.
        """
        x, pad, ar, cond = self.embed_suffix(x_t, t)
        suffix_mask = make_attention_mask(pad[:1], ar)[0]  # [H, H]; the suffix has no padding
        positions = cache.lengths()[:, None] + torch.arange(x.shape[1], device=x.device)
        table = rope(positions, self.cfg.expert.head_dim, self.cfg.expert.rope_base)
        for i, layer in enumerate(self.expert.layers):
            q, k, v = layer_qkv(layer, x, table, cond)
            x = layer_finish(layer, x, cache.attend(i, q, k, v, suffix_mask), cond)
        velocity = self.action_out_proj(self.expert.norm(x, cond))  # the final norm's gate is unused
        return x_t + dt * velocity

    def sample_actions(self, images: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, noise: torch.Tensor, num_steps: int | None = None
                       ) -> torch.Tensor:
        """Eager reference: prefill once, then Euler from t = 1 (noise [B, H, A]) towards 0.

        dt = -1/steps, t_k = 1 + k·dt. Returns actions [B, H, A].
        """
        cache = DenseCache(*self.prefill(self.embed_images(images), image_masks, prompt_ids, prompt_mask))
        steps = num_steps or self.cfg.num_steps
        return euler(lambda x, t, dt: self.denoise_step(x, t, dt, cache), noise, steps)


def build(cfg: Pi05Config) -> Pi05Model:
    """pi0.5 modules with default init; the caller seeds them or loads a checkpoint."""
    return Pi05Model(cfg)
