"""A SmolVLA bundle through every door: in-process (`predict_action_chunk`, `predict_action_chunks`,
`select_action`), `walkforge run --observation` and `walkforge serve` give the same actions, and
those equal the recipe's eager torch modules on the same hand-made walk inputs. Its processing is
SmolVLA's (left/top image padding, no BOS, prompts padded to the longest task): those steps are
tested on their own in tests/runtimes/test_processor_steps.py and against LeRobot's own SmolVLA in
tests/runtimes/test_smolvla_lerobot.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_observation, serving
from test_server import ask, client
from tolerances import rel_err

import walkforge
from walkforge.cli import cli
from walkforge.compiler.pipeline import build_model
from walkforge.recipes import get_recipe

VLM = Path(__file__).parents[1] / "fixtures" / "lerobot" / "smolvlm2-tiny"  # config.json + tokenizer
SAME_TOL = 1e-5  # one request through several doors: the same engines, the same maths, fp32 rounding
EAGER_TOL = 1e-4  # onnxruntime vs the torch modules, relative to the chunk's scale (the bound)


@pytest.fixture(scope="module")
def bundle(compiled) -> Path:
    return compiled("smolvla", variant="tiny", seed=4, gpu_archs=(), tokenizer=VLM)


@pytest.fixture(scope="module")
def policy(bundle):
    return walkforge.load(bundle, spinning=False)


def test_smolvla_answers_alike_in_process_on_the_cli_and_over_the_server(policy, bundle, tmp_path):
    spec = policy.observation_spec()
    obs = make_observation(spec, 5)
    noise = obs.pop("noise")
    want = policy.predict_action_chunk(obs, noise)
    other = obs | {"task": "stack the blue cup on the red one, then wave"}  # a longer prompt
    batch = policy.predict_action_chunks([obs, other], [noise, noise])
    assert rel_err(batch[0], want) <= SAME_TOL  # padded to the longer task in one batch: same answer
    assert rel_err(batch[1], policy.predict_action_chunk(other, noise)) <= SAME_TOL

    np.savez(tmp_path / "obs.npz", **obs, noise=noise)
    done = CliRunner().invoke(cli, ["run", str(bundle), "--observation", str(tmp_path / "obs.npz"),
                                    "-o", str(tmp_path / "out.npz")])
    assert done.exit_code == 0, done.output
    assert rel_err(np.load(tmp_path / "out.npz")["actions"], want) <= SAME_TOL

    with serving(policy) as port:
        ws, metadata = client(port)
        answer = ask(ws, obs | {"noise": noise})
        ws.close()
    assert not isinstance(answer, str), answer
    assert rel_err(answer["actions"], want) <= SAME_TOL

    policy.reset()
    first = policy.select_action(obs, noise)
    np.testing.assert_allclose(first, want[0], rtol=0, atol=SAME_TOL * float(np.abs(want).max()))


def test_smolvla_bundle_equals_its_eager_modules(policy):
    recipe = get_recipe("smolvla")
    cfg = recipe.variant("tiny")
    feeds = recipe.fake_inputs(cfg, batch=3, seed=2)  # a masked camera, prompts of three lengths
    got = policy.infer(**{k: v for k, v in feeds.items() if k != "noise"}, noise=feeds["noise"])
    torch.manual_seed(4)
    model = build_model(recipe, cfg).eval()  # the bundle's weights: built as the compile built them
    with torch.no_grad():
        want = model.sample_actions(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    assert rel_err(got, want) <= EAGER_TOL, rel_err(got, want)
