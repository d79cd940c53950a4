"""The policy server: openpi's websocket protocol, a health check, graceful shutdown.

Protocol (as openpi's `WebsocketPolicyServer` and `openpi_client.WebsocketClientPolicy` speak it):
on connect the server sends its metadata (one msgpack-numpy map); then each binary frame from the
client is one observation and each answer a binary frame {"actions": (chunk_size, A) float32 in
robot units, "server_timing": {"infer_ms", "queue_ms", "batch_size", "prev_total_ms"}}. A bad
request (not msgpack-numpy, a text frame, a wrong key, dtype or shape, a missing camera, NaN) is
answered with a TEXT frame naming the problem, which openpi-client raises as an error; unlike
openpi's server the connection stays open and usable.

HTTP `GET /healthz` on the same port answers 200 "OK" once the engines are loaded, 503 before
that and while shutting down. On SIGTERM (or SIGINT) the server stops taking requests (new ones
are refused with a text frame, new connections with 503), answers the ones in flight, then
closes every connection and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve

from walkforge.errors import WalkforgeError
from walkforge.serving import protocol
from walkforge.serving.batcher import Answer
from walkforge.serving.observations import split_request

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
MAX_FRAME = 64 << 20  # bytes of one observation frame: a few full-size camera frames fit many times over
DRAIN_TIMEOUT_S = 60.0  # SIGTERM: the longest the server waits for in-flight requests


class Executor(Protocol):
    """What answers requests: the local micro-batcher or a Ray Serve deployment."""

    async def submit(self, observation: dict, noise: Any = None) -> Answer: ...

    def close(self) -> None: ...


@dataclass
class Loaded:
    """What the server needs once the engines are up."""

    executor: Executor
    spec: Mapping[str, Any]
    metadata: dict[str, Any]
    obs_map: Mapping[str, str] = field(default_factory=dict)


class PolicyServer:
    """One websocket + HTTP front (module doc). `state`: loading → ready → draining."""

    def __init__(self) -> None:
        self.state = "loading"
        self.loaded: Loaded | None = None
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self, loaded: Loaded) -> None:
        self.loaded, self.state = loaded, "ready"

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """`GET /healthz`, and 503 for websocket handshakes while not ready."""
        if request.path == HEALTH_PATH:
            status = http.HTTPStatus.OK if self.state == "ready" else http.HTTPStatus.SERVICE_UNAVAILABLE
            return connection.respond(status, ("OK" if self.state == "ready" else self.state) + "\n")
        if self.state != "ready":
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"{self.state}\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        assert self.loaded is not None
        pack = protocol.packer()
        await ws.send(pack.pack(self.loaded.metadata))
        prev_total_ms: float | None = None
        try:
            async for message in ws:
                start = time.monotonic()
                self._begin()  # in flight until the answer is sent: SIGTERM waits for it
                try:
                    reply = await self._reply(ws, message, prev_total_ms)
                    if reply is None:  # the client left while its request ran
                        return
                    await ws.send(reply if isinstance(reply, str) else pack.pack(reply))
                finally:
                    self._end()
                prev_total_ms = (time.monotonic() - start) * 1e3
        except websockets.ConnectionClosed:
            log.info("connection from %s closed mid-request", ws.remote_address)

    async def _reply(self, ws: ServerConnection, message: str | bytes,
                     prev_total_ms: float | None) -> str | dict | None:
        """The answer map, an error text, or None when the client disconnected first."""
        if self.state != "ready":
            return "error: server is shutting down; request refused"
        if isinstance(message, str):
            return "error: send observations as binary msgpack-numpy frames, not text"
        try:
            observation, noise = split_request(protocol.unpackb(message), self.loaded.spec,
                                               self.loaded.obs_map)
            answer = await _unless_closed(ws, self.loaded.executor.submit(observation, noise))
        except WalkforgeError as exc:
            return f"error: {exc}"
        if answer is None:
            return None
        if answer.error is not None:
            return f"error: {answer.error}"
        timing = dict(answer.timing)
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        return {"actions": answer.actions, "server_timing": timing}

    def _begin(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Refuse new requests and wait (bounded) until those in flight are answered."""
        self.state = "draining"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


async def _unless_closed(ws: ServerConnection, work: Any) -> Answer | None:
    """Await `work`, but give up (cancelling it, so a queued request is dropped) if the client goes."""
    task = asyncio.ensure_future(work)
    closed = asyncio.ensure_future(ws.wait_closed())
    try:
        await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


async def run_server(load: Callable[[], Loaded], host: str = "127.0.0.1", port: int = 8000,
                     stop: asyncio.Event | None = None,
                     on_listen: Callable[[str, int], None] | None = None,
                     on_ready: Callable[[Loaded], None] | None = None) -> None:
    """Listen, load the engines (in a thread: the health check answers 503 meanwhile), serve until
    `stop` is set or SIGTERM/SIGINT arrives, then drain and close."""
    server = PolicyServer()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: no handlers
            loop.add_signal_handler(sig, stop.set)
    async with serve(server.handler, host, port, process_request=server.process_request,
                     compression=None, max_size=MAX_FRAME) as ws_server:
        bound = ws_server.sockets[0].getsockname()
        if on_listen is not None:
            on_listen(bound[0], bound[1])
        loaded = await asyncio.to_thread(load)
        server.attach(loaded)
        if on_ready is not None:
            on_ready(loaded)
        try:
            await stop.wait()
            log.info("stopping: %d request(s) in flight", server.inflight)
            await server.drain()
        finally:
            ws_server.close()
            await ws_server.wait_closed()
            await asyncio.to_thread(loaded.executor.close)
