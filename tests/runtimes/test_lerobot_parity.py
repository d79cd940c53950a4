"""Every LeRobot release's own folders and actions (tests/fixtures/lerobot, written and computed by
LeRobot 0.4.4, 0.5.1 and 0.6.1 themselves: scripts/lerobot_fixtures.py): each folder compiles, the
release is read from it, and walkforge's actions equal LeRobot's for the same raw observations and
noise — chunks, the model-space chunk and select_action — on the cpu and torch backends. The
observations cover both cameras, one camera missing (masked) and a task longer than the prompt
(truncated); the cases cover pi0, pi0.5 and relative actions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import walkforge

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lerobot"
# pi0 / pi05 cases only: the smolvla ones (v*/smolvla*/) are tests/runtimes/test_smolvla_lerobot.py's
CASES = sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in FIXTURES.glob("v*/*/reference.json")
               if not p.parent.name.startswith("smolvla"))
# LeRobot's torch fp32 vs walkforge's engines (cpu: onnxruntime; torch: the recipe's modules) on tiny
# random weights, relative to the chunk's largest magnitude: the bound. Measured ≤ 2e-6.
LEROBOT_TOL = 1e-4
BACKENDS = ("cpu", "torch")
RELEASE = {"v0.4.4": "0.4", "v0.5.1": "0.5", "v0.6.1": "0.6"}  # the semantics each folder must read as


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - want).max() / max(float(np.abs(want).max()), 1e-6))


def padded_with_minus_3(arrays: dict[str, np.ndarray], name: str) -> bool:
    """Whether LeRobot fed SigLIP frames padded with −3 (0.4.x's padding bug): the pixels it saw go
    below −1. walkforge pads black (−1) for every release, so such an observation cannot match."""
    mins = [v for k, v in arrays.items() if k.startswith(f"{name}.pre.image.") and k.endswith(".min")]
    return bool(mins) and min(float(m) for m in mins) < -1.0 - 1e-6


def reference(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    folder = FIXTURES / case
    with np.load(folder / "reference.npz") as npz:
        return json.loads((folder / "reference.json").read_text()), dict(npz)


def observation(meta: dict, arrays: dict[str, np.ndarray], name: str, state: np.ndarray | None = None
                ) -> dict:
    """Observation `name` as LeRobot was fed it: the cameras it had, its state, its task."""
    obs = {f"observation.images.{c}": arrays[f"{name}.image.{c}"]
           for c in (k.removeprefix("observation.images.") for k in meta["cameras"])
           if f"{name}.image.{c}" in arrays}
    return obs | {"observation.state": arrays[f"{name}.state"] if state is None else state,
                  "task": meta["observations"][name]["task"]}


@pytest.fixture(scope="module")
def heads(compiled) -> Path:
    """The `--config` every fixture needs (head counts are in no tensor shape), one file per session."""
    config = reference(CASES[0])[0]["walkforge_config"]
    assert all(reference(c)[0]["walkforge_config"] == config for c in CASES)
    return compiled.inputs("lerobot-heads", lambda d: (d / "heads.json").write_text(json.dumps(config)))


@pytest.fixture(scope="module")
def bundles(compiled, heads):
    """case → its compiled bundle (fp32, the shared tokenizer, head counts from reference.json)."""

    def get(case: str) -> Path:
        meta, _ = reference(case)
        return compiled(meta["policy_type"], checkpoint=FIXTURES / case / "folder",
                        config_file=heads / "heads.json", tokenizer=FIXTURES / "tokenizer", gpu_archs=())

    return get


def test_fixtures_cover_every_release_and_case():
    assert {c.split("/")[0] for c in CASES} == set(RELEASE)
    assert {c for c in CASES if c.startswith("v0.6.1/")} == {
        "v0.6.1/pi0", "v0.6.1/pi05", "v0.6.1/pi0_relative", "v0.6.1/pi05_relative"}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_folder_compiles_and_reads_as_its_release(bundles, case, capsys):
    meta, _ = reference(case)
    policy = json.loads((bundles(case) / "manifest.json").read_text())["policy"]
    assert policy["lerobot"]["release"] == RELEASE[case.split("/")[0]] and policy["lerobot"]["certain"]
    shown = main_error_free_inspect(bundles(case), capsys)
    said = f"LeRobot {RELEASE[case.split('/')[0]]} semantics (read from the folder: "
    assert said in " ".join(shown.split())
    relative = meta.get("relative_actions") or {}
    assert bool(policy["relative_actions"]) == bool(relative.get("use_relative_actions"))
    if policy["relative_actions"]:
        names = relative["action_feature_names"]
        assert policy["relative_actions"]["mask"] == [n != "gripper" for n in names]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_chunks_equal_lerobots(bundles, case, backend):
    meta, arrays = reference(case)
    policy = walkforge.load(bundles(case), backend=backend)
    for name, seen in meta["observations"].items():
        if padded_with_minus_3(arrays, name):
            # only 0.4.x had the bug; walkforge pads black for every release (docs/policy.md)
            assert case.startswith("v0.4."), name
            continue
        obs = observation(meta, arrays, name)
        noise = arrays[f"{name}.noise"][0]
        chunk = policy.predict_action_chunk(obs, noise=noise)
        assert rel_err(chunk, arrays[f"{name}.chunk"]) <= LEROBOT_TOL, (name, seen["omits"],
                                                                         seen["truncated"])
        prepared = policy.processor.prepare(obs)
        np.testing.assert_array_equal(prepared.feeds["prompt_ids"][0], arrays[f"{name}.pre.tokens"])
        feeds = {k: prepared.feeds[k] for k in policy.inputs}  # pi0.5's walks take no state
        model = policy.infer(**feeds, noise=noise[None])[0, :, :chunk.shape[-1]]
        assert rel_err(model, arrays[f"{name}.chunk_model"]) <= LEROBOT_TOL, name


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_select_action_equals_lerobots(bundles, case, backend):
    meta, arrays = reference(case)
    policy = walkforge.load(bundles(case), backend=backend)
    noises = iter(arrays["select.noise"][:, 0])
    steps = json.loads((bundles(case) / "manifest.json").read_text())["policy"]["n_action_steps"]
    for call, state in enumerate(arrays["select.state"]):
        noise = next(noises) if call % steps == 0 else None
        fed = observation(meta, arrays, meta["select_action"]["observation"][0], state)
        action = policy.select_action(fed, noise)
        assert rel_err(action, arrays["select.action"][call]) <= LEROBOT_TOL, call


@pytest.mark.slow
def test_a_model_only_folder_compiles_runs_infer_and_the_policy_api_names_processors(
        compiled, bundles, heads, tmp_path, capsys):
    """config.json + model.safetensors alone: the bundle runs infer (the same model as the full
    folder's bundle); predict_action_chunk, `run --observation` and `serve` refuse in one line."""
    from test_cli import main_error

    case = "v0.6.1/pi0"
    meta, arrays = reference(case)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((FIXTURES / case / "folder" / name).read_bytes())
    bundle = compiled("pi0", checkpoint=bare, config_file=heads / "heads.json",
                      tokenizer=FIXTURES / "tokenizer", gpu_archs=())
    policy = walkforge.load(bundle)
    assert policy.manifest["policy"]["processors"] is None
    full = walkforge.load(bundles(case))
    feeds = full.processor.prepare(observation(meta, arrays, "a")).feeds
    noise = arrays["a.noise"]
    np.testing.assert_array_equal(policy.infer(**feeds, noise=noise), full.infer(**feeds, noise=noise))
    with pytest.raises(walkforge.WalkforgeError, match=r"model-only folder .*--processors DIR"):
        policy.predict_action_chunk(observation(meta, arrays, "a"), noise=noise[0])
    np.savez(tmp_path / "obs.npz", **observation(meta, arrays, "a"))
    assert "--processors DIR" in main_error(capsys, "run", bundle, "--observation", tmp_path / "obs.npz",
                                             "-o", tmp_path / "out.npz")
    assert "--processors DIR" in main_error(capsys, "serve", bundle, "--port", "0")
    assert "no processors" in main_error_free_inspect(bundle, capsys)


def main_error_free_inspect(bundle: Path, capsys) -> str:
    from walkforge.cli import main

    with pytest.raises(SystemExit) as info:
        main(["inspect", str(bundle)])
    assert info.value.code == 0
    return capsys.readouterr().out
