"""`walkforge client HOST:PORT --observation obs.npz`: one round trip, for people.

Speaks the server's protocol with walkforge's own codec (no openpi-client needed): reads the
metadata sent on connect, sends the npz's arrays as one observation (0-d string arrays, e.g. the
task, as strings), and returns the answer with the measured round-trip time.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.serving import protocol


def as_observation(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """An npz's arrays as an observation: 0-d string arrays (the task) become str."""
    return {k: (str(v.item()) if v.dtype.kind == "U" and v.ndim == 0 else v) for k, v in arrays.items()}


def round_trip(address: str, observation: dict[str, Any], repeat: int = 1
               ) -> tuple[dict[str, Any], dict[str, Any], list[float]]:
    """(metadata, last answer, round-trip ms of each of `repeat` requests) from HOST:PORT."""
    from websockets.sync.client import connect

    uri = address if address.startswith("ws") else f"ws://{address}"
    try:
        with connect(uri, compression=None, max_size=None, open_timeout=30) as ws:
            meta = protocol.unpackb(ws.recv())
            frame, times, answer = protocol.packb(observation), [], {}
            for _ in range(repeat):
                t0 = time.perf_counter()
                ws.send(frame)
                reply = ws.recv()
                times.append((time.perf_counter() - t0) * 1e3)
                if isinstance(reply, str):
                    raise WalkforgeError(f"server refused the observation: {reply}")
                answer = protocol.unpackb(reply)
    except OSError as exc:
        raise WalkforgeError(f"cannot reach a policy server at {uri}: {exc}") from exc
    return meta, answer, times


def describe(meta: dict[str, Any], answer: dict[str, Any], times: list[float]) -> str:
    """What `walkforge client` prints: the server, the chunk, server timing and round trips."""
    actions = np.asarray(answer["actions"])
    lines = [f"server: {meta.get('server', '?')} {meta.get('recipe', '')} {meta.get('variant', '')} "
             f"(max batch {meta.get('max_batch', '?')})",
             f"actions {list(actions.shape)} {actions.dtype}:",
             np.array2string(actions, precision=4, threshold=200, edgeitems=3, suppress_small=True),
             "server_timing: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in answer.get("server_timing", {}).items())]
    ordered = sorted(times)
    lines.append(f"round trip: {len(times)} request(s), p50 {ordered[len(ordered) // 2]:.2f} ms, "
                 f"max {ordered[-1]:.2f} ms")
    return "\n".join(lines)
