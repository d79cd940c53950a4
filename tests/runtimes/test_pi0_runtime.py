"""pi0 bundles: the chained engines over the shared page pool vs the recipe's dense eager reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import PI0_TINY_ACTIONS_TOL, cosine, rel_err

import walkforge
from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.runtimes.backends.torch import build_model

PI0 = get_recipe("pi0")

ACTIONS_TOL = PI0_TINY_ACTIONS_TOL  # rel_err of the bundle's engines vs the recipe's eager reference
BATCH_TOL = PI0_TINY_ACTIONS_TOL  # a request in a batch vs alone: other GEMM shapes, other blocking


@pytest.fixture(scope="module")
def bundle(compiled) -> Bundle:
    return Bundle.open(compiled("pi0", variant="tiny", seed=3, gpu_archs=()))


@pytest.fixture(scope="module")
def policy(bundle):
    return walkforge.load(bundle.root, spinning=False)


def reference(bundle: Bundle, feeds: dict[str, np.ndarray], num_steps: int | None = None) -> np.ndarray:
    """The recipe's dense eager `sample_actions` with the bundle's weights."""
    _, _, model = build_model(bundle)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        return model.sample_actions(t["images"], t["image_masks"], t["prompt_ids"], t["prompt_mask"],
                                    t["state"], t["noise"], num_steps).numpy()


def test_bundle_matches_eager_reference(bundle, policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=5)
    got = policy.run(feeds)["actions"]
    assert got.shape == (2, 50, 32)
    assert rel_err(got, reference(bundle, feeds)) <= ACTIONS_TOL


def test_num_steps_is_a_run_time_setting(bundle, policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=1, seed=6)
    three = policy.run(feeds, num_steps=3)["actions"]
    assert rel_err(three, reference(bundle, feeds, num_steps=3)) <= ACTIONS_TOL
    assert rel_err(three, policy.run(feeds)["actions"]) > 1e-3  # 3 steps are not 10: far above any TOL


def test_batch_of_different_prompt_lengths_equals_each_alone(policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=3, seed=7)
    assert len(set(feeds["prompt_mask"].sum(1))) == 3
    together = policy.run(feeds)["actions"]
    for b in range(3):
        alone = policy.run({k: v[b : b + 1] for k, v in feeds.items()})["actions"]
        assert rel_err(together[b], alone[0]) <= BATCH_TOL


def bound_pools(policy, feeds) -> list:
    """The kv_pool value every engine call was given during one run."""
    seen = []
    policy.chain.observer = lambda _walk, inputs, _s: seen.append(inputs.get("kv_pool"))
    try:
        policy.run(feeds)
    finally:
        policy.chain.observer = None
    return [p for p in seen if p is not None]


def test_pool_is_written_in_place_and_shared_by_reference(policy):
    paging = policy.paging
    buffer = paging.buffer
    address = buffer.ctypes.data
    buffer[...] = 0.0
    pools = bound_pools(policy, PI0.fake_inputs(PI0.variant("tiny"), batch=1, seed=8))
    assert paging.buffer is buffer and buffer.ctypes.data == address  # never reallocated
    assert len(pools) == 1 + 10 and all(p is buffer for p in pools)  # prefill + denoise: this very buffer
    written = np.abs(buffer).reshape(buffer.shape[0], 2, paging.pages.num_pages, -1).max(-1)
    assert (written > 0).any()  # prefill's KVCacheWrite landed in the caller-visible buffer
    used = (written > 0).any(axis=(0, 1)).nonzero()[0]
    assert used.tolist() == list(range(len(used)))  # only the pages handed out were touched
    assert np.isfinite(buffer).all() and np.abs(buffer).max() < 100


def test_prefill_writes_are_deterministic(policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=13)
    snapshots = []
    for _ in range(2):
        policy.paging.buffer[...] = 0.0
        policy.run(feeds, num_steps=1)
        snapshots.append(policy.paging.buffer.copy())
    assert np.array_equal(*snapshots)


def test_pages_are_freed_after_every_call(policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=9)
    for _ in range(5):
        policy.run(feeds, num_steps=1)
    assert policy.paging.pages.free_pages == policy.paging.pages.num_pages


def test_exhausted_pool_is_a_clear_error(bundle):
    small = walkforge.load(bundle.root, kv_pages=40)
    with pytest.raises(WalkforgeError, match=r"KV page pool exhausted: need \d+ pages .* 40 free of 40"):
        small.run(PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=0))
    assert small.paging.pages.free_pages == 40


def test_threads_share_one_policy_and_its_pool(policy):
    """4 threads × 20 calls on one loaded policy (different inputs, batch 1 and 2): each result
    equals the serial one and every page is free at the end."""
    from concurrent.futures import ThreadPoolExecutor

    tiny = PI0.variant("tiny")
    inputs = [PI0.fake_inputs(tiny, batch=1 + k % 2, seed=100 + k) for k in range(80)]
    serial = [policy.run(f, num_steps=2)["actions"] for f in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda f: policy.run(f, num_steps=2)["actions"], inputs))
    for k, (got, want) in enumerate(zip(threaded, serial, strict=True)):
        assert np.array_equal(got, want), f"call {k}: max diff {np.abs(got - want).max()}"
    assert policy.paging.pages.free_pages == policy.paging.pages.num_pages


def test_seeded_noise_is_reproducible(policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=1, seed=10)
    del feeds["noise"]
    a, b = policy.infer(**feeds), policy.infer(**feeds)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, policy.infer(**feeds, seed=1))


def test_torch_backend_matches_cpu_engines(bundle, policy):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=11)
    ref = walkforge.load(bundle.root, backend="torch").run(feeds)["actions"]
    assert rel_err(policy.run(feeds)["actions"], ref) <= ACTIONS_TOL


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
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=1, seed=12)
    with pytest.raises(WalkforgeError, match=message) as info:
        policy.run(bad(feeds, **change(feeds)))
    assert "\n" not in str(info.value)


def test_in_place_output_is_the_callers_own_buffer(policy):
    """An aliased output must be the caller's array itself: onnxruntime's OrtValue for it would
    not keep a temporary numpy buffer alive (reading it later read freed memory)."""
    seen = {}
    policy.chain.observer = lambda walk, inputs, _s: seen.setdefault(walk, dict(inputs))
    try:
        policy.run(PI0.fake_inputs(PI0.variant("tiny"), batch=1, seed=14), num_steps=1)
    finally:
        policy.chain.observer = None
    engine = policy.engines["prefill"]
    feeds = {k: np.array(v.numpy() if hasattr(v, "numpy") else v) for k, v in seen["prefill"].items()}
    pool = np.zeros_like(feeds["kv_pool"])
    out = engine.run({**feeds, "kv_pool": pool})
    assert out["kv_pool_out"] is pool and np.abs(pool).max() > 0


NO_COMPILE_STACK = """
import sys
class Block:  # the runtime core must not need the compile extra (torch, Triton, onnxscript)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "triton", "onnxscript", "onnx_ir", "transformers", "diffusers"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
import walkforge
feeds = dict(np.load(sys.argv[2]))
policy = walkforge.load(sys.argv[1])
np.save(sys.argv[3], policy.run(feeds)["actions"])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton")))
"""


def test_cpu_runtime_runs_without_torch_or_triton(bundle, policy, tmp_path):
    """`walkforge.load` on CPU needs only the runtime core (numpy, onnx, onnxruntime, ml_dtypes,
    safetensors): what installs on Jetson and macOS, where the pinned torch or Triton do not."""
    import subprocess
    import sys

    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=12)
    np.savez(tmp_path / "in.npz", **feeds)
    args = [str(bundle.root), str(tmp_path / "in.npz"), str(tmp_path / "out.npy")]
    result = subprocess.run([sys.executable, "-c", NO_COMPILE_STACK, *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"  # neither was imported
    assert np.array_equal(np.load(tmp_path / "out.npy"), policy.run(feeds)["actions"])


# ---------------------------------------------------------------- masked cameras cost nothing

PATTERNS_3 = [p for p in np.ndindex(2, 2, 2) if any(p)]  # every camera pattern of 3 but none


@pytest.fixture(scope="module")
def three_views(compiled) -> Bundle:
    """tiny with three camera slots (robots often compile three and fill two)."""
    import json

    def write(folder):
        (folder / "views.json").write_text(json.dumps({"num_views": 3}))

    config = compiled.inputs("pi0-views3", write) / "views.json"
    return Bundle.open(compiled("pi0", variant="tiny", seed=4, gpu_archs=(), config_file=config))


def walk_inputs(policy, feeds: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, tuple]], np.ndarray]:
    """(the input shapes each walk was first called with, the actions)."""
    from walkforge.runtimes.values import to_numpy

    seen: dict[str, dict[str, tuple[int, ...]]] = {}
    policy.chain.observer = lambda walk, inputs, _s: seen.setdefault(
        walk, {k: to_numpy(v).shape for k, v in inputs.items()})
    try:
        actions = policy.run(feeds)["actions"]
    finally:
        policy.chain.observer = None
    return seen, actions


@pytest.mark.parametrize("pattern", PATTERNS_3, ids=lambda p: "".join("x" if v else "-" for v in p))
def test_masked_cameras_are_not_run_and_actions_match(three_views, pattern):
    cfg = PI0.variant("tiny")
    policy = walkforge.load(three_views.root, spinning=False)
    feeds = PI0.fake_inputs(type(cfg)(**{**cfg.__dict__, "num_views": 3}), batch=1, seed=11)
    feeds["image_masks"] = np.array([pattern], dtype=bool)
    feeds["prompt_mask"][0, 10:] = False  # 10 of 16 prompt tokens
    seen, got = walk_inputs(policy, feeds)
    assert seen["vision"]["images"][1] == sum(pattern)  # only the valid cameras are encoded
    assert seen["prefill"]["image_tokens"][1] == 256 * sum(pattern)  # compacted prefix
    assert seen["prefill"]["prompt_ids"][1] == 10
    assert rel_err(got, reference(three_views, feeds)) <= ACTIONS_TOL  # reference: all 3 slots, masked


def test_batch_compacts_to_the_most_cameras_any_request_has(three_views):
    cfg = PI0.variant("tiny")
    policy = walkforge.load(three_views.root, spinning=False)
    feeds = PI0.fake_inputs(type(cfg)(**{**cfg.__dict__, "num_views": 3}), batch=3, seed=12)
    feeds["image_masks"] = np.array([[False, True, False], [True, False, True], [False, False, True]])
    seen, got = walk_inputs(policy, feeds)
    assert seen["vision"]["images"][:2] == (3, 2)
    assert rel_err(got, reference(three_views, feeds)) <= ACTIONS_TOL
    for i in range(3):  # each request alone (one camera, two, one) gives its own actions
        alone = {k: v[i:i + 1] for k, v in feeds.items()}
        assert rel_err(got[i:i + 1], policy.run(alone)["actions"]) <= BATCH_TOL


def test_compact_keeps_valid_cameras_in_order():
    from walkforge.runtimes.fronts.pi0 import compact

    images = np.arange(2 * 3).reshape(2, 3, 1, 1, 1).astype(np.float32)
    masks = np.array([[False, True, True], [True, False, False]])
    ids = np.array([[5, 6, 0, 0], [7, 0, 0, 0]])
    out = compact(images, masks, ids, ids > 0)
    # request 1: its camera 0, then one masked slot (request 0 has two cameras)
    assert out["images"][:, :, 0, 0, 0].tolist() == [[1, 2], [3, 4]]
    assert out["image_masks"].tolist() == [[True, True], [True, False]]
    assert out["prompt_ids"].tolist() == [[5, 6], [7, 0]]
    none = compact(images, np.zeros((2, 3), bool), ids, np.zeros_like(ids, bool))
    assert none["images"].shape[1] == 1 and none["prompt_ids"].shape[1] == 1  # never an empty walk


# ---------------------------------------------------------------- torch-bf16 reference, bench ratios

BF16_COSINE_MIN = 0.999  # bf16 GEMMs (8 mantissa bits) on tiny pi0 vs fp32 (measured ≈ 0.99999)


def test_torch_bf16_backend_runs_the_modules_under_autocast(bundle):
    feeds = PI0.fake_inputs(PI0.variant("tiny"), batch=2, seed=13)
    got = walkforge.load(bundle.root, "torch-bf16").run(feeds)["actions"]
    want = reference(bundle, feeds)
    assert got.dtype == np.float32
    assert cosine(got, want) >= BF16_COSINE_MIN
    assert rel_err(got, want) > ACTIONS_TOL  # really bf16, not the fp32 modules


def test_bench_reports_ratios_to_both_references():
    from walkforge.tools.bench import REFERENCES, _ratios, ratio_key

    def run(end_to_end: float, vision: float) -> dict:
        return {"end_to_end": {"median_ms": end_to_end}, "walks": {"vision": {"median_ms": vision}}}

    results = {"cpu": run(10.0, 2.0), "torch": run(20.0, 8.0), "torch-bf16": run(12.5, 4.0)}
    assert [ratio_key(r) for r in REFERENCES] == ["ratio_vs_torch", "ratio_vs_torch_bf16"]
    assert _ratios(results, "torch")["cpu"] == {"end_to_end": 0.5, "vision": 0.25}
    assert _ratios(results, "torch-bf16")["cpu"] == {"end_to_end": 0.8, "vision": 0.5}


def test_bench_prints_the_cpu_flags_it_measured_on():
    """The machine line is printed as text: '[avx2]' is not swallowed as console markup."""
    from rich.console import Console

    from walkforge.tools.render import show_bench

    stat = {"median_ms": 10.0, "p90_ms": 11.0, "n": 1}
    report = {"machine": "Linux AMD EPYC [avx2], 2 cores, Python 3.11.7", "batch": 1,
              "results": {"cpu": {"end_to_end": stat, "walks": {"vision": stat}}}}
    console = Console(record=True, width=200)
    show_bench(console, report)
    text = console.export_text()
    assert "Linux AMD EPYC [avx2], 2 cores" in text
    assert "× torch" not in text and "ref" not in text  # no reference ran: no ratio column


def test_only_the_loop_body_keeps_spinning_after_a_run(bundle) -> None:
    """Each walk's session has its own thread pool; vision's and prefill's stop spinning when a
    run returns (their cores go to the next walk's session), denoise's, which runs again right
    after itself, keep spinning. `spinning=False` sessions never spin."""
    from walkforge.graphs.ort import STOP_SPINNING_AFTER_RUN

    def stops(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry(STOP_SPINNING_AFTER_RUN) == "1"
        except RuntimeError:  # "does not have configuration": not set
            return False

    spinning = walkforge.load(bundle.root).engines
    assert {name: stops(e.session) for name, e in spinning.items()} == {
        "vision": True, "prefill": True, "denoise": False, "guide": True}  # guide: RTC, runs after denoise
    quiet = walkforge.load(bundle.root, spinning=False).engines
    assert not any(stops(e.session) for e in quiet.values())
    assert all(e.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0" for e in quiet.values())


def test_engines_use_every_physical_core_unless_told(bundle) -> None:
    """#15 item 3: by default every walk's session runs on all physical cores (SMT siblings once);
    `threads=N` (`--threads N`) sets them all to N."""
    from walkforge.runtimes.backends.cpu import physical_cores

    def threads(policy) -> set[int]:
        return {e.session.get_session_options().intra_op_num_threads for e in policy.engines.values()}

    assert threads(walkforge.load(bundle.root, spinning=False)) == {physical_cores()}
    assert threads(walkforge.load(bundle.root, spinning=False, threads=3)) == {3}
