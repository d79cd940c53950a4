"""Hostile clients against the real server on loopback (issue #32): each attack is refused before
any work (a one-line text error, or websockets' 1009 close for an oversized frame), and then a
second robot's valid request is answered like the policy in-process, `/healthz` still says OK and
no KV page is left held.

Nothing here depends on timing except ROBOT_BOUND_S, a generous bound on every wait of the second
robot and the health check (the suite runs on two shared, loaded cores; on an idle machine each
takes milliseconds), and the backpressure test's BACKPRESSURE_LOOK_S, which only gives a hostile
sender time to push more than it may (a slow machine pushes less: the check still holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import expected, wait_until
from test_server import malformed
from tolerances import PI0_TINY_ACTIONS_TOL, rel_err
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from walkforge.errors import WalkforgeError
from walkforge.serving import protocol
from walkforge.serving.app import ServeOptions, load_local
from walkforge.serving.server import PolicyServer, run_server

ROBOT_BOUND_S = 20.0  # every wait of the second robot / health check, on a loaded 2-core machine
BACKPRESSURE_LOOK_S = 2.0  # time a hostile sender gets to push more than the server may take in
SERVED_TOL = PI0_TINY_ACTIONS_TOL  # a robot batched with another request: other GEMM blocking
MB = 1 << 20


@contextlib.contextmanager
def served(policy, **options) -> Iterator[tuple[int, PolicyServer]]:
    """The real server (ServeOptions' limits applied) on 127.0.0.1:<free port> and its
    PolicyServer (counters), stopped (drained) on exit."""
    loop, stop, ready = asyncio.new_event_loop(), asyncio.Event(), threading.Event()
    got: dict = {}
    opts = ServeOptions(port=0, **options)

    def main() -> None:
        loop.run_until_complete(run_server(
            lambda: load_local(Path(), opts, policy=policy), "127.0.0.1", 0, stop,
            on_listen=lambda h, p: got.setdefault("port", p), on_ready=lambda _: ready.set(),
            limits=opts.limits(), on_server=lambda s: got.setdefault("server", s)))

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(60), "server did not become ready"
    try:
        yield got["port"], got["server"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


def healthy(port: int) -> bool:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=ROBOT_BOUND_S).read()
    return body == b"OK\n"


def connected(port: int):
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=ROBOT_BOUND_S)
    protocol.unpackb(ws.recv(timeout=ROBOT_BOUND_S))
    return ws


def ask(ws, frame: bytes | str):
    ws.send(frame)
    reply = ws.recv(timeout=ROBOT_BOUND_S)
    return reply if isinstance(reply, str) else protocol.unpackb(reply)


def robot_is_served(port: int, policy, obs: dict) -> None:
    """A second robot, on its own connection: answered like in-process (exactly when alone in
    its batch), within ROBOT_BOUND_S per wait; the health check answers OK."""
    assert healthy(port)
    with connected(port) as ws:
        answer = ask(ws, protocol.packb(obs))
    assert not isinstance(answer, str), answer
    check_answer(policy, obs, answer)
    assert healthy(port)


def check_answer(policy, obs: dict, answer: dict) -> None:
    want = expected(policy, obs)
    if answer["server_timing"]["batch_size"] == 1:
        np.testing.assert_array_equal(answer["actions"], want)
    else:
        assert rel_err(answer["actions"], want) <= SERVED_TOL


def no_pages_held(policy) -> bool:
    pages = policy.paging.pages
    return wait_until(lambda: pages.free_pages == pages.num_pages, timeout=ROBOT_BOUND_S)


def tagged(obs: dict, key: str, data: bytes, dtype: str, shape: list[int]) -> bytes:
    tag = {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}
    return msgpack.packb({k: v for k, v in obs.items() if k != key} | {key: tag}, default=protocol._encode)


def hostile(obs: dict, spec: dict) -> list[tuple[str, bytes, str]]:
    """(kind, frame, what the one-line error must say) for attacks on the bounds of limits.py."""
    cam, state = spec["cameras"][0], spec["state"]["key"]
    task_bytes = spec["task"]["max_tokens"] * 64
    packb = protocol.packb
    return [
        ("batched state", packb(obs | {state: np.zeros((2, spec["state"]["dim"]), np.float32)}),
         "no batch dim"),
        ("batched camera", packb(obs | {cam: np.zeros((2, 8, 8, 3), np.uint8)}), "no batch dim"),
        ("task over the bound", packb(obs | {"task": "x" * (task_bytes + 1)}), f"at most {task_bytes}"),
        ("multi-byte task over the bound", packb(obs | {"task": "€" * (task_bytes // 3 + 1)}),
         f"at most {task_bytes}"),
        ("bytes task over the bound", packb(obs | {"task": b"x" * (2 * task_bytes)}),
         f"{2 * task_bytes} bytes"),
        ("task not UTF-8", packb(obs | {"task": b"\xff\xfe pick"}), "not UTF-8"),
        ("task list", packb(obs | {"task": ["pick", "place"]}), "want a string"),
        ("element bomb", b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x80" * (1 << 20), "msgpack objects"),
        ("claimed container", b"\xdf\xff\xff\xff\xff", "container of"),
        ("deep nesting", b"\x91" * 10_000 + b"\xc0", "deeper than"),
        ("many small objects", packb(obs | {"task": [[None] * 15] * 200}), "msgpack objects"),
        ("ext value", msgpack.packb(obs | {"task": msgpack.ExtType(1, b"x")}, default=protocol._encode),
         "ext"),
        ("int map key", msgpack.packb({1: 2}), "not a msgpack-numpy"),
        ("trailing bytes", packb(obs) + b"\x00", "after the message"),
        ("truncated frame", packb(obs)[:-10], "not a msgpack-numpy"),
        ("many dims", tagged(obs, cam, b"\0" * 3, "|u1", [1] * 40 + [3]), "dims"),
        ("zero-size giant shape", tagged(obs, cam, b"", "|u1", [0, 1 << 62, 3]), "too big"),
        ("overflowing shape", tagged(obs, cam, b"", "|u1", [1 << 32, 1 << 32, 3]), "bytes"),
        ("tall image", packb(obs | {cam: np.zeros((5000, 2, 3), np.uint8)}), "each side"),
        ("int16 image", packb(obs | {cam: np.zeros((8, 8, 3), np.int16)}), "uint8"),
        ("batched noise", packb(obs | {"noise": np.zeros((2, *spec["noise"]), np.float32)}), "noise"),
    ]


def test_the_issues_big_attacks_are_refused_before_work_and_a_robot_is_served(policy, observation):
    """#32's probes at full size: a batch of 40000, a 20 MB task, a 60 MB frame of empty maps."""
    spec = policy.observation_spec()
    obs = observation(20)
    batch = {c: np.zeros((40000, 1, 1, 3), np.uint8) for c in spec["cameras"]}
    batch[spec["state"]["key"]] = np.zeros((40000, 7), np.float32)
    attacks = [
        ("batch of 40000", protocol.packb(obs | batch), "no batch dim"),
        ("20 MB task", protocol.packb(obs | {"task": "pick " * (4 << 20)}), "string of 20971520 bytes"),
        ("60 MB of empty maps", b"\xdd" + (60 * MB).to_bytes(4, "big") + b"\x80" * (60 * MB),
         "msgpack objects"),
    ]
    with served(policy) as (port, server):
        for seed, (kind, frame, says) in enumerate(attacks):
            with connected(port) as ws:
                reply = ask(ws, frame)
            assert isinstance(reply, str) and reply.startswith("error: ") and says in reply, (kind, reply)
            assert "\n" not in reply, (kind, reply)
            robot_is_served(port, policy, observation(21 + seed))
        assert server.budget.used == 0 and server.budget.peak <= 61 * MB
    assert no_pages_held(policy)


def test_every_hostile_kind_is_a_one_line_error_while_a_robot_is_served(policy, observation):
    """A hostile connection sends #32's attack kinds and test_server's malformed kinds in a loop
    while a second robot asks three times: every robot answer equals the in-process one."""
    spec = policy.observation_spec()
    obs = observation(30)
    frames = hostile(obs, spec) + [(k, f, s) for k, f, s in malformed(obs, spec) if k.endswith(" #0")]
    stop, errors, replies = threading.Event(), [], []

    def attack(port: int) -> None:
        with connected(port) as ws:
            while not stop.is_set():
                for kind, frame, says in frames:
                    reply = ask(ws, frame)
                    replies.append(reply)
                    if not (isinstance(reply, str) and reply.startswith("error: ") and says in reply
                            and "\n" not in reply):
                        errors.append((kind, reply))

    with served(policy) as (port, _):
        attacker = threading.Thread(target=attack, args=(port,), daemon=True)
        attacker.start()
        assert wait_until(lambda: len(replies) > len(frames) // 2, ROBOT_BOUND_S)
        for seed in (31, 32, 33):
            robot_is_served(port, policy, observation(seed))
        stop.set()
        attacker.join(ROBOT_BOUND_S)
        assert not attacker.is_alive()
    assert not errors, sorted({kind: reply for kind, reply in errors}.items())
    assert len(replies) >= len(frames)
    assert no_pages_held(policy)


def test_valid_task_forms_within_the_bound_are_answered(policy, observation):
    """bytes and numpy string tasks are UTF-8 text; a task of exactly the bound passes the
    server's checks and is answered as the policy in-process answers it."""
    spec = policy.observation_spec()
    obs = observation(40)
    longest = "ab" * (spec["task"]["max_tokens"] * 32)
    with served(policy) as (port, _), connected(port) as ws:
        as_bytes = ask(ws, protocol.packb(obs | {"task": obs["task"].encode()}))
        as_numpy = ask(ws, protocol.packb(obs | {"task": np.array(obs["task"])}))
        at_bound = ask(ws, protocol.packb(obs | {"task": longest}))
    for answer in (as_bytes, as_numpy):
        np.testing.assert_array_equal(answer["actions"], expected(policy, obs))
    try:  # past the server's bounds, the policy decides (LeRobot cuts the prompt)
        want = expected(policy, obs | {"task": longest})
    except WalkforgeError as exc:
        assert at_bound == f"error: {exc}"
    else:
        np.testing.assert_array_equal(at_bound["actions"], want)
    assert no_pages_held(policy)


def test_oversized_frame_closes_its_connection_only(policy, observation):
    with served(policy, max_frame_mb=1, max_inflight_mb=4) as (port, _):
        ws = connected(port)
        ws.send(b"\x00" * (MB + 1))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=ROBOT_BOUND_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        robot_is_served(port, policy, observation(41))


def test_connections_beyond_the_bound_get_503(policy, observation):
    with served(policy, max_connections=2) as (port, server):
        first, second = connected(port), connected(port)
        with pytest.raises(InvalidStatus) as info:
            connected(port)
        assert info.value.response.status_code == 503 and b"too many connections" in info.value.response.body
        assert healthy(port)
        first.close()
        assert wait_until(lambda: server.connections < 2, ROBOT_BOUND_S)
        robot_is_served(port, policy, observation(42))
        second.close()


def test_unread_big_frames_are_backpressured_and_inflight_bytes_bounded(policy, observation):
    """While the page pool is full (pages held elsewhere), one connection pushes 64 frames of
    0.9 MB without reading answers and two more push one each: the server takes ONE frame per
    connection off websockets, holds at most --max-inflight-mb of frames, and the sender blocks
    (kernel buffers and websockets' one waiting frame hold less than the 58 MB it tries). Once
    pages free, a second robot is answered; nothing stays held."""
    spec = policy.observation_spec()
    cam = spec["cameras"][0]
    big = [observation(50 + i) | {cam: np.full((540, 540, 3), i, np.uint8)} for i in range(3)]
    frames = [protocol.packb(o) for o in big]
    assert all(0.8 * MB < len(f) < MB for f in frames)
    pages = policy.paging.pages
    sent = [0]
    with served(policy, max_frame_mb=1, max_inflight_mb=2, pool_wait_ms=60_000) as (port, server):
        flood, others = connected(port), [connected(port), connected(port)]

        def push() -> None:
            with contextlib.suppress(OSError, ConnectionClosed):
                for _ in range(64):
                    flood.send(frames[0])
                    sent[0] += 1

        pages.allocate("hog", pages.free_pages * pages.spec.page_size)
        hog = [True]

        def release() -> None:
            if hog.pop() if hog else False:
                pages.free("hog")

        try:
            sender = threading.Thread(target=push, daemon=True)
            sender.start()
            for ws, frame in zip(others, frames[1:], strict=True):
                ws.send(frame)
            assert wait_until(lambda: server.frames >= 3, ROBOT_BOUND_S)
            sender.join(BACKPRESSURE_LOOK_S)
            assert sender.is_alive() and sent[0] < 64, sent[0]  # blocked: the server stopped reading
            assert server.frames == 3, server.frames  # one frame per connection taken in
            assert server.budget.peak <= 2 * MB and server.budget.used <= 2 * MB
            robot = observation(59)
            with connected(port) as ws:
                ws.send(protocol.packb(robot))
                release()
                answer = protocol.unpackb(ws.recv(timeout=ROBOT_BOUND_S))
        finally:
            release()
        check_answer(policy, robot, answer)
        for ws, obs in zip(others, big[1:], strict=True):
            check_answer(policy, obs, protocol.unpackb(ws.recv(timeout=ROBOT_BOUND_S)))
            ws.close()
        flood.socket.shutdown(socket.SHUT_RDWR)  # unblocks the sender; the server drops the rest
        sender.join(ROBOT_BOUND_S)
        assert healthy(port)
        assert server.budget.peak <= 2 * MB
        assert wait_until(lambda: server.budget.used == 0, ROBOT_BOUND_S)
    assert no_pages_held(policy)
