"""pi0.5 bundles: the chained engines over the shared page pool vs the recipe's dense eager
reference; fp8 weights with an fp8 KV pool; `walkforge run`; bad input as one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tolerances import PI0_TINY_ACTIONS_TOL, cosine, rel_err

import walkforge
from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts.bundle import Bundle
from walkforge.cli import cli
from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.runtimes.backends.torch import build_model
from walkforge.runtimes.fronts.pi05 import Pi05Policy

PI05 = get_recipe("pi05")
TINY = PI05.variant("tiny")
# rel_err of the bundle's engines vs the recipe's eager reference, and of a request in a batch vs
# alone: pi0's bound (its longer suffix bounds pi0.5's 50 action tokens), 4.6e-5 ≤ the 1e-4.
ACTIONS_TOL = PI0_TINY_ACTIONS_TOL
FP8_COSINE = 0.999  # fp8 weights + activations + fp8 KV pages vs fp32 (measured on tiny: ≥ 0.9995)


@pytest.fixture(scope="module")
def bundle(compiled) -> Bundle:
    return Bundle.open(compiled("pi05", variant="tiny", seed=3, gpu_archs=()))


@pytest.fixture(scope="module")
def policy(bundle) -> Pi05Policy:
    return walkforge.load(bundle.root, spinning=False)


def reference(bundle: Bundle, feeds: dict[str, np.ndarray], num_steps: int | None = None) -> np.ndarray:
    """The recipe's dense eager `sample_actions` with the bundle's weights."""
    _, _, model = build_model(bundle)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        return model.sample_actions(t["images"], t["image_masks"], t["prompt_ids"], t["prompt_mask"],
                                    t["noise"], num_steps).numpy()


def test_bundle_matches_eager_reference(bundle, policy):
    assert isinstance(policy, Pi05Policy)
    feeds = PI05.fake_inputs(TINY, batch=2, seed=5)
    got = policy.run(feeds)["actions"]
    assert got.shape == (2, 50, 32)
    assert rel_err(got, reference(bundle, feeds)) <= ACTIONS_TOL
    three = policy.run(feeds, num_steps=3)["actions"]
    assert rel_err(three, reference(bundle, feeds, num_steps=3)) <= ACTIONS_TOL
    assert rel_err(three, got) > 1e-3  # 3 steps are not 10: far above any TOL


def test_batch_of_different_prompt_lengths_equals_each_alone(policy):
    feeds = PI05.fake_inputs(TINY, batch=3, seed=7)
    assert len(set(feeds["prompt_mask"].sum(1))) == 3
    together = policy.run(feeds)["actions"]
    for b in range(3):
        alone = policy.run({k: v[b : b + 1] for k, v in feeds.items()})["actions"]
        assert rel_err(together[b], alone[0]) <= ACTIONS_TOL
    assert policy.paging.pages.free_pages == policy.paging.pages.num_pages


def test_infer_draws_seeded_noise(policy):
    feeds = PI05.fake_inputs(TINY, batch=1, seed=10)
    del feeds["noise"]
    a, b = policy.infer(**feeds), policy.infer(**feeds)
    assert np.array_equal(a, b) and not np.array_equal(a, policy.infer(**feeds, seed=1))


def test_torch_backend_matches_cpu_engines(bundle, policy):
    feeds = PI05.fake_inputs(TINY, batch=2, seed=11)
    ref = walkforge.load(bundle.root, backend="torch").run(feeds)["actions"]
    assert rel_err(policy.run(feeds)["actions"], ref) <= ACTIONS_TOL


def test_walkforge_run_takes_the_same_npz_names(bundle, policy, tmp_path):
    feeds = PI05.fake_inputs(TINY, batch=1, seed=12)
    np.savez(tmp_path / "in.npz", **feeds)
    result = CliRunner().invoke(cli, ["run", str(bundle.root), "--inputs", str(tmp_path / "in.npz"),
                                      "--output", str(tmp_path / "out.npz"), "--num-steps", "4"])
    assert result.exit_code == 0, result.output
    assert rel_err(np.load(tmp_path / "out.npz")["actions"], policy.run(feeds, num_steps=4)["actions"]) == 0


@pytest.mark.parametrize("change, message", [
    (lambda f: {"images": f["images"][:, :1]}, "1 views, this bundle was compiled for 2"),
    (lambda f: {"prompt_ids": np.zeros((1, 25), np.int64), "prompt_mask": np.ones((1, 25), bool)},
     "longer than the compiled maximum 24"),
    (lambda f: {"noise": np.full_like(f["noise"], np.nan)}, "x_t: contains NaN"),
    (lambda f: {"images": f["images"].astype(np.float64)}, "images: dtype float64, expected float32"),
    (lambda f: {"images": f["images"] * 255}, r"images must lie in \[0, 1\]"),
    (lambda f: {"prompt_ids": f["prompt_ids"] + 5000}, r"prompt_ids must lie in \[0, 1000\)"),
    (lambda f: {"state": np.zeros((1, 32), np.float32)}, "pi05 takes no 'state' input"),
    (lambda f: {"prompt_mask": None}, "missing input.* prompt_mask"),
])
def test_bad_input_is_one_line_error(policy, change, message):
    feeds = {k: v for k, v in {**PI05.fake_inputs(TINY, batch=1, seed=12), **change(PI05.fake_inputs(
        TINY, batch=1, seed=12))}.items() if v is not None}
    with pytest.raises(WalkforgeError, match=message) as info:
        policy.run(feeds)
    assert "\n" not in str(info.value)


def test_fp8_weights_and_fp8_kv_pages(bundle, tmp_path):
    out = tmp_path / "tiny-w8-kv8"
    compile_bundle(CompileRequest("pi05", out, variant="tiny", seed=3, precision="fp8", calib_samples=4,
                                  gpu_archs=(), kv_dtype="fp8"))  # fmt: skip
    fp8 = Bundle.open(out)
    assert fp8.manifest["precision"]["weights"] == fp8.manifest["precision"]["kv"] == "fp8_e4m3"
    runner = walkforge.load(out, spinning=False)
    assert runner.paging.buffer.itemsize == 1  # E4M3 pages
    feeds = PI05.fake_inputs(TINY, batch=2, seed=5)
    assert cosine(runner.run(feeds)["actions"], reference(fp8, feeds)) >= FP8_COSINE
