"""The compiled bagel `tiny` bundle: generate() vs the recipe's torch modules, CFG branches as cache
rows of one batch (the text-dropped one empty), batching, the CLI, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import BAGEL_TOL, rel_err

import walkforge
from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError
from walkforge.runtimes.backends.torch import build_model

PROMPT = [5, 61, 7, 300]
SIZE = (64, 48)  # 4 × 3 latent tokens: rows ≠ columns, so a transposed grid shows
STEPS = 6


@pytest.fixture(scope="module")
def bundle(compiled):
    return compiled("bagel", variant="tiny", seed=0, gpu_archs=())  # CPU engines: no AOT GPU kernels


@pytest.fixture(scope="module")
def generator(bundle):
    return walkforge.load(bundle, spinning=False)


def noise(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((12, 64)).astype(np.float32)  # BAGEL's token layout


def test_image_matches_the_recipes_torch_modules(bundle, generator) -> None:
    """Engines (paged KV, CFG rows in one batch, combine + Euler in the engine) vs the recipe's eager
    `generate` (dense caches) on the same weights, guidance on for part of the schedule."""
    image = generator.generate(PROMPT, *SIZE, noise=noise(), num_timesteps=STEPS, cfg_img_scale=1.5)
    assert image.shape == (*SIZE, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    _, cfg, model = build_model(Bundle.open(bundle))
    tok = cfg.special_tokens
    with torch.no_grad():
        latents, want = model.generate(
            torch.tensor([[tok.bos, *PROMPT, tok.eos]]),
            torch.from_numpy(noise()).reshape(1, 4, 3, 64),
            STEPS,
            3.0,
            4.0,
            1.5,
        )
    assert rel_err(generator.last_latents, latents[0]) <= BAGEL_TOL["latents"]
    assert rel_err(image, want[0]) <= BAGEL_TOL["image"]
    torch_backend = walkforge.load(bundle, "torch").generate(
        PROMPT, *SIZE, noise=noise(), num_timesteps=STEPS, cfg_img_scale=1.5
    )
    assert rel_err(image, torch_backend) <= BAGEL_TOL["image"]


def test_guidance_runs_the_empty_context_in_the_same_batch(generator) -> None:
    seen: list[np.ndarray] = []
    generator.chain.observer = lambda walk, inputs, _s: seen.append(np.asarray(inputs.get("prefix_lens", [])))
    try:
        guided = generator.generate(PROMPT, *SIZE, noise=noise(), num_timesteps=STEPS)
        plain = generator.generate(PROMPT, *SIZE, noise=noise(), num_timesteps=STEPS, cfg_text_scale=1.0)
    finally:
        generator.chain.observer = None
    lens = [s.tolist() for s in seen if s.size]
    assert lens[: STEPS - 1] == [[6, 0]] * (STEPS - 1)  # prompt context + the text-dropped, empty one
    assert lens[STEPS - 1 :] == [[6]] * (STEPS - 1)  # no text guidance: the empty row is not run
    assert rel_err(guided, plain) > 1e-2  # guidance changes the image


def test_interval_and_renorm_types_change_the_result(generator) -> None:
    base = generator.generate(PROMPT, *SIZE, noise=noise(), num_timesteps=STEPS)
    for setting in (
        {"cfg_interval": (0.99, 1.0)},
        {"cfg_renorm_type": "channel"},
        {"cfg_renorm_type": "text_channel", "cfg_renorm_min": 0.5},
    ):
        other = generator.generate(PROMPT, *SIZE, noise=noise(), num_timesteps=STEPS, **setting)
        assert rel_err(other, base) > 1e-4, setting


def test_a_batch_of_prompts_matches_each_alone(generator) -> None:
    ids = np.array([[5, 61, 7, 300], [9, 8, 0, 0]])
    grids = np.stack([noise(1), noise(2)]).reshape(2, 4, 3, 64)
    out = generator.run({"prompt_ids": ids, "prompt_mask": ids > 0, "noise": grids}, num_timesteps=STEPS)
    for row, prompt in enumerate(([5, 61, 7, 300], [9, 8])):
        alone = generator.generate(prompt, *SIZE, noise=grids[row].reshape(12, 64), num_timesteps=STEPS)
        assert rel_err(out["image"][row], alone) <= BAGEL_TOL["image"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 60}, r"^height 60: must be a positive multiple of 16 up to 128"),
        ({"width": 144}, r"^width 144: must be a positive multiple of 16 up to 128"),
        ({"prompt_ids": []}, r"^empty prompt"),
        ({"prompt_ids": list(range(1, 14))}, r"^prompt of 13 tokens is longer than the compiled maximum 12$"),
        ({"cfg_renorm_type": "glob"}, r"^unknown cfg_renorm_type 'glob'"),
        ({"noise": np.full((12, 64), np.nan, np.float32)}, r"^noise contains NaN or Inf$"),
        ({"noise": np.zeros((10, 64), np.float32)}, r"^noise has shape \[10, 64\]; expected \[12, 64\]"),
        ({"prompt_ids": [5, 5000]}, r"^prompt_ids must lie in \[0, 1000\)"),
        ({"prompt": "a red cube"}, r"^give exactly one of prompt_ids and prompt"),
    ],
)
def test_bad_input_is_a_one_line_error(generator, kwargs, message) -> None:
    args = {"prompt_ids": PROMPT, "height": SIZE[0], "width": SIZE[1], "num_timesteps": 2} | kwargs
    with pytest.raises(WalkforgeError, match=message) as err:
        generator.generate(**args)
    assert "\n" not in str(err.value)


def test_text_prompts_need_a_bundled_tokenizer(generator) -> None:
    with pytest.raises(WalkforgeError, match=r"^this bundle has no tokenizer"):
        generator.generate(prompt="a red cube", height=32, width=32, num_timesteps=2)


def test_cli_writes_a_png(bundle, tmp_path) -> None:
    from click.testing import CliRunner

    from walkforge.cli import cli

    out = tmp_path / "image.png"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(bundle),
            "--prompt-ids",
            "5,61,7",
            "--height",
            "32",
            "--width",
            "48",
            "--num-steps",
            "2",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(out.read_bytes()[16:20], "big") == 48  # IHDR width
    bad = CliRunner().invoke(cli, ["run", str(bundle), "--prompt-ids", "5,x", "-o", str(out)])
    assert isinstance(bad.exception, WalkforgeError)  # main() prints it as one `error:` line, exit 2
    assert "expected comma-separated integers" in str(bad.exception)
