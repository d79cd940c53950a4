"""Real-time chunking through the real server (issue #31): per-connection chunk state.

A robot sends `executed` (actions run since its last answer) beside its observation; the server
cuts the leftover from that connection's last model-space chunk and the answer must equal
`predict_chunk(obs, noise, prev_chunk_left_over=<that cut>, inference_delay=d)` in-process.
"""

from __future__ import annotations

import threading

import numpy as np
from conftest import serving
from test_server import ask, client
from tolerances import PI0_TINY_ACTIONS_TOL, rel_err

from walkforge.serving import protocol

TOL = PI0_TINY_ACTIONS_TOL  # a request batched with another vs alone: other GEMM blocking
BATCH_WAIT_MS = 10_000.0  # two simultaneous requests meet in one batch (max_batch 2 closes it at once)


def split(obs: dict) -> tuple[dict, np.ndarray]:
    obs = dict(obs)
    return obs, obs.pop("noise")


def chunk(policy, obs: dict, **rtc):
    """The in-process Chunk of a served observation (its noise split off)."""
    o, noise = split(obs)
    return policy.predict_chunk(o, noise, **rtc)


def cut(model: np.ndarray, executed: int, policy) -> np.ndarray:
    """LeRobot's leftover: the rows not executed yet, first action_dim dims."""
    return model[executed:, :policy.observation_spec()["action"]["dim"]]


def test_executed_gives_the_in_process_rtc_chunk(policy, observation):
    assert policy.has_guide
    first, second, third = observation(0), observation(1), observation(2)
    k, d = 5, 2
    with serving(policy) as port:
        ws, _ = client(port)
        a0 = ask(ws, first)
        want0 = chunk(policy, first)
        assert rel_err(a0["actions"], want0.actions) <= TOL
        a1 = ask(ws, second | {"executed": k, "inference_delay": d})
        assert not isinstance(a1, str), a1
        want1 = chunk(policy, second, prev_chunk_left_over=cut(want0.model, k, policy), inference_delay=d)
        assert rel_err(a1["actions"], want1.actions) <= TOL
        assert set(a1) == {"actions", "server_timing"}  # openpi-client's answer, nothing more
        plain = chunk(policy, second).actions
        assert rel_err(a1["actions"], plain) > 100 * TOL  # the guide did something
        # the state moves on: executed now cuts from the second answer's chunk
        a2 = ask(ws, third | {"executed": 0, "rtc": {"prefix_attention_schedule": "EXP"}})
        want2 = chunk(policy, third, prev_chunk_left_over=cut(want1.model, 0, policy),
                      rtc={"prefix_attention_schedule": "EXP"})
        assert rel_err(a2["actions"], want2.actions) <= TOL
        # an explicit leftover (model space) needs no state
        left = np.asarray(want0.model[:7, :4], np.float32)
        a3 = ask(ws, first | {"prev_chunk_left_over": left, "inference_delay": 1})
        want3 = chunk(policy, first, prev_chunk_left_over=left, inference_delay=1)
        assert rel_err(a3["actions"], want3.actions) <= TOL
        ws.close()


def test_rtc_and_plain_robots_share_one_batch(policy, observation):
    """Robot A (RTC from its second request on) and robot B (never RTC) send together: both pairs
    of requests run as batches of 2 and each answer equals its in-process one."""
    work = {"A": [observation(20), observation(21) | {"executed": 8, "inference_delay": 3}],
            "B": [observation(30), observation(31)]}
    answers: dict[str, list] = {"A": [], "B": []}
    barrier = threading.Barrier(2)

    def robot(name: str, port: int) -> None:
        ws, _ = client(port)
        for message in work[name]:
            barrier.wait(60)  # the two robots' n-th requests land together
            answers[name].append(ask(ws, message))
        ws.close()

    with serving(policy, max_batch=2, batch_wait_ms=BATCH_WAIT_MS) as port:
        threads = [threading.Thread(target=robot, args=(n, port)) for n in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for name in work:
        assert len(answers[name]) == 2 and not any(isinstance(a, str) for a in answers[name]), answers
        assert [a["server_timing"]["batch_size"] for a in answers[name]] == [2, 2]
    a_first = chunk(policy, work["A"][0])
    assert rel_err(answers["A"][0]["actions"], a_first.actions) <= TOL
    rtc_obs = {k: v for k, v in work["A"][1].items() if k not in ("executed", "inference_delay")}
    want = chunk(policy, rtc_obs, prev_chunk_left_over=cut(a_first.model, 8, policy), inference_delay=3)
    assert rel_err(answers["A"][1]["actions"], want.actions) <= TOL
    assert rel_err(answers["A"][1]["actions"], chunk(policy, rtc_obs).actions) > 100 * TOL
    for obs, got in zip(work["B"], answers["B"], strict=True):
        assert rel_err(got["actions"], chunk(policy, obs).actions) <= TOL  # exactly unguided


def one_line_error(reply, says: str) -> None:
    assert isinstance(reply, str) and reply.startswith("error: ") and "\n" not in reply, reply
    assert says in reply, reply


def test_a_new_connection_has_no_state(policy, observation):
    obs = observation(3)
    with serving(policy) as port:
        ws, _ = client(port)
        one_line_error(ask(ws, obs | {"executed": 0}), "no answer yet")
        assert not isinstance(ask(ws, obs), str)
        assert not isinstance(ask(ws, obs | {"executed": 2}), str)  # now it has one
        ws.close()
        again, _ = client(port)  # the closed connection's chunk went with it
        one_line_error(ask(again, obs | {"executed": 2}), "no answer yet")
        again.close()


BAD = [
    ({"executed": -1}, "executed"),
    ({"executed": 51}, "executed"),
    ({"executed": True}, "executed"),
    ({"executed": 1.5}, "executed"),
    ({"inference_delay": -2}, "inference_delay"),
    ({"inference_delay": "3"}, "inference_delay"),
    ({"prev_chunk_left_over": np.zeros((51, 4), np.float32)}, "prev_chunk_left_over"),
    ({"prev_chunk_left_over": np.zeros((5, 33), np.float32)}, "prev_chunk_left_over"),
    ({"prev_chunk_left_over": np.zeros(5, np.float32)}, "prev_chunk_left_over"),
    ({"prev_chunk_left_over": np.full((5, 4), np.nan, np.float32)}, "NaN"),
    ({"prev_chunk_left_over": [1.0, 2.0]}, "prev_chunk_left_over"),
    ({"prev_chunk_left_over": np.zeros((5, 4), np.float32), "executed": 1}, "not both"),
    ({"rtc": {"max_guidance": 3.0}}, "unknown setting"),
    ({"rtc": {"prefix_attention_schedule": "CUBIC"}}, "prefix_attention_schedule"),
    ({"rtc": {"execution_horizon": -1}}, "execution_horizon"),
    ({"rtc": [1, 2]}, "'rtc'"),
]


def test_bad_rtc_values_get_one_line_errors(policy, observation):
    obs = observation(4)
    with serving(policy) as port:
        ws, _ = client(port)
        first = ask(ws, obs)  # a previous answer: `executed` is checked, not merely absent
        for extra, says in BAD:
            one_line_error(ask(ws, obs | extra), says)
        got = ask(ws, obs | {"executed": 3})  # still usable; errors left the state alone
        want = chunk(policy, obs, prev_chunk_left_over=cut(chunk(policy, obs).model, 3, policy))
        assert rel_err(got["actions"], want.actions) <= TOL and rel_err(first["actions"], want.actions) > TOL
        ws.close()


class _NoGuide:
    """The policy as a bundle compiled before the guide walk would look to the server."""

    has_guide = False

    def __init__(self, policy) -> None:
        self._policy = policy

    def __getattr__(self, name: str):
        return getattr(self._policy, name)


def test_bundle_without_guide_refuses_rtc_keys(policy, observation):
    obs = observation(5)
    with serving(_NoGuide(policy)) as port:
        ws, _ = client(port)
        assert not isinstance(ask(ws, obs), str)
        one_line_error(ask(ws, obs | {"executed": 1}), "recompile")
        ws.send(protocol.packb(obs))
        assert not isinstance(protocol.unpackb(ws.recv()), str)
        ws.close()
