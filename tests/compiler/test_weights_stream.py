"""The compile writes its weights file one tensor at a time: a streamed safetensors file reads
back as `save_file`'s would with the same fingerprint, and compiling from a checkpoint never builds the
model with real weights (only on the meta device), so a bf16 folder never exists as a whole fp32 copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lerobot_folder import EMBED, LM_HEAD, write_folder
from safetensors import safe_open
from safetensors.torch import load_file

from walkforge import CompileRequest, compile_bundle
from walkforge.compiler import pipeline
from walkforge.compiler.pipeline import WEIGHTS_FILE
from walkforge.compiler.weights_file import write_safetensors
from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.recipes.weights import fingerprint


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=gen), "a.bias": torch.randn(7, generator=gen),
            "c.half": torch.randn(2, 2, generator=gen).to(torch.bfloat16), "d.ids": torch.arange(4),
            "e.empty": torch.zeros(0, 3)}


def test_a_streamed_file_reads_back_with_the_same_fingerprint(tmp_path: Path) -> None:
    want = state()
    specs = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in want.items()}
    got_fp = write_safetensors(tmp_path / "w.safetensors", specs, want.__getitem__)
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(want)
    for key, tensor in want.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor)
    assert got_fp == fingerprint(want)


def test_a_tensor_unlike_its_header_is_refused(tmp_path: Path) -> None:
    specs = {"w": torch.empty(2, 3, device="meta")}
    with pytest.raises(WalkforgeError, match=r"weight 'w' is torch.float32 \[3, 2\], its header says"):
        write_safetensors(tmp_path / "w.safetensors", specs, lambda _name: torch.zeros(3, 2))


def test_a_checkpoint_compile_builds_the_model_only_on_meta(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_folder(tmp_path / "pi0", "pi0", dtype=torch.bfloat16)
    devices = []
    real = pipeline.build_model

    def watched(*args, **kwargs):
        devices.append(torch.empty(()).device.type)  # the default device the model is built on
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_model", watched)
    out = tmp_path / "bundle"
    manifest = compile_bundle(CompileRequest("pi0", out, checkpoint=folder.path, gpu_archs=()))
    assert devices and set(devices) == {"meta"}
    # the weights file holds the checkpoint's bf16 tensors as fp32, exactly
    recipe = get_recipe("pi0")
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as st:
        for ckpt_key, tensor in folder.tensors.items():
            module_key = recipe.key_map.to_module(EMBED if ckpt_key == LM_HEAD else ckpt_key)
            if recipe.key_map.ignored(ckpt_key) and ckpt_key != LM_HEAD:
                continue
            stored = st.get_tensor(module_key)
            assert stored.dtype == torch.float32 and torch.equal(stored, tensor.float())
    assert manifest["weights"]["loaded"] == len(load_file(str(out / WEIGHTS_FILE)))
