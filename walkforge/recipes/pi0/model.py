"""pi0 modules: a PaliGemma VLM (SigLIP + Gemma-2B) and a Gemma-300M action expert, flow matching.

The prefix (images, then the prompt) goes through the VLM once. Each Euler step runs only
the expert over the suffix [state token, action tokens]; in every layer the suffix attends
to the cached prefix K/V followed by its own K/V. t = 1 is noise, t = 0 is data.
The masks, caches and time embedding are every flow VLA's (recipes/blocks/flow.py), the prefix
PaliGemma's (recipes/blocks/paligemma.py). Read top to bottom: Pi0Model (embed_suffix →
denoise_step → sample_actions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from walkforge.recipes.blocks.flow import DenseCache, PagedCache, euler, make_attention_mask, time_embedding
from walkforge.recipes.blocks.gemma import Gemma, layer_finish, layer_qkv, rope
from walkforge.recipes.blocks.paligemma import PaliGemmaPrefix
from walkforge.recipes.blocks.siglip import SiglipVision
from walkforge.recipes.pi0.config import Pi0Config


class Pi0Model(PaliGemmaPrefix, nn.Module):
    """pi0 modules (names follow LeRobot's checkpoint through checkpoint.KEY_MAP); the prefix
    methods (embed_images, embed_prefix, prefill, prefill_paged) are PaliGemma's (blocks/paligemma.py)."""

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

    def sample_actions(self, images: torch.Tensor, image_masks: torch.Tensor, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, state: torch.Tensor, noise: torch.Tensor,
                       num_steps: int | None = None) -> torch.Tensor:
        """Eager reference: prefill once, then Euler from t = 1 (noise [B, H, A]) towards 0.

        dt = -1/steps, t_k = 1 + k·dt. Returns actions [B, H, A].
        """
        cache = DenseCache(*self.prefill(self.embed_images(images), image_masks, prompt_ids, prompt_mask))
        return euler(lambda x, t, dt: self.denoise_step(x, t, dt, state, cache), noise,
                     num_steps or self.cfg.num_steps)


def build(cfg: Pi0Config) -> Pi0Model:
    """pi0 modules with default init; the caller seeds them or loads a checkpoint."""
    return Pi0Model(cfg)
