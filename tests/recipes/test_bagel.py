"""BAGEL recipe: config, the schedule and CFG combine against their formulas, the FLUX decoder
(through the BFL → diffusers key map) against diffusers, the checkpoint reader on BAGEL's layout,
and the eager model end to end against an independent reference from stock blocks."""

from __future__ import annotations

import json
from dataclasses import replace

import bagel_reference as ref
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tolerances import BAGEL_TOL, rel_err

from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.recipes.bagel import checkpoint
from walkforge.recipes.bagel.config import VARIANTS, BagelConfig
from walkforge.recipes.bagel.model import RENORM_TYPES, build, cfg_combine, shifted_timesteps, sincos_2d
from walkforge.recipes.configs import from_dict, to_dict
from walkforge.recipes.weights import load_strict
from walkforge.runtimes.chain import shifted_euler

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
TINY = VARIANTS["tiny"]


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norms around 1, so none is silently the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue  # fixed sin-cos table
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * (0.2 if base else 0.1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build(TINY).eval()
    randomise(m)
    return m


# ------------------------------------------------------------------ config


def test_variants_round_trip_and_impossible_sizes_are_refused() -> None:
    for cfg in VARIANTS.values():
        assert from_dict(BagelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(WalkforgeError, match="outside the vocabulary"):
        from_dict(BagelConfig, {"special_tokens": {"bos": 5000}}, TINY)
    with pytest.raises(WalkforgeError, match="vae_groups"):
        replace(TINY, vae_groups=7)
    counts = {k: sum(p.numel() for p in build(v).parameters()) for k, v in VARIANTS.items() if k != "bagel"}
    assert 200e6 <= counts["small"] <= 400e6


# ------------------------------------------------------------------ formulas


def test_schedule_is_bagels_shifted_linspace() -> None:
    t_ref, dt_ref = ref.schedule(50, 3.0)
    steps = [shifted_euler(k, 49, 1, timestep_shift=3.0) for k in range(49)]
    t = np.array([s["t"][0] for s in steps])
    dt = np.array([s["dt"][0] for s in steps])
    assert rel_err(t, t_ref) <= SCHEDULE_TOL
    # dt = t_k − t_{k+1} of two fp32 values ≤ 1 (as BAGEL computes it): ≤ 2·SCHEDULE_TOL absolute,
    # relative to the largest step
    assert rel_err(-dt, dt_ref) <= 2 * SCHEDULE_TOL / dt_ref.max()
    assert rel_err(np.array(shifted_timesteps(50, 3.0))[:-1], t_ref) <= SCHEDULE_TOL
    assert t[0] == 1.0 and abs(t[1] - 0.99310) < 1e-5 and abs(t[-1] - 0.05882) < 1e-5
    assert ((t > 0.4) & (t <= 1.0)).sum() == 41  # the default interval guides 41 of the 49 steps


SCHEDULE_TOL = 4 * float(np.finfo(np.float32).eps)  # fp32 linspace and one shift: a few roundings


@pytest.mark.parametrize("kind", RENORM_TYPES)
@pytest.mark.parametrize("s_i", [1.0, 1.5])
def test_cfg_combine_matches_the_formulas(kind: str, s_i: float) -> None:
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(2, 2, 3, 4, 64, generator=gen)  # branches × images × grid × channels
    v[1] *= 3.0  # text-dropped branch larger: the renorm clamp engages
    t = torch.tensor([0.7, 0.2])  # image 1 lies outside the interval
    args = (
        torch.tensor([4.0, s_i]),
        torch.tensor([0.4, 1.0]),
        torch.tensor([0.3]),
        torch.tensor([RENORM_TYPES.index(kind)]),
    )
    got = cfg_combine(v, t, *args).double().numpy()
    for b in range(2):
        want = ref.guided(
            v[0, b].reshape(-1, 64).double().numpy(),
            v[1, b].reshape(-1, 64).double().numpy(),
            float(t[b]),
            4.0,
            s_i,
            (0.4, 1.0),
            kind,
            0.3,
        )
        assert rel_err(got[b].reshape(-1, 64), want) <= COMBINE_TOL
    assert np.array_equal(got[1], v[0, 1].numpy())  # outside the interval: the full branch as is
    one_branch = cfg_combine(v[:1], t, *args).numpy()
    assert (
        rel_err(
            one_branch[0],
            ref.guided(*[v[0, 0].reshape(-1, 64).numpy()] * 2, 0.7, 4.0, s_i, (0.4, 1.0), kind, 0.3).reshape(
                3, 4, 64
            ),
        )
        <= COMBINE_TOL
    )


COMBINE_TOL = 64 * float(np.finfo(np.float32).eps)  # fp32 norms over ≤ 768 values vs float64


def test_position_and_time_tables_match_the_formulas(model) -> None:
    assert rel_err(sincos_2d(5, 16), ref.pos_table(5, 16)) <= SCHEDULE_TOL
    t = torch.tensor([0.37])
    mlp = model.time_embedder.mlp
    want = mlp[2](torch.nn.functional.silu(mlp[0](ref.time_features(0.37))))
    assert rel_err(model.time_embedder(t), want) <= BAGEL_TOL["layer"]


# ------------------------------------------------------------------ decoder and checkpoint


def diffusers_to_bfl(key: str, levels: int) -> str:
    """The inverse key map, written out by hand from the BFL module layout."""
    parts = key.removeprefix("vae.").split(".")
    names = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}
    if parts[1] == "mid_block":
        where = f"block_{int(parts[3]) + 1}" if parts[2] == "resnets" else "attn_1"
        rest = (
            parts[4:]
            if parts[2] == "resnets"
            else (["proj_out", parts[-1]] if parts[4] == "to_out" else parts[4:])
        )
        return ".".join(["decoder.mid", where, *(names.get(p, p) for p in rest)])
    if parts[1] == "up_blocks":
        i = levels - 1 - int(parts[2])
        if parts[3] == "upsamplers":
            return f"decoder.up.{i}.upsample.conv.{parts[-1]}"
        return ".".join([f"decoder.up.{i}.block.{parts[4]}", *(names.get(p, p) for p in parts[5:])])
    return "decoder." + ".".join({"conv_norm_out": "norm_out"}.get(p, p) for p in parts[1:])


def bagel_folder(model, folder, tokenizer: bool = False, special: bool = True):
    """BAGEL's published layout from `model`'s weights, plus the ViT/connector/lm_head tensors and
    an ae encoder that text-to-image must ignore."""
    cfg, levels = model.cfg, len(model.cfg.vae_channels)
    state = model.state_dict()
    ema = {checkpoint.KEY_MAP.to_checkpoint(k): v for k, v in state.items() if not k.startswith("vae.")}
    ema |= {
        "language_model.lm_head.weight": torch.zeros(cfg.llm.vocab, cfg.llm.width),
        "vit_model.vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 12),
        "connector.fc1.weight": torch.zeros(cfg.llm.width, 8),
        "vit_pos_embed.pos_embed": torch.zeros(4, cfg.llm.width),
    }
    ae = {
        diffusers_to_bfl(k, levels): (v[:, :, None, None] if ".attentions.0.to_" in k and v.ndim == 2 else v)
        for k, v in state.items()
        if k.startswith("vae.")
    }
    ae["encoder.conv_in.weight"] = torch.zeros(16, 3, 3, 3)
    save_file({k: v.contiguous() for k, v in ema.items()}, folder / "ema.safetensors")
    save_file({k: v.contiguous() for k, v in ae.items()}, folder / "ae.safetensors")
    (folder / "llm_config.json").write_text(
        json.dumps(
            {
                "hidden_size": cfg.llm.width,
                "num_attention_heads": cfg.llm.heads,
                "num_key_value_heads": cfg.llm.kv_heads,
                "rms_norm_eps": cfg.llm.eps,
                "rope_theta": cfg.llm.rope_base,
                "vocab_size": cfg.llm.vocab,
            }
        )
    )
    (folder / "vit_config.json").write_text("{}")
    overrides = {"vae_groups": cfg.vae_groups, "max_prompt_len": cfg.max_prompt_len}
    if special:
        overrides["special_tokens"] = to_dict(cfg.special_tokens)
    return overrides


def diffusers_vae(model):
    cfg = model.cfg
    n = len(cfg.vae_channels)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.vae_latent_channels,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_blocks,
        norm_num_groups=cfg.vae_groups,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    return vae


def test_decoder_through_the_bfl_map_matches_diffusers(model, tmp_path) -> None:
    """diffusers' decoder gets random weights; they reach ours only through ae.safetensors in BFL
    names and the reader's map."""
    vae = diffusers_vae(model)
    randomise(vae, seed=3)
    levels = len(model.cfg.vae_channels)
    ae = {
        diffusers_to_bfl("vae." + k, levels): (
            v[:, :, None, None] if ".attentions.0.to_" in k and v.ndim == 2 else v
        )
        for k, v in vae.state_dict().items()
        if k.startswith("decoder.")
    }
    save_file({k: v.contiguous() for k, v in ae.items()}, tmp_path / "ae.safetensors")
    tensors, sizes = checkpoint.read_ae(tmp_path / "ae.safetensors")
    assert sizes == {"vae_channels": list(model.cfg.vae_channels), "vae_blocks": 1, "vae_latent_channels": 16}
    ours = build(model.cfg).eval()
    ours.vae.load_state_dict({k.removeprefix("vae."): v for k, v in tensors.items()}, strict=True)
    x = torch.randn(1, 3, 2, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.decode(x)[0]
        z = torch.einsum("hwpqc->chpwq", x[0].reshape(3, 2, 2, 2, 16)).reshape(1, 16, 6, 4)
        want = (0.5 * vae.decode(z / 0.3611 + 0.1159).sample + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
    assert rel_err(got, want) <= BAGEL_TOL["decode"]


def test_checkpoint_reader_maps_bagels_layout_strictly(model, tmp_path) -> None:
    overrides = bagel_folder(model, tmp_path)
    cfg, tensors = checkpoint.read_checkpoint(tmp_path, overrides)
    assert cfg == model.cfg
    fresh = build(cfg)
    counts = load_strict(fresh, tensors, checkpoint.KEY_MAP)
    assert counts == {
        "loaded": len(model.state_dict()),
        "ignored": 5,
    }  # lm_head, ViT, connector, vit_pos, encoder
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(WalkforgeError, match="no tokenizer.json; give the special token ids"):
        checkpoint.read_checkpoint(tmp_path, {})
    bad = dict(tensors, **{"llm2vae.bias": torch.zeros(3)})
    with pytest.raises(WalkforgeError, match=r"'llm2vae.bias' has shape \[3\], the model expects \[64\]"):
        load_strict(build(cfg), bad, checkpoint.KEY_MAP)
    (tmp_path / "llm_config.json").unlink()
    with pytest.raises(WalkforgeError, match="no llm_config.json"):
        checkpoint.read_checkpoint(tmp_path, overrides)


def test_special_tokens_come_from_the_folders_tokenizer(model, tmp_path) -> None:
    from tokenizers import Tokenizer, models

    overrides = bagel_folder(model, tmp_path, special=False)
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    read = checkpoint.read_checkpoint(tmp_path, overrides)
    assert read[0].special_tokens.ids() == (2, 3, 4, 5)
    assert read.files == {checkpoint.TOKENIZER_FILE: tmp_path / "tokenizer.json"}
    assert get_recipe("bagel").key_map is checkpoint.KEY_MAP


# ------------------------------------------------------------------ end to end


def test_generate_matches_the_stock_reference(model) -> None:
    """The eager model (dense caches, CFG with the empty text-dropped context) vs transformers'
    Qwen3 pieces + diffusers' decoder + the formulas, 6 timesteps, guidance on a part of them."""
    cfg = model.cfg
    hf_cfg = transformers.Qwen3Config(
        hidden_size=cfg.llm.width,
        intermediate_size=cfg.llm.mlp,
        num_hidden_layers=cfg.llm.layers,
        num_attention_heads=cfg.llm.heads,
        num_key_value_heads=cfg.llm.kv_heads,
        head_dim=cfg.llm.head_dim,
        rms_norm_eps=cfg.llm.eps,
        rope_theta=cfg.llm.rope_base,
        attention_bias=True,
        vocab_size=cfg.llm.vocab,
        attn_implementation="eager",
    )
    vae = diffusers_vae(model)
    vae.decoder.load_state_dict(
        {
            k.removeprefix("vae.decoder."): v
            for k, v in model.state_dict().items()
            if k.startswith("vae.decoder.")
        },
        strict=True,
    )
    prompt = [3, 17, 250, 9]
    noise = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(5))
    settings = dict(s_t=4.0, s_i=1.5, interval=(0.4, 1.0), kind="global", lo=0.0)
    with torch.no_grad():
        tok = cfg.special_tokens
        ids = torch.tensor([[tok.bos, *prompt, tok.eos]])
        latents, image = model.generate(ids, noise[None], 6, 3.0, 4.0, 1.5, (0.4, 1.0), "global", 0.0)
        want_latents, want_image = ref.generate(model, vae, hf_cfg, prompt, noise, 6, 3.0, **settings)
    assert rel_err(latents[0], want_latents) <= BAGEL_TOL["latents"]
    assert rel_err(image[0], want_image) <= BAGEL_TOL["image"]
