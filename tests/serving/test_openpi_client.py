"""The real openpi-client (`WebsocketClientPolicy`, own venv, numpy 1.x) against our server: its
actions equal `select_action` in-process; a bad request raises its "Error in inference server"."""

from __future__ import annotations

import json

import numpy as np
from conftest import serving
from tolerances import PI0_TINY_ACTIONS_TOL, rel_err

SERVED_TOL = PI0_TINY_ACTIONS_TOL  # same request, same maths; the named fp32 bound all the same

CLIENT = """
import json, sys, numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy
port, inp, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
data = np.load(inp)
obs = {"observation/image": data["image"], "observation.images.cam_1": data["wrist"],
       "observation/state": data["state"], "prompt": str(data["prompt"]), "noise": data["noise"]}
policy = WebsocketClientPolicy(host="127.0.0.1", port=port)
meta = policy.get_server_metadata()
answer = policy.infer(obs)
try:
    policy.infer({"observation/state": data["state"]})
    error = None
except RuntimeError as exc:
    error = str(exc)
np.savez(out, actions=answer["actions"])
print(json.dumps({"chunk_size": meta["chunk_size"], "timing": sorted(answer["server_timing"]),
                  "error": error}))
"""


def test_openpi_client_actions_equal_select_action(policy, observation, openpi_python, tmp_path):
    obs = observation(2)
    cam0, cam1 = policy.observation_spec()["cameras"]
    np.savez(tmp_path / "obs.npz", image=obs[cam0], wrist=obs[cam1], state=obs["observation.state"],
             prompt=np.array(obs["task"]), noise=obs["noise"])
    (tmp_path / "client.py").write_text(CLIENT)
    obs_map = tmp_path / "map.json"
    obs_map.write_text(json.dumps({"observation/image": cam0, "observation/state": "observation.state",
                                   "prompt": "task"}))
    with serving(policy, obs_map=obs_map) as port:
        report = json.loads(openpi_python(tmp_path / "client.py", port, tmp_path / "obs.npz",
                                          tmp_path / "out.npz"))
    actions = np.load(tmp_path / "out.npz")["actions"]
    assert report["chunk_size"] == 50 and {"infer_ms", "queue_ms"} <= set(report["timing"])
    assert report["error"].startswith("Error in inference server:")
    assert "none of this policy's cameras" in report["error"]
    want = {k: v for k, v in obs.items() if k != "noise"}
    policy.reset()
    first = policy.select_action(want, obs["noise"])
    policy.reset()
    assert rel_err(actions[0], first) <= SERVED_TOL
    assert rel_err(actions, policy.predict_action_chunk(want, obs["noise"])) <= SERVED_TOL
