"""The prepared GPU script (gpu_check.py) on CPU: its table, its skipping and error rows, and the
bundle-free torch-cuda chain it times, run here with the torch backend's engines on `tiny` pi0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import PI0_TINY_ACTIONS_TOL, rel_err

from tests.gpu import gpu_check


def test_without_a_gpu_every_section_is_one_skipped_row(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_missing", lambda: "no CUDA device: test")
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| section | item | result | detail |" and table[1] == "|---|---|---|---|"
    assert [line.split(" | ")[0].strip("| ") for line in table[2:]] == ["pi0", "kernels", "aot", "attention"]
    assert all("skipped | no CUDA device: test" in line for line in table[2:])


def test_a_failing_section_reports_its_error_and_the_rest_still_run():
    def broken() -> list:
        raise RuntimeError("driver said no\nsecond line")

    rows = gpu_check.run_sections([("a", broken), ("b", lambda: [("b", "x", "ok", "fine")])], budget_s=60)
    assert rows == [("a", "-", "ERROR", "RuntimeError: driver said no"), ("b", "x", "ok", "fine")]
    late = gpu_check.run_sections([("c", lambda: [])], budget_s=-1)
    assert late[0][2] == "skipped" and "budget" in late[0][3]
    assert "a\\|b" in gpu_check.markdown([("a|b", "", "", "")])


def test_bundle_free_chain_matches_sample_actions_on_tiny():
    """The chain gpu_check times for torch-cuda, built the same way with CPU engines: same actions
    as the recipe's eager sample_actions (so the GPU row measures the real walks)."""
    from walkforge.recipes.pi0.config import VARIANTS
    from walkforge.recipes.pi0.model import build
    from walkforge.recipes.pi0.walks import fake_inputs
    from walkforge.runtimes.backends.torch import TorchEngine
    from walkforge.runtimes.backends.torch import allocate_pool as cpu_pool

    cfg = VARIANTS["tiny"]
    torch.manual_seed(0)
    model = build(cfg).eval()
    feeds = fake_inputs(cfg, batch=2, seed=1)
    engines = lambda walks: {n.name: TorchEngine(n) for n in walks.nodes}  # noqa: E731
    infer = gpu_check.torch_cuda_policy(model, cfg, engines,
                                        cpu_pool)  # fmt: skip
    got = infer(feeds)
    order = ("images", "image_masks", "prompt_ids", "prompt_mask", "state", "noise")
    with torch.inference_mode():
        want = model.sample_actions(*(torch.from_numpy(feeds[k]) for k in order), num_steps=10).numpy()
    assert (
        got.shape == want.shape
        and rel_err(torch.from_numpy(np.asarray(got)), torch.from_numpy(want)) <= PI0_TINY_ACTIONS_TOL
    )
    assert gpu_check.cosine(got, want) == pytest.approx(1.0, abs=1e-6)


def test_pi0_section_runs_on_cpu_with_tiny():
    """The pi0 section's code path (build, fp32 reference, bf16 eager, the chained engines, latency
    rows) on `tiny` on CPU; the chain runs the torch backend's fp32 engines (the eager CPU
    kv_cache_write takes K/V of the pool's dtype only; on CUDA the Triton kernel takes bf16)."""
    from walkforge.runtimes.backends.torch import TorchEngine
    from walkforge.runtimes.backends.torch import allocate_pool as cpu_pool

    def policy(model, cfg):
        engines = lambda w: {n.name: TorchEngine(n) for n in w.nodes}  # noqa: E731
        return gpu_check.torch_cuda_policy(model.float(), cfg, engines, cpu_pool)

    rows = gpu_check.pi0_rows(calls=2, warmup=1, variant="tiny", device="cpu", policy=policy)
    assert [row[1].split(" ")[0] for row in rows] == ["setup", "torch", "torch-cuda"]
    cosines = [float(row[3].split("cosine vs fp32 ")[1].split(";")[0]) for row in rows[1:]]
    assert all("median" in row[2] and "p90" in row[2] for row in rows[1:])
    assert 0.99 <= cosines[0] < 1.0  # bf16 eager differs from fp32, but little
    assert cosines[1] >= 0.99
