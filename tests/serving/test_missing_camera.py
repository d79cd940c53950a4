"""A robot whose camera drops a frame: the observation lacks that camera, and in-process,
`walkforge run --observation` and `walkforge serve` all mask it and give the same answer (as LeRobot
does); an observation with no camera at all is a one-line error everywhere."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from conftest import serving
from test_cli import main_error
from test_server import ask, client
from tolerances import PI0_TINY_ACTIONS_TOL, rel_err

from walkforge.cli import cli

SAME_TOL = PI0_TINY_ACTIONS_TOL  # one request through three doors: the same maths, alone in each batch


def test_a_missing_camera_is_masked_alike_in_process_on_the_cli_and_over_the_server(
        policy, pi0_bundle, observation, tmp_path, capsys):
    obs = observation(11)
    cams = policy.observation_spec()["cameras"]
    noise = obs.pop("noise")
    lacking = {k: v for k, v in obs.items() if k != cams[0]}
    want = policy.predict_action_chunk(lacking, noise)
    assert rel_err(want, policy.predict_action_chunk(obs, noise)) > 1e-3  # the camera mattered

    np.savez(tmp_path / "obs.npz", **lacking, noise=noise)
    done = CliRunner().invoke(cli, ["run", str(pi0_bundle), "--observation", str(tmp_path / "obs.npz"),
                                    "-o", str(tmp_path / "out.npz")])
    assert done.exit_code == 0, done.output
    assert rel_err(np.load(tmp_path / "out.npz")["actions"], want) <= SAME_TOL

    with serving(policy) as port:
        ws, _ = client(port)
        answer = ask(ws, lacking | {"noise": noise})
        refused = ask(ws, {k: v for k, v in lacking.items() if k not in cams} | {"noise": noise})
        ws.close()
    assert not isinstance(answer, str), answer
    assert rel_err(answer["actions"], want) <= SAME_TOL
    assert isinstance(refused, str) and "none of this policy's cameras" in refused

    np.savez(tmp_path / "none.npz", **{k: v for k, v in lacking.items() if k not in cams})
    line = main_error(capsys, "run", pi0_bundle, "--observation", tmp_path / "none.npz",
                      "-o", tmp_path / "x.npz")
    assert "none of this policy's cameras" in line
