"""SmolVLM's image path: a SigLIP vision tower, then the connector (pixel shuffle, one Linear).

The tower is recipes/blocks/siglip.py's `SiglipVision` (and `SiglipConfig`) as they are:
transformers' SmolVLM (Idefics3) vision transformer has the same modules under the same names
(`embeddings.{patch_embedding,position_embedding}`, `encoder.layers.N.{layer_norm1,self_attn.
{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}`, `post_layernorm`) and the same maths (pre-LN,
tanh-GELU MLP, LayerNorm eps 1e-6). Its NaViT-style bucketed position ids are the identity
0…N−1 for a full square image (no patch padding), which is all SmolVLA feeds it, so the learned
positions add as SigLIP's do.

The connector is transformers' `SmolVLMConnector` (`connector.modality_projection.proj`, no bias):
tower tokens [B, N, D] on a (√N × √N) grid are regrouped into (s × s) blocks, each block one token
of s²·D channels (channel order: row in block, column in block, d), then projected to the text
width. Image tokens per image = (image_size / patch)² / s² (`image_tokens`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from walkforge.errors import WalkforgeError
from walkforge.recipes.blocks.siglip import SiglipConfig

__all__ = ["SmolVLMConnector", "image_tokens", "pixel_shuffle"]


def image_tokens(vision: SiglipConfig, scale_factor: int) -> int:
    """Image tokens per image after the pixel shuffle: (image_size / patch)² / s² (64 at 512 px,
    patch 16, s = 4). A grid the shuffle does not tile is a one-line error."""
    side = vision.image_size // vision.patch
    if vision.image_size % vision.patch or side % scale_factor:
        raise WalkforgeError(f"SmolVLM vision: image_size {vision.image_size} must be a multiple of patch "
                             f"{vision.patch}, and the patch grid side {side} of scale_factor {scale_factor}")
    return (side // scale_factor) ** 2


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, N, D] on a square (√N)² grid → [B, N / s², s²·D]: token (i, j) holds the s × s block of
    grid rows i·s…, columns j·s…, channels ordered (row in block, column in block, d)."""
    b, n, d = x.shape
    side = math.isqrt(n)
    x = x.reshape(b, side // scale, scale, side // scale, scale, d)  # [B, i, r, j, c, D]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, n // scale**2, scale * scale * d)


class ModalityProjection(nn.Module):
    """SmolVLM's `modality_projection`: one Linear `proj`, no bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)


class SmolVLMConnector(nn.Module):
    """Tower tokens [B, N, D_vis] → image tokens [B, N / s², text_width]."""

    def __init__(self, vision_width: int, scale_factor: int, text_width: int) -> None:
        super().__init__()
        self.scale = scale_factor
        self.modality_projection = ModalityProjection(vision_width * scale_factor**2, text_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(pixel_shuffle(x, self.scale))
