"""Shared fixtures: bundles compiled once per session (`compiled`, tests/bundles.py; the tiny VAE
is `tiny_bundle`) and diffusers checkpoints.

Tests that tamper with a bundle take a fresh copy (`tiny_bundle_copy`, `bundles.private_copy`);
the session bundles themselves must stay untouched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from bundles import BundleCache

VAE_TINY_SEED = 0


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` (pytest-xdist, --dist loadgroup) runs each module on one worker, so a module's
    fixtures run once and no worker idles waiting for another's compile of the same bundle; the
    regress cases (one compile each, nothing shared) spread over the workers one by one."""
    for item in items:
        if item.module is not None and item.module.__name__ != "test_regress":
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session", autouse=True)
def private_stamp_cache(tmp_path_factory: pytest.TempPathFactory):
    """Bundle integrity stamps (artifacts/bundle.py) go to a per-session cache, never the user's
    ~/.cache: tests must neither read stamps an earlier run left nor leave any behind. Set in the
    environment, so subprocesses (CLI, servers) see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WALKFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("walkforge-cache")))
        yield


@pytest.fixture(scope="session")
def bundle_cache(tmp_path_factory: pytest.TempPathFactory) -> BundleCache:
    """The session's compiled bundles (tests/bundles.py), shared by the pytest-xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a folder of the run's own
        root = root.parent
    return BundleCache(root / "bundles")


@pytest.fixture(scope="session")
def compiled(bundle_cache: BundleCache) -> BundleCache:
    """`compiled(recipe, **request_fields)` → the bundle folder, compiled once per session and shared
    by every test (and pytest-xdist worker) asking for the same request; do not modify it."""
    return bundle_cache


@pytest.fixture(scope="session")
def tiny_bundle(bundle_cache: BundleCache) -> Path:
    """`walkforge compile vae --variant tiny`, random weights (seed 0); do not modify."""
    return bundle_cache("vae", variant="tiny", seed=VAE_TINY_SEED)


@pytest.fixture
def tiny_bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle, free to tamper with."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def make_diffusers_vae(cfg, seed: int = 0):
    """A diffusers AutoencoderKL shaped like VaeConfig `cfg`; random weights, norms off 1/0."""
    import torch

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    n = len(cfg.block_out_channels)
    model = diffusers.AutoencoderKL(
        block_out_channels=cfg.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        out_channels=cfg.out_channels,
        norm_num_groups=cfg.norm_num_groups,
        use_quant_conv=cfg.use_post_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
        mid_block_add_attention=cfg.mid_block_add_attention,
    ).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return model


@pytest.fixture(scope="session")
def diffusers_checkpoint() -> Callable:
    """`diffusers_checkpoint(variant, folder)` → (AutoencoderKL, folder saved as safetensors)."""

    def save(variant: str, folder: Path):
        from walkforge.recipes import get_recipe

        model = make_diffusers_vae(get_recipe("vae").variant(variant))
        model.save_pretrained(folder, safe_serialization=True)
        return model, folder

    return save


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, diffusers_checkpoint: Callable):
    """(diffusers AutoencoderKL, its saved folder) matching the `tiny` variant; do not modify."""
    return diffusers_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "vae-tiny")


@pytest.fixture(scope="session")
def gemma_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma-like tokenizer folder trained on the fly (tokenizer.model + transformers'
    tokenizer.json / tokenizer_config.json; tests/lerobot_folder.py); do not modify."""
    from lerobot_folder import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"), fast=True)
