"""pi0 bundles with an fp8 (E4M3) KV page pool: 1-byte pages written in place, per-layer scales
from calibration, actions vs the fp32 eager reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import walkforge
from walkforge.artifacts.bundle import Bundle
from walkforge.compiler.pipeline import CompileRequest, compile_bundle
from walkforge.recipes import pi0
from walkforge.runtimes.torch_backend import build_model

COSINE = {"kv": 0.999, "weights+kv": 0.999}  # actions vs the fp32 eager reference
BATCH_TOL = 1e-5  # a request in a batch vs alone (measured: identical)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    out = tmp_path_factory.mktemp("pi0") / "tiny-kv8"
    compile_bundle(CompileRequest("pi0", out, variant="tiny", seed=3, gpu_archs=("sm_90",), kv_dtype="fp8"))
    return Bundle.open(out)


@pytest.fixture(scope="module")
def policy(bundle):
    return walkforge.load(bundle.root, spinning=False)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference(bundle: Bundle, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The recipe's dense fp32 `sample_actions` with the bundle's weights."""
    _, _, model = build_model(bundle)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        return model.sample_actions(t["images"], t["image_masks"], t["prompt_ids"], t["prompt_mask"],
                                    t["state"], t["noise"]).numpy()


def test_manifest_records_fp8_pool_and_scales(bundle):
    m = bundle.manifest
    layers = m["config"]["llm"]["layers"]
    assert m["precision"]["kv"] == "fp8_e4m3" and m["precision"]["weights"] == "fp32"
    scales = np.asarray(m["kv_cache"]["scales"])
    assert scales.shape == (layers, 2) and (scales > 0).all()
    np.testing.assert_allclose(scales, np.asarray(m["kv_cache"]["amax"]) / 448, rtol=1e-6)
    assert np.array_equal(load_file(str(bundle.path(m["kv_cache"]["scales_file"])))["kv_scales"],
                          scales.astype(np.float32))
    for walk in ("prefill", "denoise"):
        pool = {s["name"]: s["dtype"] for s in m["walks"][walk]["inputs"]}
        assert pool["kv_pool"] == "float8_e4m3fn" and pool["kv_scales"] == "float32"
    assert {r["kernel"] for r in m["kernels"]} == {"kv_cache_write_kernel_fp8", "paged_attention_kernel_fp8"}
    assert m["kv_cache"]["vs_fp32"]["cosine"] >= COSINE["kv"]


def test_actions_match_fp32_reference(bundle, policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=2, seed=5)
    got = policy.run(feeds)["actions"]
    assert cosine(got, reference(bundle, feeds)) >= COSINE["kv"]


def test_pool_is_one_byte_per_value_and_written_in_place(policy):
    pool = policy.pool
    assert pool.buffer.dtype == ml_dtypes.float8_e4m3fn and pool.buffer.itemsize == 1
    address = pool.buffer.ctypes.data
    pool.buffer[...] = 0
    policy.run(pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=1, seed=8))
    assert pool.buffer.ctypes.data == address and policy._pool_value.data_ptr() == address
    written = pool.buffer.view(np.uint8).reshape(pool.buffer.shape[0], 2, pool.num_pages, -1).any(-1)
    used = written.any(axis=(0, 1)).nonzero()[0]
    assert used.size and used.tolist() == list(range(used.size))  # the handed-out pages, in place
    values = pool.buffer.astype(np.float32)
    assert np.isfinite(values).all() and np.abs(values).max() <= 448


def test_batch_equals_each_alone(policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=3, seed=7)
    together = policy.run(feeds)["actions"]
    for b in range(3):
        alone = policy.run({k: v[b : b + 1] for k, v in feeds.items()})["actions"][0]
        assert np.abs(together[b] - alone).max() <= BATCH_TOL


def test_torch_backend_stays_the_fp32_reference(bundle, policy):
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=1, seed=11)
    runner = walkforge.load(bundle.root, backend="torch")
    assert runner.pool.buffer.dtype == np.float32
    ref = runner.run(feeds)["actions"]
    np.testing.assert_allclose(ref, reference(bundle, feeds), atol=1e-4)
    assert cosine(policy.run(feeds)["actions"], ref) >= COSINE["kv"]


def test_fp8_weights_and_fp8_kv(tmp_path):
    out = tmp_path / "tiny-w8-kv8"
    compile_bundle(CompileRequest("pi0", out, variant="tiny", seed=3, precision="fp8", calib_samples=4,
                                  gpu_archs=(), kv_dtype="fp8"))  # fmt: skip
    bundle = Bundle.open(out)
    assert bundle.manifest["precision"]["kv"] == "fp8_e4m3"
    assert bundle.manifest["precision"]["weights"] == "fp8_e4m3"
    feeds = pi0.fake_inputs(pi0.VARIANTS["tiny"], batch=2, seed=5)
    got = walkforge.load(out, spinning=False).run(feeds)["actions"]
    assert cosine(got, reference(bundle, feeds)) >= COSINE["weights+kv"]


def test_reuse_calibration_takes_the_kv_scales_too(bundle, tmp_path):
    from walkforge.compiler.pipeline import CompileRequest, compile_bundle

    again = compile_bundle(CompileRequest("pi0", tmp_path / "again", variant="tiny", seed=3,
                                          kv_dtype="fp8", gpu_archs=(), reuse_calibration=bundle.root))
    assert again["kv_cache"]["scales"] == bundle.manifest["kv_cache"]["scales"]
    assert again["kv_cache"]["reused_from"] == str(bundle.root)
