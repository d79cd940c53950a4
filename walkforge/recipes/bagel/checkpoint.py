"""BAGEL checkpoints (the published BAGEL-7B-MoT layout): the key map onto BagelModel and the
folder reader.

A folder holds `llm_config.json` (Qwen2 sizes), `vit_config.json` (the ViT, unused for text-to-image),
`ema.safetensors` (Bagel module names: `language_model.model.*` with the `*_moe_gen` expert,
`time_embedder`, `vae2llm`, `llm2vae`, `latent_pos_embed`; the ViT, connector, `vit_pos_embed` and
lm_head are read and ignored), `ae.safetensors` (the FLUX autoencoder in Black-Forest-Labs names:
`decoder.*` mapped onto diffusers' AutoencoderKL decoder by `bfl_to_diffusers`, `encoder.*` ignored)
and, when present, the Qwen2 tokenizer (`tokenizer.json`), which gives the four special token ids
and is bundled for text prompts. Without a tokenizer the ids come from `--config`
`{"special_tokens": {...}}`. Sizes come from the JSON and the tensor shapes; every shape is checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from walkforge.errors import WalkforgeError
from walkforge.recipes.bagel.config import GEN_HEADS, BagelConfig
from walkforge.recipes.configs import from_dict, read_json_object
from walkforge.recipes.weights import CheckpointRead, KeyMap, read_safetensors

LLM = "language_model.model."
AE_ENCODER = "ae.encoder."  # where the reader keeps ae.safetensors' encoder tensors (ignored)
TOKENIZER_FILE = "tokenizer/tokenizer.json"  # its place in a bundle
SPECIAL_NAMES = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}

KEY_MAP = KeyMap(
    prefixes=((LLM, "llm."), *((f"{h}.", f"{h}.") for h in GEN_HEADS), ("vae.", "vae.")),
    ignore=(
        r"^language_model\.lm_head\.",
        r"^vit_model\.",
        r"^connector\.",
        r"^vit_pos_embed\.",
        r"^ae\.encoder\.",
    ),
)

_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def bfl_to_diffusers(key: str, levels: int) -> str | None:
    """A BFL `decoder.*` key as BagelModel's `vae.decoder.*` (diffusers' names), or None when it is
    no decoder key. BFL `up.{i}` runs last-to-first: it is diffusers' `up_blocks.{levels − 1 − i}`."""
    rules = (
        (r"decoder\.(conv_in|conv_out)\.(\w+)", lambda m: f"{m[1]}.{m[2]}"),
        (r"decoder\.norm_out\.(\w+)", lambda m: f"conv_norm_out.{m[1]}"),
        (
            r"decoder\.mid\.block_([12])\.(\w+)\.(\w+)",
            lambda m: f"mid_block.resnets.{int(m[1]) - 1}.{_RESNET.get(m[2], m[2])}.{m[3]}",
        ),
        (
            r"decoder\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(\w+)",
            lambda m: f"mid_block.attentions.0.{_ATTN[m[1]]}.{m[2]}",
        ),
        (
            r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET.get(m[3], m[3])}.{m[4]}",
        ),
        (
            r"decoder\.up\.(\d+)\.upsample\.conv\.(\w+)",
            lambda m: f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}",
        ),
    )
    for pattern, name in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return "vae.decoder." + name(m)
    return None


def read_ae(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """ae.safetensors → (tensors under BagelModel's names, the decoder sizes they imply). The
    attention's 1×1 convs become the Linear weights diffusers' layout has; `encoder.*` is kept
    under `ae.encoder.*` (ignored); any other key is refused."""
    raw = read_safetensors(path)
    levels = len({k.split(".")[2] for k in raw if k.startswith("decoder.up.")})
    if "decoder.conv_in.weight" not in raw or not levels:
        raise WalkforgeError(f"{path}: no decoder.conv_in / decoder.up.* tensors: not a BFL autoencoder")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key.startswith("encoder."):
            out["ae." + key] = tensor
            continue
        name = bfl_to_diffusers(key, levels)
        if name is None:
            raise WalkforgeError(
                f"{path}: unexpected tensor '{key}' {list(tensor.shape)} (not a BFL decoder key)"
            )
        out[name] = tensor[:, :, 0, 0] if ".attentions.0.to_" in name and tensor.ndim == 4 else tensor
    blocks = len({k.split(".")[4] for k in raw if k.startswith("decoder.up.0.block.")}) - 1
    sizes = {
        "vae_channels": [int(raw[f"decoder.up.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)],
        "vae_blocks": blocks,
        "vae_latent_channels": int(raw["decoder.conv_in.weight"].shape[1]),
    }
    return out, sizes


def special_tokens(folder: Path) -> dict[str, int] | None:
    """The four ids from the folder's tokenizer.json, None when it has none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    ids = {field: tok.token_to_id(name) for field, name in SPECIAL_NAMES.items()}
    missing = [SPECIAL_NAMES[f] for f, i in ids.items() if i is None]
    if missing:
        raise WalkforgeError(f"{path}: the tokenizer has no {', '.join(missing)} token")
    return ids


def _shape(t: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in t:
        raise WalkforgeError(f"ema.safetensors is missing '{key}': not a BAGEL checkpoint?")
    return tuple(t[key].shape)


def llm_sizes(
    t: Mapping[str, torch.Tensor], data: Mapping[str, Any], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Qwen2 sizes: widths from shapes, the head count from `given` (--config) or llm_config.json."""
    vocab, width = _shape(t, LLM + "embed_tokens.weight")
    q_out = _shape(t, LLM + "layers.0.self_attn.q_proj.weight")[0]
    heads = int(given.get("heads") or data.get("num_attention_heads") or 0)
    if not heads or q_out % heads:
        raise WalkforgeError(
            f"llm_config.json: num_attention_heads {heads or 'missing'} does not split "
            f"the q projection width {q_out}"
        )
    head_dim = q_out // heads
    layers = len({k[len(LLM) + 7 :].split(".")[0] for k in t if k.startswith(LLM + "layers.")})
    return {
        "width": width,
        "layers": layers,
        "heads": heads,
        "head_dim": head_dim,
        "vocab": vocab,
        "kv_heads": _shape(t, LLM + "layers.0.self_attn.k_proj.weight")[0] // head_dim,
        "mlp": _shape(t, LLM + "layers.0.mlp.gate_proj.weight")[0],
        "eps": float(data.get("rms_norm_eps", 1e-6)),
        "rope_base": float(data.get("rope_theta", 1e6)),
        "qk_norm": LLM + "layers.0.self_attn.q_norm.weight" in t,
        "moe_gen": True,
    }


def read_checkpoint(folder: Path, overrides: Mapping[str, Any] | None = None) -> CheckpointRead:
    """(cfg, tensors) of a BAGEL folder (module doc); `overrides` (--config) win over what the
    folder says. With a tokenizer, `files` bundles it and `manifest` names it."""
    folder, given = Path(folder), dict(overrides or {})
    data = read_json_object(folder / "llm_config.json", "BAGEL's checkpoint folder")
    tensors = read_safetensors(folder / "ema.safetensors")
    ae, vae_sizes = read_ae(folder / "ae.safetensors")
    side = math.isqrt(_shape(tensors, "latent_pos_embed.pos_embed")[0])
    tokens = special_tokens(folder)
    if tokens is None and "special_tokens" not in given:
        raise WalkforgeError(
            f"{folder}: no tokenizer.json; give the special token ids with --config "
            '{"special_tokens": {"bos": …, "eos": …, "start_of_image": …, "end_of_image": …}}'
        )
    base = {"llm": llm_sizes(tensors, data, given.get("llm", {})), **vae_sizes, "max_latent_size": side}
    if tokens is not None:
        base["special_tokens"] = tokens
    merged = {**base, **given, "llm": {**base["llm"], **given.get("llm", {})}}  # --config wins
    cfg = from_dict(BagelConfig, merged, _default_for(base))
    has_tok = tokens is not None
    files = {TOKENIZER_FILE: folder / "tokenizer.json"} if has_tok else {}
    return CheckpointRead(
        cfg, tensors | ae, {"tokenizer": {"file": TOKENIZER_FILE}} if has_tok else {}, files
    )


def _default_for(base: Mapping[str, Any]) -> BagelConfig:
    """A BagelConfig to fill what the folder does not say (VAE groups, scaling, prompt length): the
    defaults, with `base`'s LLM and the default special ids replaced by in-vocabulary ones."""
    from walkforge.recipes.bagel.config import SpecialTokens
    from walkforge.recipes.blocks.qwen2 import Qwen2Config

    vocab = base["llm"]["vocab"]
    ids = (
        SpecialTokens()
        if vocab > max(asdict(SpecialTokens()).values())
        else SpecialTokens(*range(vocab - 4, vocab))
    )
    return BagelConfig(llm=Qwen2Config(**base["llm"]), special_tokens=ids)
