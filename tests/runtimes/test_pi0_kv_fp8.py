"""pi0 bundles with an fp8 (E4M3) KV page pool: 1-byte pages written in place, per-layer scales
from calibration, actions vs the fp32 eager reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tolerances import FP32_EPS, PI0_TINY_ACTIONS_TOL, cosine, rel_err

import walkforge
from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts.bundle import Bundle
from walkforge.recipes import get_recipe
from walkforge.runtimes.backends.torch import build_model

PI0 = get_recipe("pi0")

COSINE = {"kv": 0.999, "weights+kv": 0.999}  # actions vs the fp32 eager reference (measured ≥ 0.9998)
# rel_err of a request in a batch vs alone. Other GEMM shapes may round a K/V value 1 ulp apart and
# so flip its E4M3 rounding by a step (2**-3 relative); measured: one such flip moves actions by 1e-4
# (1-ulp noise on the images), so 1e-3 allows several. Requests mixing their pages moves them by 1e-1.
BATCH_TOL = 1e-3
SCALE_RTOL = FP32_EPS  # the manifest's scales are amax / 448 rounded once to float32 (≤ eps / 2)


@pytest.fixture(scope="module")
def bundle(compiled) -> Bundle:
    return Bundle.open(compiled("pi0", variant="tiny", seed=3, gpu_archs=("sm_90",), kv_dtype="fp8"))


@pytest.fixture(scope="module")
def policy(bundle):
    return walkforge.load(bundle.root, spinning=False)


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
    np.testing.assert_allclose(scales, np.asarray(m["kv_cache"]["amax"]) / 448, rtol=SCALE_RTOL, atol=0)
    assert np.array_equal(load_file(str(bundle.path(m["kv_cache"]["scales_file"])))["kv_scales"],
                          scales.astype(np.float32))
    for walk in ("prefill", "denoise"):
        pool = {s["name"]: s["dtype"] for s in m["walks"][walk]["inputs"]}
        assert pool["kv_pool"] == "float8_e4m3fn" and pool["kv_scales"] == "float32"
    assert {r["kernel"] for r in m["kernels"]} == {"kv_cache_write_kernel_fp8", "paged_attention_kernel_fp8"}
    assert m["kv_cache"]["vs_fp32"]["cosine"] >= COSINE["kv"]


def test_actions_match_fp32_reference(bundle, policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=5)
    got = policy.run(feeds)["actions"]
    assert cosine(got, reference(bundle, feeds)) >= COSINE["kv"]


def test_pool_is_one_byte_per_value_and_written_in_place(policy):
    buffer = policy.paging.buffer
    assert buffer.dtype == ml_dtypes.float8_e4m3fn and buffer.itemsize == 1
    address = buffer.ctypes.data
    buffer[...] = 0
    seen = []
    policy.chain.observer = lambda _walk, inputs, _s: seen.append(inputs.get("kv_pool"))
    policy.run(PI0.fake_inputs(PI0.variant("tiny"), batch=1, seed=8))
    policy.chain.observer = None
    assert buffer.ctypes.data == address and all(p is buffer for p in seen if p is not None)
    written = buffer.view(np.uint8).reshape(buffer.shape[0], 2, policy.paging.pages.num_pages, -1).any(-1)
    used = written.any(axis=(0, 1)).nonzero()[0]
    assert used.size and used.tolist() == list(range(used.size))  # the handed-out pages, in place
    values = buffer.astype(np.float32)
    assert np.isfinite(values).all() and np.abs(values).max() <= 448


def test_batch_equals_each_alone(policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=3, seed=7)
    together = policy.run(feeds)["actions"]
    for b in range(3):
        alone = policy.run({k: v[b : b + 1] for k, v in feeds.items()})["actions"][0]
        assert rel_err(together[b], alone) <= BATCH_TOL


def test_torch_backend_stays_the_fp32_reference(bundle, policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=1, seed=11)
    runner = walkforge.load(bundle.root, backend="torch")
    assert runner.paging.buffer.dtype == torch.float32
    ref = runner.run(feeds)["actions"]
    assert rel_err(ref, reference(bundle, feeds)) <= PI0_TINY_ACTIONS_TOL  # fp32 pool: both fp32 torch
    assert cosine(policy.run(feeds)["actions"], ref) >= COSINE["kv"]


def test_fp8_weights_and_fp8_kv(tmp_path):
    out = tmp_path / "tiny-w8-kv8"
    compile_bundle(CompileRequest("pi0", out, variant="tiny", seed=3, precision="fp8", calib_samples=4,
                                  gpu_archs=(), kv_dtype="fp8"))  # fmt: skip
    bundle = Bundle.open(out)
    assert bundle.manifest["precision"]["kv"] == "fp8_e4m3"
    assert bundle.manifest["precision"]["weights"] == "fp8_e4m3"
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=5)
    got = walkforge.load(out, spinning=False).run(feeds)["actions"]
    assert cosine(got, reference(bundle, feeds)) >= COSINE["weights+kv"]


def test_reuse_calibration_takes_the_kv_scales_too(bundle, tmp_path):
    from walkforge import CompileRequest, compile_bundle

    again = compile_bundle(CompileRequest("pi0", tmp_path / "again", variant="tiny", seed=3,
                                          kv_dtype="fp8", gpu_archs=(), reuse_calibration=bundle.root))
    assert again["kv_cache"]["scales"] == bundle.manifest["kv_cache"]["scales"]
    assert again["kv_cache"]["reused_from"] == str(bundle.root)
