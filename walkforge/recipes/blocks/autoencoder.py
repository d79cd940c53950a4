"""AutoencoderKL decoder and encoder (Stable Diffusion / SDXL / FLUX / SD3 VAE) in plain torch.

Attribute names follow the diffusers state-dict layout (`decoder.up_blocks.0.resnets.0.norm1`,
`decoder.mid_block.attentions.0.to_q`, `post_quant_conv`, `encoder.down_blocks.0.downsamplers.0.conv`,
`quant_conv`), so a diffusers checkpoint loads through an identity key map. Every norm is
GroupNorm with eps 1e-6 and every activation is SiLU, as in diffusers' `Decoder` and `Encoder`.
No branch depends on tensor values, so the model exports with dynamic batch, height and width.
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


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 conv with stride 2 (diffusers' padding=0 path)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetStage(nn.Module):
    """`num_layers` resnets, then an optional 2x resample (SAMPLER, kept under the SAMPLERS name)."""

    SAMPLERS: str
    SAMPLER: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 resample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
             for i in range(num_layers)]
        )
        self.add_module(self.SAMPLERS, nn.ModuleList([self.SAMPLER(out_channels)] if resample else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in getattr(self, self.SAMPLERS):
            x = sampler(x)
        return x


class UpBlock(ResnetStage):
    """diffusers' UpDecoderBlock2D."""

    SAMPLERS, SAMPLER = "upsamplers", Upsample


class DownBlock(ResnetStage):
    """diffusers' DownEncoderBlock2D."""

    SAMPLERS, SAMPLER = "downsamplers", Downsample


class Encoder(nn.Module):
    """conv_in → down blocks (narrowest first) → mid block → GroupNorm → SiLU → conv_out to the
    2·latent_channels moments (mean, log-variance)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, groups: int, mid_attention: bool) -> None:
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(widths[max(i - 1, 0)], width, layers_per_block, groups,
                       resample=i < len(widths) - 1)
             for i, width in enumerate(widths)]
        )
        self.mid_block = MidBlock(widths[-1], groups, mid_attention)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


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
                     resample=i < len(widths) - 1)
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


class AutoencoderKL(AutoencoderKLDecoder):
    """The decoder plus, with `encoder=True`, diffusers' encoder half (images in = out_channels,
    quant_conv where post_quant_conv is): `encode(images)` gives the latent distribution's
    (mean, std) as `AutoencoderKL.encode(images).latent_dist` has them.

    A decoder-only instance grows the encoder when it is handed a state dict that has one (how
    the torch backend rebuilds a bundle compiled with the encode walk from its weights alone).
    """

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, norm_num_groups: int, mid_attention: bool = True,
                 post_quant_conv: bool = True, encoder: bool = False) -> None:
        super().__init__(latent_channels, out_channels, block_out_channels, layers_per_block,
                         norm_num_groups, mid_attention, post_quant_conv)
        self._encoder_sizes = (out_channels, latent_channels, tuple(block_out_channels), layers_per_block,
                               norm_num_groups, mid_attention)
        self.encoder = self.quant_conv = None
        if encoder:
            self.add_encoder()
        self.register_load_state_dict_pre_hook(_grow_encoder)

    def add_encoder(self) -> None:
        self.encoder = Encoder(*self._encoder_sizes)
        if self.post_quant_conv is not None:  # diffusers' checkpoints pair quant_conv with post_quant_conv
            latent = 2 * self._encoder_sizes[1]
            self.quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # images: [B, 3, H, W] in [-1, 1] -> mean, std: [B, latent_channels, H/f, W/f]
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        half = self.encoder.conv_out.out_channels // 2  # slices, not chunk: no ONNX sequence ops
        mean, logvar = moments[:, :half], moments[:, half:]
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution


def _grow_encoder(module: AutoencoderKL, state_dict, prefix: str, *_args) -> None:
    if module.encoder is None and any(k.startswith(prefix + "encoder.") for k in state_dict):
        module.add_encoder()
