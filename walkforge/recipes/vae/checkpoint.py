"""diffusers AutoencoderKL checkpoints: the key map (the encoder half is read and ignored) and
reading a folder (`config.json` + `diffusion_pytorch_model.safetensors`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from walkforge.errors import WalkforgeError
from walkforge.recipes.vae.config import VaeConfig
from walkforge.recipes.weights import KeyMap, read_safetensors

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
