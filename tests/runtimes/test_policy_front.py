"""The policy front (predict_action_chunk, select_action, predict_action_chunks, observation_spec)
end to end on tiny pi0 and pi0.5 bundles compiled from LeRobot folders (tests/lerobot_folder.py):
raw frames, robot state and task text in, actions in robot units out, against the recipe's eager
torch reference fed inputs processed HERE by hand from the formulas (torch resize, transformers
tokenizer); queue semantics, batched == serial, every bad observation as a one-line error."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lerobot_folder import write_folder, write_tokenizer
from test_processors import torch_resize_with_pad
from tolerances import POLICY_CHUNK_TOL, rel_err

import walkforge
from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts.bundle import Bundle
from walkforge.cli import cli
from walkforge.errors import WalkforgeError
from walkforge.recipes import get_recipe
from walkforge.runtimes.backends.torch import build_model
from walkforge.runtimes.processors import PolicyProcessor

BASE, WRIST, STATE = "observation.images.base", "observation.images.wrist", "observation.state"
N_ACTION_STEPS = 5  # pi0's folder: a queue shorter than the 50-action chunk


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def compiled(request, tmp_path_factory):
    """(kind, bundle, folder, tokenizer dir): pi0 with tokenizer.model, pi0.5 (200-token prompts,
    room for its 32 state bins) with tokenizer.json; compiled once per module."""
    kind, tmp = request.param, tmp_path_factory.mktemp(request.param)
    cfg = get_recipe(kind).variant("tiny")
    cfg = replace(cfg, max_prompt_len=200) if kind == "pi05" else cfg
    folder = write_folder(tmp / "ckpt", kind, cfg=cfg, seed=4)
    if kind == "pi0":
        meta = json.loads((folder.path / "config.json").read_text())
        (folder.path / "config.json").write_text(json.dumps({**meta, "n_action_steps": N_ACTION_STEPS}))
    tok = write_tokenizer(tmp / "tok", fast=kind == "pi05")
    compile_bundle(CompileRequest(kind, tmp / "bundle", checkpoint=folder.path, tokenizer=tok, gpu_archs=()))
    return kind, Bundle.open(tmp / "bundle"), folder, tok


@pytest.fixture(scope="module")
def policy(compiled):
    return walkforge.load(compiled[1].root, spinning=False)


def observation(seed: int = 0, wrist: bool = True, task: str = "pick up the red block") -> dict:
    """A raw observation: base uint8 HWC 480×640, wrist float CHW 97×203 (or absent), state (7,)."""
    rng = np.random.default_rng(seed)
    obs = {BASE: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
           STATE: rng.standard_normal(7).astype(np.float32) * 2, "task": task}
    if wrist:
        obs[WRIST] = rng.random((3, 97, 203)).astype(np.float32)
    return obs


def noise_of(seed: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    return np.random.default_rng(100 + seed).standard_normal((*batch, 50, 32)).astype(np.float32)


# --- the reference: LeRobot's processing written out with torch and transformers ---------------------

def hand_inputs(kind: str, folder, tok_dir, obs: dict, max_len: int) -> dict[str, torch.Tensor]:
    """Walk inputs from the formulas: frames /255 → CHW → resize-with-pad (0 = black), absent and
    empty cameras zero with mask false; state normalised (pi0 MEAN_STD, pi0.5 QUANTILES), padded to
    32; pi0 `task\\n`, pi0.5 `Task: …, State: bins;\\nAction: `; [BOS, ids] right-padded with 0."""
    from transformers import AutoTokenizer

    images, masks = torch.zeros(1, 3, 3, 224, 224), torch.zeros(1, 3, dtype=torch.bool)
    for v, key in enumerate((BASE, WRIST)):
        if key in obs:
            x = obs[key]
            x = x.transpose(2, 0, 1).astype(np.float32) / 255 if x.dtype == np.uint8 else x
            images[0, v], masks[0, v] = torch.from_numpy(torch_resize_with_pad(x, 224, 224)), True
    s, st = torch.from_numpy(obs[STATE]), folder.stats
    if kind == "pi0":
        state = (s - st[f"{STATE}.mean"]) / (st[f"{STATE}.std"] + 1e-8)
    else:
        state = 2 * (s - st[f"{STATE}.q01"]) / (st[f"{STATE}.q99"] - st[f"{STATE}.q01"]) - 1
    state = torch.cat([state, torch.zeros(32 - 7)])[None]
    if kind == "pi0":
        text = obs["task"] + "\n"
    else:
        bins = np.digitize(state[0].numpy(), np.linspace(-1, 1, 257)[:-1]) - 1
        task = obs["task"].strip().replace("_", " ").replace("\n", " ")
        text = f"Task: {task}, State: {' '.join(map(str, bins))};\nAction: "
    ref = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = [ref.bos_token_id, *ref(text, add_special_tokens=False)["input_ids"]]
    prompt = torch.zeros(1, max_len, dtype=torch.long)
    prompt[0, :len(ids)] = torch.tensor(ids)
    return {"images": images, "image_masks": masks, "prompt_ids": prompt,
            "prompt_mask": prompt != 0, "state": state}


def reference_chunk(compiled, obs: dict, noise: np.ndarray) -> np.ndarray:
    """The recipe's eager sample_actions on hand_inputs, un-normalised by hand, trimmed to 6 dims."""
    kind, bundle, folder, tok = compiled
    _, cfg, model = build_model(bundle)
    t = hand_inputs(kind, folder, tok, obs, cfg.max_prompt_len)
    args = [t["images"], t["image_masks"], t["prompt_ids"], t["prompt_mask"]]
    args += [t["state"]] if kind == "pi0" else []
    with torch.no_grad():
        y = model.sample_actions(*args, torch.from_numpy(noise)[None])[0, :, :6]
    st = folder.stats
    if kind == "pi0":
        return (y * st["action.std"] + st["action.mean"]).numpy()
    return ((y + 1) * (st["action.q99"] - st["action.q01"]) / 2 + st["action.q01"]).numpy()


def test_chunk_matches_the_hand_processed_torch_reference(compiled, policy):
    obs, noise = observation(1), noise_of(1)
    got = policy.predict_action_chunk(obs, noise=noise)
    assert got.shape == (50, 6) and got.dtype == np.float32
    want = reference_chunk(compiled, obs, noise)
    assert rel_err(got, want) <= POLICY_CHUNK_TOL
    # an absent camera is masked: the chunk changes, and still matches the reference
    alone = observation(1, wrist=False)
    masked = policy.predict_action_chunk(alone, noise=noise)
    assert rel_err(masked, reference_chunk(compiled, alone, noise)) <= POLICY_CHUNK_TOL
    assert rel_err(masked, got) > 1e-3


def test_torch_backend_gives_the_same_chunk(compiled, policy):
    torch_policy = walkforge.load(compiled[1].root, backend="torch")
    obs = observation(2)
    got, want = torch_policy.predict_action_chunk(obs), policy.predict_action_chunk(obs)
    assert rel_err(got, want) <= POLICY_CHUNK_TOL


def test_observation_spec_describes_the_folder(compiled, policy):
    spec = policy.observation_spec()
    assert spec["cameras"] == [BASE, WRIST] and spec["empty_cameras"] == ["observation.images.empty_camera_0"]
    assert spec["state"] == {"key": STATE, "dim": 7} and spec["action"] == {"key": "action", "dim": 6}
    assert spec["chunk_size"] == 50 and spec["noise"] == [50, 32] and spec["task"]["tokenizer"]
    assert spec["n_action_steps"] == (N_ACTION_STEPS if compiled[0] == "pi0" else 50)


def test_batched_and_micro_batched_equal_serial(policy):
    obs = [observation(3, task="open the top drawer"), observation(4, task="stack_the green cups")]
    noises = [noise_of(3), noise_of(4)]
    serial = [policy.predict_action_chunk(o, noise=n) for o, n in zip(obs, noises, strict=True)]
    batched = {k: np.stack([o[k] for o in obs]) for k in (BASE, WRIST, STATE)}
    batched["task"] = [o["task"] for o in obs]
    got = policy.predict_action_chunk(batched, noise=np.stack(noises))
    assert got.shape == (2, 50, 6)
    mixed = [obs[0], observation(5, wrist=False), obs[1]]  # requests with different cameras
    chunks = policy.predict_action_chunks(mixed, [noises[0], noise_of(5), noises[1]])
    alone = policy.predict_action_chunk(mixed[1], noise=noise_of(5))
    for a, b in zip([*got, chunks[0], chunks[2], chunks[1]], [*serial, *serial, alone], strict=True):
        assert rel_err(a, b) <= POLICY_CHUNK_TOL
    assert rel_err(serial[0], serial[1]) > 1e-3
    # seeded noise: the same draw for every request, so batching never changes an answer
    seeded = policy.predict_action_chunks(obs)[1]
    assert rel_err(seeded, policy.predict_action_chunk(obs[1])) <= POLICY_CHUNK_TOL


def test_select_action_queues_n_action_steps(compiled, policy):
    steps = policy.observation_spec()["n_action_steps"]
    first, second = observation(6), observation(7)
    chunk1, chunk2 = policy.predict_action_chunk(first), policy.predict_action_chunk(second)
    policy.reset()
    got = [policy.select_action(first)] + [policy.select_action(second) for _ in range(steps - 1)]
    assert got[0].shape == (6,)
    assert all(np.array_equal(g, c) for g, c in zip(got, chunk1[:steps], strict=True))  # queued: obs ignored
    assert rel_err(policy.select_action(second), chunk2[0]) <= POLICY_CHUNK_TOL  # queue empty: a new chunk
    policy.reset()
    assert rel_err(policy.select_action(first), chunk1[0]) <= POLICY_CHUNK_TOL  # reset: a new chunk
    policy.reset()


def _bad_cases(obs: dict) -> dict[str, tuple[dict, dict, str]]:
    """name → (observation, noise-kwargs, what the error says)."""
    return {
        "channels": ({**obs, BASE: np.zeros((480, 640, 4), np.uint8)}, {}, "no axis of 3 channels"),
        "unknown key": ({**obs, "observation.images.bse": obs[BASE]}, {},
                        re.escape(f"'observation.images.bse' unknown (did you mean '{BASE}'?)")),
        "state size": ({**obs, STATE: np.zeros(8, np.float32)}, {}, r"observation.state: shape \[8\]"),
        "state NaN": ({**obs, STATE: np.full(7, np.nan, np.float32)}, {}, "NaN or inf"),
        "float range": ({**obs, WRIST: obs[WRIST] * 3}, {}, r"must lie in \[0, 1\]"),
        "no camera": ({k: v for k, v in obs.items() if not k.startswith("observation.images.")}, {},
                      "none of this policy's cameras"),
        "missing task": ({k: v for k, v in obs.items() if k != "task"}, {}, "lacks 'task'"),
        "missing state": ({k: v for k, v in obs.items() if k != STATE}, {}, "lacks 'observation.state'"),
        "task type": ({**obs, "task": ["a", "b"]}, {}, "task: want a string"),
        "noise shape": (obs, {"noise": np.zeros((50, 6), np.float32)},
                        r"noise: shape \[50, 6\]; want \[50, 32\]"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(observation())))
def test_bad_observations_are_one_line_errors(policy, case):
    obs, kwargs, match = _bad_cases(observation())[case]
    with pytest.raises(WalkforgeError, match=match) as info:
        policy.predict_action_chunk(obs, **kwargs)
    assert "\n" not in str(info.value)


def test_no_tokenizer_names_the_flag_and_the_hub_tokenizer(compiled, policy):
    entry = {**compiled[1].manifest["policy"], "tokenizer": None}
    processor = PolicyProcessor(entry, compiled[1].read_verified)
    with pytest.raises(WalkforgeError, match="no tokenizer: compile with --tokenizer DIR .*google/paligemma"):
        processor.preprocess(observation())


def run_observation(bundle, tmp_path, *args: str) -> np.ndarray:
    """`walkforge run BUNDLE --observation tmp_path/obs.npz ARGS -o …`: the actions it wrote."""
    out = tmp_path / "out.npz"
    result = CliRunner().invoke(cli, ["run", str(bundle), "--observation", str(tmp_path / "obs.npz"), *args,
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        return data["actions"]


def test_run_observation_cli(compiled, policy, tmp_path):
    obs = observation(8)
    np.savez(tmp_path / "obs.npz", **{k: v for k, v in obs.items() if k != "task"}, noise=noise_of(8))
    got = run_observation(compiled[1].root, tmp_path, "--task", obs["task"])
    assert got.shape == (50, 6)
    assert rel_err(got, policy.predict_action_chunk(obs, noise=noise_of(8))) <= POLICY_CHUNK_TOL
    three = policy.predict_action_chunk(obs, noise=noise_of(8), num_steps=3)
    got3 = run_observation(compiled[1].root, tmp_path, "--task", obs["task"], "--num-steps", "3")
    assert rel_err(got3, three) <= POLICY_CHUNK_TOL and rel_err(three, got) > 1e-3
    np.savez(tmp_path / "obs.npz", **obs, noise=noise_of(8))  # the task as a string in the npz
    assert rel_err(run_observation(compiled[1].root, tmp_path), got) <= POLICY_CHUNK_TOL


def test_empty_and_absent_cameras_are_masked_black(compiled, policy):
    obs = observation(9, wrist=False)
    obs["observation.images.empty_camera_0"] = np.ones((224, 224, 3), np.float32)  # never read
    feeds, batched = policy.processor.preprocess(obs)
    assert not batched and feeds["image_masks"].tolist() == [[True, False, False]]
    assert (feeds["images"][0, 1:] == 0).all()  # 0 here = −1 inside the vision walk
    base = feeds["images"][0, 0]  # 480×640 → 168×224: 28 black rows above, 28 below
    assert base[:, :28].max() == 0 and base[:, 196:].max() == 0 and base[:, 28:196].max() > 0


def test_batched_observation_shapes_must_agree(policy):
    obs = observation(10)
    batched = {BASE: np.stack([obs[BASE]] * 2), WRIST: obs[WRIST], STATE: np.stack([obs[STATE]] * 2),
               "task": ["a", "b"]}
    with pytest.raises(WalkforgeError, match=r"observation.images.wrist: shape \[3, 97, 203\]; a batched"):
        policy.predict_action_chunk(batched)
    with pytest.raises(WalkforgeError, match="task: want a list of 2 strings"):
        policy.predict_action_chunk({**batched, WRIST: np.stack([obs[WRIST]] * 2), "task": ["a"]})
    with pytest.raises(WalkforgeError, match="takes unbatched observations"):
        policy.predict_action_chunks([{**batched, WRIST: np.stack([obs[WRIST]] * 2)}])


def test_run_observation_cli_errors(compiled, tmp_path):
    bundle = str(compiled[1].root)
    cases = ((["--task", "x", "--inputs", "in.npz"], "--task goes with --observation"),
             (["--observation", "o.npz", "--inputs", "in.npz"], "--observation takes no --inputs"))
    for args, match in cases:
        result = CliRunner().invoke(cli, ["run", bundle, *args, "-o", str(tmp_path / "o.npz")])
        assert isinstance(result.exception, WalkforgeError) and match in str(result.exception)


def test_run_observation_refuses_a_bundle_that_is_no_policy(tiny_bundle, tmp_path):
    np.savez(tmp_path / "obs.npz", x=np.zeros(3))
    result = CliRunner().invoke(cli, ["run", str(tiny_bundle), "--observation", str(tmp_path / "obs.npz"),
                                      "-o", str(tmp_path / "o.npz")])
    assert isinstance(result.exception, WalkforgeError) and "is not a robot policy" in str(result.exception)
