"""SigLIP vision tower (no pooling head), shared by PaliGemma-based recipes.

Module names match transformers' `SiglipVisionModel` keys after the `vision_model.` prefix:
`embeddings.{patch_embedding,position_embedding}`, `encoder.layers.N.{layer_norm1,
self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}`, `post_layernorm`.

images [B, 3, H, W] → conv patches + learned positions → pre-LN encoder layers → LayerNorm
→ tokens [B, (H/patch)·(W/patch), width].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SiglipConfig:
    """Sizes of a SigLIP vision tower."""

    width: int
    layers: int
    heads: int
    mlp: int
    patch: int = 14
    image_size: int = 224
    eps: float = 1e-6

    @property
    def tokens(self) -> int:
        """Tokens per image: (image_size / patch)^2 (256 for 224 px, patch 14)."""
        return (self.image_size // self.patch) ** 2


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # [B, N, D]
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        dh = d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, H, N, Dh]
            return t.reshape(b, n, self.heads, dh).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * dh**-0.5, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVision(nn.Module):
    """SigLIP vision tower: images [B, 3, S, S] (already normalised) → tokens [B, N, width]."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(images)))
