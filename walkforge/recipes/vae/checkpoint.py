"""diffusers AutoencoderKL checkpoints: the key map (the encoder half is read and ignored) and
reading a folder as diffusers' `from_pretrained` does: a VAE folder (`config.json` +
`diffusion_pytorch_model.safetensors`) or a pipeline root (model_index.json → `vae/`); with
`weights_variant="fp16"` the `diffusion_pytorch_model.fp16.safetensors` file instead (like
diffusers' `variant=`), else only the plain file; sharded weights through their
`*.safetensors.index.json`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from walkforge.errors import WalkforgeError
from walkforge.recipes.configs import from_dict, read_json_object
from walkforge.recipes.vae.config import VaeConfig
from walkforge.recipes.weights import CheckpointRead, KeyMap, read_weights

KEY_MAP = KeyMap(  # the encoder half is loaded where the model has it (--walks decode,encode)
    prefixes=(("decoder.", "decoder."), ("post_quant_conv.", "post_quant_conv."),
              ("encoder.", "encoder."), ("quant_conv.", "quant_conv.")),
    ignore=(r"^encoder\.", r"^quant_conv\."),
)

# config.json keys that only concern the encoder, scaling or bookkeeping.
_UNUSED_KEYS = {
    "_class_name", "_diffusers_version", "_name_or_path", "in_channels", "down_block_types",
    "sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
    "force_upcast", "use_quant_conv",
}
# What the manifest's "vae" entry keeps: diffusers' AutoencoderKL defaults where config.json is silent.
SCALING_DEFAULTS = {
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "sample_size": 32,
}
WEIGHTS_STEM = "diffusion_pytorch_model"
DIFFUSERS_FOLDER = "a diffusers AutoencoderKL or pipeline folder"
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


def read_checkpoint(folder: Path, overrides: Mapping[str, Any] | None = None, *,
                    weights_variant: str | None = None) -> tuple[VaeConfig, dict[str, torch.Tensor]]:
    """Read a diffusers AutoencoderKL: a VAE folder or a pipeline root (its `vae/`), config.json
    and its weights (`weights_variant`: module doc). Unpacks as (cfg, tensors); `.manifest`
    holds the config's scaling entry."""
    vae_dir = vae_folder(Path(folder))
    data = read_json_object(vae_dir / "config.json", DIFFUSERS_FOLDER)
    cfg = from_dict(VaeConfig, dict(overrides or {}),
                    config_from_diffusers(data, str(vae_dir / "config.json")))
    tensors = read_weights(vae_dir, WEIGHTS_STEM, weights_variant)
    return CheckpointRead(cfg, tensors, {"vae": scaling_entry(data)})


def vae_folder(folder: Path) -> Path:
    """`folder` itself when it holds config.json; a pipeline root's VAE through model_index.json."""
    if (folder / "config.json").is_file():
        return folder
    if not (folder / "model_index.json").is_file():
        raise WalkforgeError(f"{folder}: no config.json (expected a diffusers AutoencoderKL folder "
                             "or a pipeline folder with model_index.json)")
    index = read_json_object(folder / "model_index.json", DIFFUSERS_FOLDER)
    if "vae" not in index:
        raise WalkforgeError(f"{folder / 'model_index.json'}: the pipeline has no 'vae' component; "
                             f"components: {', '.join(k for k in index if not k.startswith('_'))}")
    if not (folder / "vae" / "config.json").is_file():
        raise WalkforgeError(f"{folder}: model_index.json names a vae, but vae/config.json is missing")
    return folder / "vae"


def scaling_entry(data: dict[str, Any]) -> dict[str, Any]:
    """The config's latent scaling (diffusers' defaults where absent) and tile size, as
    diffusers pipelines and `enable_tiling()` read them."""
    return {key: data.get(key, default) for key, default in SCALING_DEFAULTS.items()}
