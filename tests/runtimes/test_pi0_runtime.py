"""pi0 bundles: the chained engines over the shared page pool vs the recipe's dense eager reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import walkforge
from walkforge.artifacts.bundle import Bundle
from walkforge.compiler.pipeline import CompileRequest, compile_bundle
from walkforge.errors import WalkforgeError
from walkforge.recipes import pi0
from walkforge.runtimes.torch_backend import build_model

ACTIONS_TOL = 1e-4  # bundle vs the recipe's eager reference, max abs relative to output scale
BATCH_TOL = 1e-5  # a request in a batch vs the same request alone


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    out = tmp_path_factory.mktemp("pi0") / "tiny"
    compile_bundle(CompileRequest("pi0", out, variant="tiny", seed=3, gpu_archs=()))
    return Bundle.open(out)


@pytest.fixture(scope="module")
def policy(bundle):
    return walkforge.load(bundle.root, spinning=False)


def scaled(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def reference(bundle: Bundle, feeds: dict[str, np.ndarray], num_steps: int | None = None) -> np.ndarray:
    """The recipe's dense eager `sample_actions` with the bundle's weights."""
    _, _, model = build_model(bundle)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        return model.sample_actions(t["images"], t["image_masks"], t["prompt_ids"], t["prompt_mask"],
                                    t["state"], t["noise"], num_steps).numpy()


def test_bundle_matches_eager_reference(bundle, policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=2, seed=5)
    got = policy.run(feeds)["actions"]
    assert got.shape == (2, 50, 32)
    assert scaled(got, reference(bundle, feeds)) <= ACTIONS_TOL


def test_num_steps_is_a_run_time_setting(bundle, policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=1, seed=6)
    three = policy.run(feeds, num_steps=3)["actions"]
    assert scaled(three, reference(bundle, feeds, num_steps=3)) <= ACTIONS_TOL
    assert np.abs(three - policy.run(feeds)["actions"]).max() > 1e-3


def test_batch_of_different_prompt_lengths_equals_each_alone(policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=3, seed=7)
    assert len(set(feeds["prompt_mask"].sum(1))) == 3
    together = policy.run(feeds)["actions"]
    for b in range(3):
        alone = policy.run({k: v[b : b + 1] for k, v in feeds.items()})["actions"]
        assert np.abs(together[b] - alone[0]).max() <= BATCH_TOL


def test_pool_is_written_in_place_and_shared_by_reference(policy):
    pool = policy.pool
    address = pool.buffer.ctypes.data
    pool.buffer[...] = 0.0
    policy.run(pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=1, seed=8))
    assert pool.buffer.ctypes.data == address  # never reallocated
    assert policy._pool_value.data_ptr() == address  # the engines' binding is this very buffer
    written = np.abs(pool.buffer).reshape(pool.buffer.shape[0], 2, pool.num_pages, -1).max(-1)
    assert (written > 0).any()  # prefill's KVCacheWrite landed in the caller-visible buffer
    used = (written > 0).any(axis=(0, 1)).nonzero()[0]
    assert used.tolist() == list(range(len(used)))  # only the pages handed out were touched
    assert np.isfinite(pool.buffer).all() and np.abs(pool.buffer).max() < 100


def test_prefill_writes_are_deterministic(policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=2, seed=13)
    snapshots = []
    for _ in range(2):
        policy.pool.buffer[...] = 0.0
        policy.run(feeds, num_steps=1)
        snapshots.append(policy.pool.buffer.copy())
    assert np.array_equal(*snapshots)


def test_pages_are_freed_after_every_call(policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=2, seed=9)
    for _ in range(5):
        policy.run(feeds, num_steps=1)
    assert policy.pool.free_pages == policy.pool.num_pages


def test_exhausted_pool_is_a_clear_error(bundle):
    small = walkforge.load(bundle.root, kv_pages=40)
    with pytest.raises(WalkforgeError, match=r"KV page pool exhausted: need \d+ pages .* 40 free of 40"):
        small.run(pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=2, seed=0))
    assert small.pool.free_pages == 40


def test_seeded_noise_is_reproducible(policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=1, seed=10)
    del feeds["noise"]
    a, b = policy.infer(**feeds), policy.infer(**feeds)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, policy.infer(**feeds, seed=1))


def test_torch_backend_matches_cpu_engines(bundle, policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=2, seed=11)
    ref = walkforge.load(bundle.root, backend="torch").run(feeds)["actions"]
    assert scaled(policy.run(feeds)["actions"], ref) <= ACTIONS_TOL


def bad(feeds: dict[str, np.ndarray], **change) -> dict[str, np.ndarray]:
    return {**feeds, **change}


@pytest.mark.parametrize("change, message", [
    (lambda f: {"images": f["images"][:, :1]}, "1 views, this bundle was compiled for 2"),
    (lambda f: {"prompt_ids": np.zeros((1, 17), np.int64), "prompt_mask": np.ones((1, 17), bool)},
     "longer than the compiled maximum 16"),
    (lambda f: {"state": np.zeros((1, 7), np.float32)}, "state: axis 1 has size 7, expected 32"),
    (lambda f: {"state": np.full((1, 32), np.nan, np.float32)}, "state: contains NaN"),
    (lambda f: {"images": f["images"].astype(np.float64)}, "images: dtype float64, expected float32"),
    (lambda f: {"images": f["images"] * 255}, r"images must lie in \[0, 1\]"),
    (lambda f: {"prompt_ids": f["prompt_ids"] + 5000}, r"prompt_ids must lie in \[0, 1000\)"),
])
def test_bad_input_is_one_line_error(policy, change, message):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=1, seed=12)
    with pytest.raises(WalkforgeError, match=message) as info:
        policy.run(bad(feeds, **change(feeds)))
    assert "\n" not in str(info.value)


def test_in_place_output_is_the_callers_own_buffer(policy):
    """An aliased output must be the caller's array itself: onnxruntime's OrtValue for it would
    not keep a temporary numpy buffer alive (reading it later read freed memory)."""
    seen = {}
    policy.chain.observer = lambda walk, inputs, _s: seen.setdefault(walk, dict(inputs))
    try:
        policy.run(pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=1, seed=14), num_steps=1)
    finally:
        policy.chain.observer = None
    engine = policy.engines["prefill"]
    feeds = {k: np.array(v.numpy() if hasattr(v, "numpy") else v) for k, v in seen["prefill"].items()}
    pool = np.zeros_like(feeds["kv_pool"])
    out = engine.run({**feeds, "kv_pool": pool})
    assert out["kv_pool_out"] is pool and np.abs(pool).max() > 0
