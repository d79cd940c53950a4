"""pi0 tiny end to end on the GPU backends: `walkforge.load(bundle, backend=B)` for B in torch-cuda,
cuda and trt, checked by `walkforge.tools.verify` against the fp32 torch reference on CPU, per walk
and end to end, for a float32 and an fp8 KV page pool. A backend this machine cannot run skips with
walkforge's one-line reason (what `walkforge.load` or the TensorRT build raises).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

GPU_BACKENDS = ("torch-cuda", "cuda", "trt")
COMPUTE = {"torch-cuda": "bf16", "cuda": "fp32", "trt": "fp32"}  # cuda and trt build with TF32 off
COSINE_LOSS = {"bf16": 1e-3, "fp8": 1e-3}
"""1 - cosine of each walk's outputs and of the actions that one reduced-precision stage (bf16
compute, an fp8 KV pool) may cost vs the fp32 reference. 1 - cos ≈ ½ (relative RMS error)², and
independent errors add in quadrature, so the losses of two stages add. 1e-3 allows a 4.5% RMS
error: bf16 autocast on pi0 measured cosine 1.0000 on CPU (docs/benchmarks.md); the fp8 pool of this
bundle on the cpu backend measured 0.99965 for the pool itself (the prefill walk) and 0.999999
for the actions; a wrong mask, scale or kernel costs far more."""
FP32_REL = 1e-4
"""Max abs error / output scale of an all-fp32 GPU backend: the same maths as the CPU reference summed
in other orders. The cpu backend measured <= 1e-6 on every walk of this bundle; the CPU bundle tests
hold it to 1e-4 too (tests/runtimes/test_pi0_runtime.py)."""


@pytest.fixture(scope="module", params=["fp32", "fp8"], ids=lambda kv: f"kv-{kv}")
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pi0 tiny (random weights, seed 0) with its kernels built for this GPU's arch."""
    import walkforge
    from walkforge.plugins.aot import FP8_MIN_ARCH

    major, minor = torch.cuda.get_device_capability()
    if request.param == "fp8" and major * 10 + minor < FP8_MIN_ARCH:
        pytest.skip(f"an fp8 KV pool needs sm_{FP8_MIN_ARCH} or later; this GPU is sm_{major}{minor}")
    out = tmp_path_factory.mktemp("pi0") / f"tiny-kv-{request.param}"
    job = walkforge.CompileRequest("pi0", out, variant="tiny", seed=0, kv_dtype=request.param,
                                   gpu_archs=(f"sm_{major}{minor}",))  # fmt: skip
    walkforge.compile_bundle(job)
    return out


def runnable(bundle: Path, backend: str) -> Path:
    """The bundle `backend` runs (trt: a copy with engines built for this GPU); skips with walkforge's
    reason where this machine cannot run `backend`."""
    import walkforge
    from walkforge.errors import WalkforgeError

    try:
        if backend == "trt":
            from walkforge.runtimes.backends.trt.build import build_trt

            bundle = Path(shutil.copytree(bundle, bundle.with_name(f"{bundle.name}-trt"), dirs_exist_ok=True))
            build_trt(bundle)
        walkforge.load(bundle, backend=backend)
    except WalkforgeError as exc:
        pytest.skip(str(exc))
    return bundle


def kv_dtype(bundle: Path) -> str:
    return bundle.name.removeprefix("tiny-kv-")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_matches_the_fp32_reference(bundle, backend):
    from walkforge.artifacts.bundle import Bundle
    from walkforge.tools.verify import verify

    kv = kv_dtype(bundle)
    result = verify(Bundle.open(runnable(bundle, backend)), backend, batch=2)
    losses = [COSINE_LOSS[stage] for stage in (COMPUTE[backend], kv) if stage in COSINE_LOSS]
    for name, agreement in (result["walks"] | result["end_to_end"]).items():
        if losses:
            assert agreement["cosine"] >= 1 - sum(losses), (name, agreement)
        else:
            assert agreement["rel"] <= FP32_REL, (name, agreement)


@pytest.mark.gpu
def test_torch_cuda_replays_its_graph_to_the_same_actions(bundle):
    """The second call replays the captured denoise loop over the resident pool: same actions, and a
    different request after it is not disturbed by the first."""
    import walkforge
    from walkforge.artifacts.bundle import Bundle
    from walkforge.recipes.inputs import example_inputs

    runner = walkforge.load(runnable(bundle, "torch-cuda"), backend="torch-cuda")
    first_feeds, other_feeds = (example_inputs(Bundle.open(bundle), batch=2, seed=s) for s in (1, 2))
    first = runner.run(first_feeds)["actions"]
    other = runner.run(other_feeds)["actions"]
    assert np.array_equal(runner.run(first_feeds)["actions"], first)
    assert np.array_equal(runner.run(other_feeds)["actions"], other)
    assert not np.array_equal(first, other)
