"""Ray Serve scale-out, started locally (2 CPUs, 2 replicas): the same websocket front, answers
equal the policy's own, batches formed by `@serve.batch`; Ray is shut down afterwards."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import expected
from test_server import BATCH_WAIT_MS, SERVED_TOL, ask, client, run_clients
from tolerances import rel_err

ray = pytest.importorskip("ray", reason="the ray extra (walkforge[ray]) is not installed")


def test_ray_serve_replicas_answer_like_the_policy(pi0_bundle: Path, policy, observation):
    from walkforge.serving.app import ServeOptions
    from walkforge.serving.ray_app import load_ray
    from walkforge.serving.server import run_server

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200 << 20,
             log_to_driver=False)
    # max_batch 2 (of the ~2 requests each replica gets at a time) closes a batch once its pair
    # arrived; the long wait lets the pair meet however slowly a loaded machine routes them
    options = ServeOptions(port=0, ray=True, replicas=2, max_batch=2, batch_wait_ms=BATCH_WAIT_MS, threads=1)
    loop, stop, port, ready = asyncio.new_event_loop(), asyncio.Event(), [], threading.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(run_server(
        lambda: load_ray(pi0_bundle, options), "127.0.0.1", 0, stop,
        on_listen=lambda h, p: port.append(p), on_ready=lambda _: ready.set())), daemon=True)
    try:
        thread.start()
        assert ready.wait(600), "Ray Serve deployment did not come up"  # bounds a hang only
        ws, meta = client(port[0])
        assert meta["replicas"] == 2 and meta["observation_spec"] == policy.observation_spec()
        bad = ask(ws, {"observation.state": np.zeros(32, np.float32)})
        assert isinstance(bad, str) and "none of this policy's cameras" in bad
        ws.close()
        work = [[observation(40 + 2 * c + r) for r in range(2)] for c in range(4)]
        answers, _ = run_clients(port[0], work)
        sizes = []
        for obs_list, got in zip(work, answers, strict=True):
            for obs, answer in zip(obs_list, got, strict=True):
                assert not isinstance(answer, str), answer
                assert rel_err(answer["actions"], expected(policy, obs)) <= SERVED_TOL
                sizes.append(answer["server_timing"]["batch_size"])
        assert max(sizes) > 1
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(120)
        from ray import serve

        serve.shutdown()
        ray.shutdown()
