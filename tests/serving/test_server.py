"""The real server on loopback: answers equal the policy's own, bad requests, batching, the pool.

Every answer is checked against `predict_action_chunk` in-process with the same noise. A request
served alone runs the very computation in-process does; one in a batch of several runs other GEMM
shapes, hence the named fp32 tolerance.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import expected, serving, wait_until
from tolerances import PI0_TINY_ACTIONS_TOL, rel_err
from websockets.sync.client import connect

from walkforge.serving import protocol

SERVED_TOL = PI0_TINY_ACTIONS_TOL  # a request batched with others vs alone: other GEMM blocking
BATCH_WAIT_MS = 10_000.0  # lets simultaneous requests meet in one batch even on a loaded machine


def client(port: int):
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
    return ws, protocol.unpackb(ws.recv())


def ask(ws, obs: dict):
    ws.send(protocol.packb(obs))
    reply = ws.recv()
    return reply if isinstance(reply, str) else protocol.unpackb(reply)


def test_metadata_health_and_answer(policy, observation, tmp_path):
    obs_map = tmp_path / "map.json"
    obs_map.write_text(json.dumps({"observation/image": "observation.images.cam_0", "prompt": "task"}))
    with serving(policy, obs_map=obs_map) as port:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read()
        assert body == b"OK\n"
        ws, meta = client(port)
        assert meta["observation_spec"] == policy.observation_spec() and meta["chunk_size"] == 50
        obs = observation(0)
        answer = ask(ws, obs)
        assert set(answer["server_timing"]) >= {"infer_ms", "queue_ms", "batch_size"}
        np.testing.assert_array_equal(answer["actions"], expected(policy, obs))  # alone: same maths
        renames = {"observation.images.cam_0": "observation/image", "task": "prompt"}
        openpi = {renames.get(k, k): v for k, v in obs.items()}
        again = ask(ws, openpi)
        np.testing.assert_array_equal(again["actions"], answer["actions"])
        assert "prev_total_ms" in again["server_timing"]
        ws.close()


def malformed(obs: dict, spec: dict) -> list[tuple[str, object, str]]:
    """(kind, frame, what the error must name) for every kind of bad request."""
    cam, state = spec["cameras"][0], spec["state"]["key"]
    rng = np.random.default_rng(7)
    kinds = [
        ("text frame", "hello", "binary"),
        ("not msgpack", b"\xc1\xc1", "not a msgpack-numpy"),
        ("random bytes", None, ""),
        ("not a map", protocol.packb([1, 2, 3]), "must be a msgpack map"),
        ("complex dtype", tagged_frame(obs, state, obs[state].astype(np.complex64).tobytes(), "<c8"),
         "complex"),
        ("object dtype", tagged_frame(obs, state, b"\0" * 256, "|O"), "object"),
        ("string array", protocol.packb(obs | {state: np.array(["a"] * 32)}), "not a real number"),
        ("wrong state shape", protocol.packb(obs | {state: np.zeros(31, np.float32)}), state),
        ("wrong image shape", protocol.packb(obs | {cam: np.zeros((8, 8, 5), np.uint8)}), cam),
        ("float image out of range", protocol.packb(obs | {cam: np.full((8, 8, 3), 3.0, np.float32)}), cam),
        ("no camera", protocol.packb({k: v for k, v in obs.items() if k not in spec["cameras"]}),
         "none of this policy's cameras"),
        ("NaN state", protocol.packb(obs | {state: np.full(32, np.nan, np.float32)}), "NaN"),
        ("NaN noise", protocol.packb(obs | {"noise": np.full(spec["noise"], np.nan, np.float32)}), "NaN"),
        ("wrong noise shape", protocol.packb(obs | {"noise": np.zeros((3, 3), np.float32)}), "noise"),
        ("unknown key", protocol.packb(obs | {"observation.wrist": np.zeros(3, np.float32)}), "unknown"),
        ("task not text", protocol.packb(obs | {"task": 5}), "task"),
        ("missing task", protocol.packb({k: v for k, v in obs.items() if k != "task"}), "task"),
        ("short array data", tagged_frame(obs, state, obs[state].tobytes()[:-1], "<f4"), "bytes"),
    ]
    frames = []
    for i in range(12):  # 12 rounds × 18 kinds = 216 bad requests
        for kind, frame, says in kinds:
            if frame is None:
                frame = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
            frames.append((f"{kind} #{i}", frame, says))
    return frames


def tagged_frame(obs: dict, key: str, data: bytes, dtype: str) -> bytes:
    """`obs` with `key` replaced by a hand-made array map (what a buggy client might send)."""
    import msgpack

    tag = {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": [32]}
    return msgpack.packb({k: v for k, v in obs.items() if k != key} | {key: tag}, default=protocol._encode)


def test_malformed_requests_get_text_errors_then_a_valid_one_is_answered(policy, observation):
    spec = policy.observation_spec()
    obs = observation(1)
    frames = malformed(obs, spec)
    assert len(frames) >= 200
    kinds: dict[str, str] = {}
    with serving(policy) as port:
        ws, _ = client(port)
        for kind, frame, says in frames:
            ws.send(frame)
            reply = ws.recv()
            assert isinstance(reply, str) and reply.startswith("error: "), (kind, reply)
            assert "\n" not in reply and says in reply, (kind, reply)
            kinds.setdefault(kind.split(" #")[0], reply)
        answer = ask(ws, obs)
        np.testing.assert_array_equal(answer["actions"], expected(policy, obs))
        ws.close()
    print(f"\nfuzz: {len(frames)} malformed requests of {len(kinds)} kinds, each answered with one line:")
    for kind, reply in kinds.items():
        print(f"  {kind}: {reply[:110]}")
    assert policy.paging.pages.free_pages == policy.paging.pages.num_pages


def run_clients(port: int, observations: list[list[dict]]) -> tuple[list[list[dict]], list[float]]:
    """One thread per client, each sending its observations in turn; answers and latencies (ms)."""
    answers: list[list[dict]] = [[] for _ in observations]
    latencies: list[float] = []
    start = threading.Barrier(len(observations))

    def one(i: int) -> None:
        ws, _ = client(port)
        start.wait()
        for obs in observations[i]:
            t0 = time.perf_counter()
            answers[i].append(ask(ws, obs))
            latencies.append((time.perf_counter() - t0) * 1e3)
        ws.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(observations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers, latencies


@pytest.mark.parametrize("clients, requests, max_batch", [(4, 3, 4)])
def test_many_clients_batched_answers_equal_serial(policy, observation, clients, requests, max_batch):
    """N clients × M requests through one batcher: every answer equals the serial one; batches of
    more than one formed. The batch wait is long (BATCH_WAIT_MS) so that the simultaneous first
    requests meet however slowly a loaded machine delivers them; a full batch closes at once."""
    work = [[observation(10 * c + r) for r in range(requests)] for c in range(clients)]
    with serving(policy, max_batch=max_batch, batch_wait_ms=BATCH_WAIT_MS) as port:
        t0 = time.perf_counter()
        answers, latencies = run_clients(port, work)
        wall = time.perf_counter() - t0
    sizes = []
    for obs_list, got in zip(work, answers, strict=True):
        assert len(got) == requests
        for obs, answer in zip(obs_list, got, strict=True):
            assert not isinstance(answer, str), answer
            assert rel_err(answer["actions"], expected(policy, obs)) <= SERVED_TOL
            sizes.append(answer["server_timing"]["batch_size"])
    assert max(sizes) > 1
    lat = np.percentile(latencies, [50, 99])
    print(f"\nload (report only, polluted machine): {clients} clients × {requests} requests, max batch "
          f"{max_batch}: {clients * requests / wall:.1f} req/s, p50 {lat[0]:.0f} ms, p99 {lat[1]:.0f} ms, "
          f"batch sizes {sorted(set(sizes))}")


def test_client_that_disconnects_mid_request_leaks_no_pages(policy, observation):
    pages = policy.paging.pages
    with serving(policy, batch_wait_ms=200.0) as port:
        for i in range(5):
            ws, _ = client(port)
            ws.send(protocol.packb(observation(i)))
            ws.close()  # gone before (or while) its batch runs
        ws, _ = client(port)
        obs = observation(9)
        np.testing.assert_array_equal(ask(ws, obs)["actions"], expected(policy, obs))
        ws.close()
        assert wait_until(lambda: pages.free_pages == pages.num_pages, timeout=120)  # bounds a hang only
    assert pages.free_pages == pages.num_pages


def test_full_pool_waits_then_answers(policy, observation):
    """Pages held elsewhere make a request wait (bounded) and it is answered once they free."""
    pages = policy.paging.pages
    with serving(policy, pool_wait_ms=30000.0) as port:
        pages.allocate("hog", pages.free_pages * pages.spec.page_size)
        try:
            ws, _ = client(port)
            obs = observation(3)
            ws.send(protocol.packb(obs))
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)  # waiting for pages, not answered, not refused
        finally:
            pages.free("hog")
        np.testing.assert_array_equal(protocol.unpackb(ws.recv(timeout=30))["actions"], expected(policy, obs))
        ws.close()


def test_full_pool_refuses_after_the_wait_and_keeps_serving(policy, observation):
    pages = policy.paging.pages
    with serving(policy, pool_wait_ms=100.0) as port:
        ws, _ = client(port)
        pages.allocate("hog", pages.free_pages * pages.spec.page_size)
        try:
            reply = ask(ws, observation(4))
        finally:
            pages.free("hog")
        assert isinstance(reply, str) and "KV page pool full" in reply and "0 of" in reply
        obs = observation(5)
        np.testing.assert_array_equal(ask(ws, obs)["actions"], expected(policy, obs))
        ws.close()


def test_health_is_503_while_loading(policy):
    """Before the engines are loaded the health check says so (and refuses websockets)."""
    from walkforge.serving.server import PolicyServer

    server = PolicyServer()
    import asyncio

    from websockets.asyncio.server import serve

    async def probe() -> tuple[int, bytes]:
        async with serve(server.handler, "127.0.0.1", 0, process_request=server.process_request) as s:
            port = s.sockets[0].getsockname()[1]
            try:
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz")
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
        return 200, b""

    assert asyncio.run(probe()) == (503, b"loading\n")
