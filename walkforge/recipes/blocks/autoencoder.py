"""AutoencoderKL decoder (Stable Diffusion / SDXL / FLUX VAE) in plain torch.

Attribute names follow the diffusers state-dict layout (`decoder.up_blocks.0.resnets.0.norm1`,
`decoder.mid_block.attentions.0.to_q`, `post_quant_conv`), so a diffusers checkpoint loads
through an identity key map. Every norm is GroupNorm with eps 1e-6 and every activation is
SiLU, as in diffusers' `Decoder`. No branch depends on tensor values, so the model exports
with dynamic batch, height and width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6  # diffusers' Decoder passes resnet_eps=1e-6 to every GroupNorm


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv3x3 → norm → SiLU → conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H·W positions, with a residual connection.

    diffusers builds this with heads = channels // attention_head_dim and
    attention_head_dim = channels, i.e. one head of width C, scale C**-0.5.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, H·W, C]
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, H·W, C]; ONNX export wants 4D
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return out + x


class MidBlock(nn.Module):
    """resnet → (attention) → resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    """`num_layers` resnets, then an optional 2x upsample (diffusers' UpDecoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
             for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Decoder(nn.Module):
    """conv_in → mid block → up blocks (widest first) → GroupNorm → SiLU → conv_out."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, groups: int, mid_attention: bool) -> None:
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, mid_attention)
        self.up_blocks = nn.ModuleList(
            [UpBlock(widths[max(i - 1, 0)], width, layers_per_block + 1, groups,
                     add_upsample=i < len(widths) - 1)
             for i, width in enumerate(widths)]
        )
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKLDecoder(nn.Module):
    """`forward(latents) -> sample`, equal to diffusers' `AutoencoderKL.decode(latents).sample`.

    Latents are taken as-is: scaling/shift factors are the caller's business. Output spatial
    size is the input's times 2**(len(block_out_channels) - 1).
    """

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, norm_num_groups: int, mid_attention: bool = True,
                 post_quant_conv: bool = True) -> None:
        super().__init__()
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if post_quant_conv else None
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                               norm_num_groups, mid_attention)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # latents: [B, latent_channels, h, w] -> sample: [B, out_channels, h·f, w·f]
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return self.decoder(z)
