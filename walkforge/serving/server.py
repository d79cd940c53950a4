"""The policy server: openpi's websocket protocol, a health check, graceful shutdown.

Protocol (as openpi's `WebsocketPolicyServer` and `openpi_client.WebsocketClientPolicy` speak it):
on connect the server sends its metadata (one msgpack-numpy map); then each binary frame from the
client is one observation and each answer a binary frame {"actions": (chunk_size, A) float32 in
robot units, "server_timing": {"infer_ms", "queue_ms", "batch_size", "prev_total_ms"}}. A bad
request (not msgpack-numpy, a text frame, a wrong key, dtype or shape, a missing camera, NaN) is
answered with a TEXT frame naming the problem, which openpi-client raises as an error; unlike
openpi's server the connection stays open and usable.

Real-time chunking (issue #31): a request may carry `executed`, `inference_delay`,
`prev_chunk_left_over` and `rtc` beside its observation (limits.check_rtc; docs/serving.md). Each
connection keeps its last answer's model-space chunk (a local of its handler, gone when it
closes); `executed` = k cuts the leftover from it as LeRobot's queue does (`cut_leftover`: rows
k onwards, the first action_dim dims). The batcher runs RTC and plain requests in one batch.

Hostile clients (issue #32): every frame is decoded and checked against the bundle's bounds
(limits.py) in a small thread pool, never on the event loop, and before any preprocessing, so
`/healthz` and other robots stay responsive while one client sends junk. Buffering is bounded
(ServerLimits): websockets refuses a frame over `max_frame_bytes` (closing with 1009) and stops
reading a connection that has one frame waiting behind the one being answered (TCP backpressure
to the client), or whose answers it does not read (`write_limit`); frames being decoded, checked
or answered hold at most `max_inflight_bytes` over all connections (a frame waits for room, its
connection unread meanwhile); more than `max_connections` websockets get 503. At most
max_inflight_bytes + max_connections × (max_frame_bytes + a socket read) are buffered in all.

HTTP `GET /healthz` on the same port answers 200 "OK" once the engines are loaded, 503 before
that and while shutting down. On SIGTERM (or SIGINT) the server stops taking requests (new ones
are refused with a text frame, new connections with 503), answers the ones in flight, then
closes every connection and returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import logging
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve

from walkforge.errors import WalkforgeError
from walkforge.serving import protocol
from walkforge.serving.batcher import Answer
from walkforge.serving.limits import MAX_FRAME_BYTES, Limits
from walkforge.serving.observations import parse_rtc_request

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
MAX_FRAME = MAX_FRAME_BYTES  # bytes of one observation frame (limits.py)
DRAIN_TIMEOUT_S = 60.0  # SIGTERM: the longest the server waits for in-flight requests
MAX_INFLIGHT = 256 << 20  # bytes of frames being decoded, checked or answered, all connections
MAX_CONNECTIONS = 32  # open websockets; more get 503
DECODE_THREADS = 2  # threads decoding and checking frames off the event loop
WS_MAX_QUEUE = (0, 0)  # websockets stops reading a connection with one frame waiting (high, low)
WRITE_LIMIT = 1 << 15  # bytes of unsent answers before a connection's handler waits (websockets')


@dataclass(frozen=True)
class ServerLimits:
    """What the server buffers and does at once (module doc); `frame`: what one frame may hold."""

    frame: Limits = field(default_factory=Limits)
    max_inflight_bytes: int = MAX_INFLIGHT
    max_connections: int = MAX_CONNECTIONS
    decode_threads: int = DECODE_THREADS

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.decode_threads < 1:
            raise WalkforgeError(f"--max-connections and --decode-threads must be ≥ 1, got "
                                 f"{self.max_connections} and {self.decode_threads}")
        if self.max_inflight_bytes < self.frame.max_frame_bytes:
            raise WalkforgeError(f"the in-flight bound ({self.max_inflight_bytes} bytes) must hold at "
                                 f"least one frame of the frame bound ({self.frame.max_frame_bytes} bytes)")


class ByteBudget:
    """Bytes held by frames in flight, over all connections: `acquire(n)` waits (first come, first
    served) until `used + n ≤ limit`; `release(n)` gives them back. `peak`: the most ever held."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.peak = limit, 0, 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int) -> None:
        if n > self.limit:
            raise WalkforgeError(f"frame of {n} bytes is over the in-flight bound of {self.limit}")
        if not self._waiting and self.used + n <= self.limit:
            self._take(n)
            return
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]  # _wake took the bytes for us
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release(n)
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiting.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            n, future = self._waiting.popleft()
            if not future.done():
                self._take(n)
                future.set_result(None)


class Executor(Protocol):
    """What answers requests: the local micro-batcher or a Ray Serve deployment."""

    async def submit(self, observation: dict, noise: Any = None, rtc: Any = None) -> Answer: ...

    def close(self) -> None: ...


@dataclass
class Loaded:
    """What the server needs once the engines are up."""

    executor: Executor
    spec: Mapping[str, Any]
    metadata: dict[str, Any]
    obs_map: Mapping[str, str] = field(default_factory=dict)
    rtc_refusal: str | None = None
    """Why requests with real-time chunking keys are refused (None: they are served)."""


@dataclass
class _Connection:
    """One connection's state: its last answer's model-space chunk (None before the first)."""

    model: Any = None


def cut_leftover(model: Any, executed: int, action_dim: int) -> Any:
    """The next `prev_chunk_left_over` from the last model-space chunk (chunk, max_action_dim)
    after `executed` of its rows ran: the rows not executed yet, first action_dim dims — what
    LeRobot's queue (runtimes.rtc.ActionQueue.left_over) hands."""
    return model[executed:, :action_dim]


class PolicyServer:
    """One websocket + HTTP front (module doc). `state`: loading → ready → draining."""

    def __init__(self, limits: ServerLimits | None = None) -> None:
        self.state = "loading"
        self.loaded: Loaded | None = None
        self.limits = limits or ServerLimits()
        self.inflight = 0
        self.connections = 0
        self.frames = 0  # frames taken from websockets (tests: backpressure leaves the rest unread)
        self.budget = ByteBudget(self.limits.max_inflight_bytes)
        self.pool = ThreadPoolExecutor(self.limits.decode_threads, thread_name_prefix="walkforge-decode")
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
        if self.connections >= self.limits.max_connections:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"too many connections ({self.connections}, --max-connections "
                                      f"{self.limits.max_connections}); try again later\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        assert self.loaded is not None
        pack = protocol.packer()
        prev_total_ms: float | None = None
        memory = _Connection()  # this connection's RTC state: dropped when the handler returns
        self.connections += 1
        try:
            await ws.send(pack.pack(self.loaded.metadata))
            async for message in ws:
                self.frames += 1
                start = time.monotonic()
                self._begin()  # in flight until the answer is sent: SIGTERM waits for it
                try:
                    reply = await self._reply(ws, message, prev_total_ms, memory)
                    if reply is None:  # the client left while its request ran
                        return
                    await ws.send(reply if isinstance(reply, str) else pack.pack(reply))
                finally:
                    self._end()
                prev_total_ms = (time.monotonic() - start) * 1e3
        except websockets.ConnectionClosed:
            log.info("connection from %s closed mid-request", ws.remote_address)
        finally:
            self.connections -= 1

    async def _reply(self, ws: ServerConnection, message: str | bytes,
                     prev_total_ms: float | None, memory: _Connection | None = None) -> str | dict | None:
        """The answer map, an error text, or None when the client disconnected first."""
        if self.state != "ready":
            return "error: server is shutting down; request refused"
        if isinstance(message, str):
            return "error: send observations as binary msgpack-numpy frames, not text"
        size = len(message)
        try:
            await self.budget.acquire(size)  # waits for room: this connection is not read meanwhile
        except WalkforgeError as exc:  # a frame over the whole bound (ServerLimits forbids it)
            return f"error: {exc}"
        try:
            loaded, loop = self.loaded, asyncio.get_running_loop()
            observation, noise, keys = await loop.run_in_executor(
                self.pool, parse_rtc_request, message, loaded.spec, loaded.obs_map, self.limits.frame)
            rtc = _rtc_inputs(keys, loaded, memory)
            answer = await _unless_closed(ws, loaded.executor.submit(observation, noise, rtc))
        except WalkforgeError as exc:
            return f"error: {exc}"
        except Exception as exc:  # a bug: log its traceback, tell the client, keep serving
            log.exception("request from %s failed", ws.remote_address)
            return f"error: internal server error: {type(exc).__name__}: {str(exc)[:200]}"
        finally:
            self.budget.release(size)
        if answer is None:
            return None
        if answer.error is not None:
            return f"error: {answer.error}"
        if memory is not None:
            memory.model = answer.model
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


def _rtc_inputs(keys: Mapping[str, Any] | None, loaded: Loaded, memory: _Connection | None
                ) -> dict[str, Any] | None:
    """A request's checked RTC keys as predict_chunks' rtc_inputs entry (the leftover cut from the
    connection's last chunk for `executed`); a one-line WalkforgeError where they cannot be served."""
    if not keys:
        return None
    if loaded.rtc_refusal is not None:
        raise WalkforgeError(f"real-time chunking keys ({', '.join(keys)}) refused: {loaded.rtc_refusal}")
    rtc = {k: v for k, v in keys.items() if k != "executed"}
    if "executed" in keys:
        last = None if memory is None else memory.model
        if last is None:
            raise WalkforgeError("'executed': this connection has had no answer yet to cut a leftover "
                                 "from; send it from the second request on")
        if keys["executed"] > len(last):
            raise WalkforgeError(f"'executed': {keys['executed']} actions, but the last chunk has "
                                 f"{len(last)}")
        dim = int(loaded.spec["action"]["dim"])
        rtc["prev_chunk_left_over"] = cut_leftover(last, keys["executed"], dim)
    return rtc


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


async def listen(server: PolicyServer, host: str, port: int) -> Any:
    """The websocket server bound to host:port; a port that is taken, out of range or a host that
    is not this machine's is a one-line WalkforgeError."""
    if not 0 <= port <= 65535:
        raise WalkforgeError(f"cannot listen on port {port}: ports are 0 … 65535")
    try:
        return await serve(server.handler, host, port, process_request=server.process_request,
                           compression=None, max_size=server.limits.frame.max_frame_bytes,
                           max_queue=WS_MAX_QUEUE, write_limit=WRITE_LIMIT)
    except (OSError, OverflowError, UnicodeError) as exc:  # EADDRINUSE, EADDRNOTAVAIL, gaierror, …
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise WalkforgeError(f"cannot listen on {host}:{port}: {reason}") from None


async def run_server(load: Callable[[], Loaded], host: str = "127.0.0.1", port: int = 8000,
                     stop: asyncio.Event | None = None,
                     on_listen: Callable[[str, int], None] | None = None,
                     on_ready: Callable[[Loaded], None] | None = None,
                     limits: ServerLimits | None = None,
                     on_server: Callable[[PolicyServer], None] | None = None) -> None:
    """Listen, load the engines (in a thread: the health check answers 503 meanwhile), serve until
    `stop` is set or SIGTERM/SIGINT arrives, then drain and close. `on_server` sees the
    PolicyServer (its counters: tests)."""
    server = PolicyServer(limits)
    if on_server is not None:
        on_server(server)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: no handlers
            loop.add_signal_handler(sig, stop.set)
    ws_server = await listen(server, host, port)  # the decode pool starts no thread until a frame
    async with ws_server:
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
            server.pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(loaded.executor.close)
