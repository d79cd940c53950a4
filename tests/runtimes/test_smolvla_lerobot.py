"""LeRobot's own SmolVLA folders and actions (tests/fixtures/lerobot/v<release>/smolvla*/, written and
computed by LeRobot 0.6.1 itself: scripts/lerobot_smolvla_fixtures.py) against walkforge's `smolvla`
recipe: each folder compiles with the offline SmolVLM2-like folder as `--tokenizer`
(tests/fixtures/lerobot/smolvlm2-tiny: its config.json gives the VLM's sizes and head counts, its
tokenizer is bundled), and walkforge's actions equal LeRobot's for the same raw observations and
noise — predict_action_chunk, the model-space chunk and select_action — on the cpu and torch
backends. The observations cover both cameras (non-square frames, so the top / left padding of
SmolVLA's resize shows), one camera missing (SmolVLA drops it), a task longer than
tokenizer_max_length (truncated) and a batch of 2 whose tasks LeRobot pads to the longer one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_lerobot_parity import FIXTURES, LEROBOT_TOL, observation, reference, rel_err

import walkforge

VLM = FIXTURES / "smolvlm2-tiny"
CASES = sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in FIXTURES.glob("v*/smolvla*/reference.json"))
BACKENDS = ("cpu", "torch")
# LEROBOT_TOL (test_lerobot_parity): the same bound as pi0 / pi05, LeRobot's torch fp32 vs walkforge's
# engines on tiny random weights, relative to the chunk's largest magnitude; only fp32 rounding
# separates the two (summation order, fused kernels), 10 Euler steps of it. `observation` gives a
# batched observation's list of tasks as LeRobot was fed it.


@pytest.fixture(scope="module")
def bundles(compiled):
    """case → its compiled bundle (fp32; the VLM folder as --tokenizer; reference.json's
    walkforge_config as --config when it has one: none is needed, head counts are in the VLM's
    config.json)."""

    def get(case: str) -> Path:
        meta, _ = reference(case)
        overrides = meta.get("walkforge_config") or {}
        config_file = None
        if overrides:
            name = f"smolvla-config-{case.replace('/', '-')}"
            folder = compiled.inputs(name, lambda d: (d / "config.json").write_text(json.dumps(overrides)))
            config_file = folder / "config.json"
        return compiled("smolvla", checkpoint=FIXTURES / case / "folder", config_file=config_file,
                        tokenizer=VLM, gpu_archs=())

    return get


def test_fixtures_are_there():
    assert "v0.6.1/smolvla" in CASES
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in VLM.iterdir()}
    for case in CASES:
        meta, arrays = reference(case)
        assert meta["policy_type"] == "smolvla"
        assert set(meta["observations"]) == {"a", "b", "c", "d"}
        assert meta["observations"]["c"]["truncated"] and meta["observations"]["d"]["batch"] == 2
        assert arrays["d.chunk"].shape[0] == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_chunks_equal_lerobots(bundles, case, backend):
    meta, arrays = reference(case)
    policy = walkforge.load(bundles(case), backend=backend)
    for name, seen in meta["observations"].items():
        batched = seen["batch"] is not None
        obs = observation(meta, arrays, name)
        noise = arrays[f"{name}.noise"] if batched else arrays[f"{name}.noise"][0]
        chunk = policy.predict_action_chunk(obs, noise=noise)
        err = rel_err(chunk, arrays[f"{name}.chunk"])
        prepared = policy.processor.prepare(obs)
        ids, mask = prepared.feeds["prompt_ids"], prepared.feeds["prompt_mask"].astype(bool)
        want_ids = np.atleast_2d(arrays[f"{name}.pre.tokens"])
        want_mask = np.atleast_2d(arrays[f"{name}.pre.attention_mask"])
        for row in range(len(want_ids)):  # LeRobot pads to the longest task, walkforge may pad further
            assert ids[row][mask[row]].tolist() == want_ids[row][want_mask[row]].tolist(), (name, row)
        feeds = {k: prepared.feeds[k] for k in policy.inputs}
        model = policy.infer(**feeds, noise=noise if batched else noise[None])[..., :chunk.shape[-1]]
        model_err = rel_err(model if batched else model[0], arrays[f"{name}.chunk_model"])
        print(f"{case} {backend} {name}: chunk rel err {err:.2e}, model-space {model_err:.2e}")
        assert err <= LEROBOT_TOL, (name, seen["omits"], seen["truncated"], err)
        assert model_err <= LEROBOT_TOL, (name, model_err)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_select_action_equals_lerobots(bundles, case, backend):
    meta, arrays = reference(case)
    policy = walkforge.load(bundles(case), backend=backend)
    noises = iter(arrays["select.noise"][:, 0])
    steps = json.loads((bundles(case) / "manifest.json").read_text())["policy"]["n_action_steps"]
    worst = 0.0
    for call, state in enumerate(arrays["select.state"]):
        noise = next(noises) if call % steps == 0 else None
        fed = observation(meta, arrays, meta["select_action"]["observation"][0], state)
        action = policy.select_action(fed, noise)
        err = rel_err(action, arrays["select.action"][call])
        worst = max(worst, err)
        assert err <= LEROBOT_TOL, (call, err)
    print(f"{case} {backend} select_action: worst rel err {worst:.2e} over {call + 1} calls")
