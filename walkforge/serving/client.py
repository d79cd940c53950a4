"""`walkforge client HOST:PORT --observation obs.npz`: one round trip, for people.

Speaks the server's protocol with walkforge's own codec (no openpi-client needed): reads the
metadata sent on connect, sends the npz's arrays as one observation (0-d string arrays, e.g. the
task, as strings), and returns the answer with the measured round-trip time. Every wait is
bounded (`timeout`: connecting, the metadata, each answer) and so is an answer's size
(`max_answer_bytes`); a silent server, one that is not a websocket policy server (plain HTTP), an
answer without `actions` or too big are one-line errors.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.serving import protocol
from walkforge.serving.limits import MAX_DEPTH, MAX_OBJECTS, scan_frame

TIMEOUT_S = 30.0  # connect, metadata and each answer
MAX_ANSWER = 16 << 20  # bytes of one answer (a chunk of 50 × 32 float32 is 6.4 kB) or the metadata


def as_observation(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """An npz's arrays as an observation: 0-d string arrays (the task) become str."""
    return {k: (str(v.item()) if v.dtype.kind == "U" and v.ndim == 0 else v) for k, v in arrays.items()}


def decode_reply(data: bytes, what: str, max_str: int = MAX_ANSWER) -> Any:
    """A server's binary frame, its structure bounded before it is built (limits.scan_frame)."""
    scan_frame(data, MAX_OBJECTS * 64, MAX_DEPTH, max_str)  # metadata: a few hundred objects
    try:
        return protocol.unpackb(data)
    except WalkforgeError as exc:
        raise WalkforgeError(f"{what}: {exc}") from None


def check_answer(answer: Any) -> dict[str, Any]:
    """The answer map, with `actions` a real-number array."""
    if not isinstance(answer, dict) or "actions" not in answer:
        keys = ", ".join(map(str, answer)) if isinstance(answer, dict) else type(answer).__name__
        raise WalkforgeError(f"the server answered without 'actions' (got {keys or 'an empty map'}): "
                             "not a walkforge/openpi policy server?")
    actions = answer["actions"]
    if not isinstance(actions, np.ndarray) or actions.dtype.kind not in "iuf":
        raise WalkforgeError(f"the server's 'actions' is not a number array ({type(actions).__name__})")
    return answer


def round_trip(address: str, observation: dict[str, Any], repeat: int = 1, timeout: float = TIMEOUT_S,
               max_answer_bytes: int = MAX_ANSWER) -> tuple[dict[str, Any], dict[str, Any], list[float]]:
    """(metadata, last answer, round-trip ms of each of `repeat` requests) from HOST:PORT."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    if timeout <= 0 or max_answer_bytes <= 0:
        raise WalkforgeError(f"--timeout and --max-answer-mb must be > 0, got {timeout} and "
                             f"{max_answer_bytes} bytes")
    uri = address if address.startswith("ws") else f"ws://{address}"
    try:
        with connect(uri, compression=None, max_size=max_answer_bytes, open_timeout=timeout,
                     close_timeout=min(timeout, 5.0)) as ws:
            meta = ws.recv(timeout=timeout)
            if isinstance(meta, str):
                raise WalkforgeError(f"{uri} sent text instead of its metadata: {meta[:200]!r}")
            meta = decode_reply(meta, "the server's metadata")
            if not isinstance(meta, dict):
                raise WalkforgeError(f"{uri} sent {type(meta).__name__} instead of a metadata map")
            frame, times, answer = protocol.packb(observation), [], {}
            for _ in range(repeat):
                t0 = time.perf_counter()
                ws.send(frame)
                reply = ws.recv(timeout=timeout)
                times.append((time.perf_counter() - t0) * 1e3)
                if isinstance(reply, str):
                    raise WalkforgeError(f"server refused the observation: {reply[:2000]}")
                answer = check_answer(decode_reply(reply, "the server's answer"))
    except TimeoutError:
        raise WalkforgeError(f"no answer from {uri} within {timeout:g} s (--timeout)") from None
    except InvalidURI as exc:
        raise WalkforgeError(f"bad server address '{address}': {exc}") from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = (exc.response.body or b"")[:200].decode(errors="replace").strip()
        if status == 503:  # a walkforge server loading, draining or full
            raise WalkforgeError(f"{uri} refused the connection (HTTP 503): {body}") from None
        raise WalkforgeError(f"{uri} is not a websocket policy server (it answered HTTP {status})") from None
    except InvalidHandshake as exc:
        raise WalkforgeError(f"{uri} is not a websocket policy server: {exc}") from None
    except ConnectionClosed as exc:
        if 1009 in {frame.code for frame in (exc.rcvd, exc.sent) if frame is not None}:
            raise WalkforgeError(f"{uri} sent a message over {max_answer_bytes} bytes (--max-answer-mb)"
                                 ) from None
        raise WalkforgeError(f"{uri} closed the connection: {exc}") from None
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
