"""VAE decoder recipe: diffusers AutoencoderKL latents → pixels, one walk (`decode`).

Covers the SD-1.5/SDXL VAE (4 latent channels, post_quant_conv) and the FLUX VAE (16 latent
channels, none). Latents go in unscaled: applying `scaling_factor`/`shift_factor` is the
caller's job. Native checkpoints are diffusers folders (`config.json` +
`diffusion_pytorch_model.safetensors`); the encoder half is read and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import GraphNode, Sequential, TensorSpec
from walkforge.recipes.blocks.autoencoder import AutoencoderKLDecoder
from walkforge.recipes.weights import KeyMap, read_safetensors

NAME = "vae"


@dataclass(frozen=True)
class VaeConfig:
    """Decoder shape. The activation is always SiLU and every block is UpDecoderBlock2D."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        sizes = (self.layers_per_block, self.latent_channels, self.out_channels, self.norm_num_groups,
                 *self.block_out_channels)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise WalkforgeError(f"VaeConfig: sizes must be positive integers, got {self}")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise WalkforgeError(
                f"VaeConfig: block_out_channels {list(self.block_out_channels)} must be non-empty "
                f"and divisible by norm_num_groups={self.norm_num_groups}"
            )

    @property
    def upscale(self) -> int:
        """Pixels per latent along each spatial axis."""
        return 2 ** (len(self.block_out_channels) - 1)


Config = VaeConfig

VARIANTS: dict[str, VaeConfig] = {
    "sd": VaeConfig(),
    "flux": VaeConfig(latent_channels=16, use_post_quant_conv=False),
    "tiny": VaeConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
}

KEY_MAP = KeyMap(
    prefixes=(("decoder.", "decoder."), ("post_quant_conv.", "post_quant_conv.")),
    ignore=(r"^encoder\.", r"^quant_conv\."),
)

# config.json keys that only concern the encoder, scaling or bookkeeping.
_UNUSED_KEYS = {
    "_class_name", "_diffusers_version", "_name_or_path", "in_channels", "down_block_types",
    "sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
    "force_upcast", "use_quant_conv",
}
# diffusers' AutoencoderKL defaults, used where an (older) config.json omits a key.
_DIFFUSERS_DEFAULTS = {
    "block_out_channels": (64,), "layers_per_block": 1, "latent_channels": 4, "out_channels": 3,
    "norm_num_groups": 32, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


def build(cfg: VaeConfig) -> nn.Module:
    """The decoder (with post_quant_conv when configured); forward(latents) -> sample."""
    return AutoencoderKLDecoder(
        latent_channels=cfg.latent_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        mid_attention=cfg.mid_block_add_attention,
        post_quant_conv=cfg.use_post_quant_conv,
    )


def config_from_diffusers(data: dict[str, Any], where: str = "config.json") -> VaeConfig:
    """Map a diffusers AutoencoderKL config dict to a VaeConfig; refuse what we cannot build."""
    cls = data.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise WalkforgeError(f"{where}: _class_name is '{cls}', only AutoencoderKL is supported")
    if data.get("act_fn", "silu") != "silu":
        raise WalkforgeError(f"{where}: act_fn '{data['act_fn']}' is not supported (only silu)")
    fields = {k: data.get(k, default) for k, default in _DIFFUSERS_DEFAULTS.items()}
    up = data.get("up_block_types", ["UpDecoderBlock2D"] * len(fields["block_out_channels"]))
    if list(up) != ["UpDecoderBlock2D"] * len(fields["block_out_channels"]):
        raise WalkforgeError(
            f"{where}: up_block_types {list(up)} not supported; expected one UpDecoderBlock2D "
            f"per block_out_channels entry ({len(fields['block_out_channels'])})"
        )
    unknown = sorted(set(data) - set(_DIFFUSERS_DEFAULTS) - _UNUSED_KEYS - {"act_fn", "up_block_types"})
    if unknown:
        raise WalkforgeError(f"{where}: unsupported AutoencoderKL config keys {unknown}")
    return VaeConfig(**fields)


def read_checkpoint(folder: Path) -> tuple[VaeConfig, dict[str, torch.Tensor]]:
    """Read a diffusers AutoencoderKL folder: config.json and its safetensors weights."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WalkforgeError(f"{folder}: no config.json (expected a diffusers AutoencoderKL folder)") \
            from None
    except json.JSONDecodeError as exc:
        raise WalkforgeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WalkforgeError(f"{path}: expected a JSON object")
    cfg = config_from_diffusers(data, str(path))
    return cfg, read_safetensors(Path(folder))


def walks(model: nn.Module, cfg: VaeConfig) -> Sequential:
    """One walk, `decode`: latents [B, C, h, w] → sample [B, out, h·f, w·f]."""
    example = torch.randn(2, cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    node = GraphNode(
        name="decode",
        module=model,
        inputs=(TensorSpec("latents", "float32", ("batch", cfg.latent_channels, "height", "width")),),
        outputs=(TensorSpec("sample", "float32",
                            ("batch", cfg.out_channels, "sample_height", "sample_width")),),
        example_inputs={"latents": example},
    )
    return Sequential(nodes=(node,), steps=("decode",))


def fake_inputs(cfg: VaeConfig, batch: int = 1, seed: int = 0, height: int = 8,
                width: int = 8) -> dict[str, np.ndarray]:
    """Standard-normal latents of shape [batch, latent_channels, height, width]."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, cfg.latent_channels, height, width), dtype=np.float32)
    return {"latents": latents}
