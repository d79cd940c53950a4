"""`walkforge serve` and `walkforge client` failures are one stderr line and exit 2 (issue #32):
a taken port, a port out of range, a host that is not this machine's, a wrong --digest; a silent
server (--timeout), a plain HTTP server, an answer without `actions`, an answer over
--max-answer-mb. The peers the client meets are real sockets and servers, not mocks."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_cli import main_error
from websockets.sync.server import serve as ws_serve

from walkforge.artifacts.bundle import manifest_digest
from walkforge.serving import protocol
from walkforge.serving.app import ServeOptions, load_local

TIMEOUT = "1"  # seconds: the client's --timeout against a server that never answers


def test_serve_on_a_taken_port_is_one_line(pi0_bundle, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = main_error(capsys, "serve", pi0_bundle, "--port", port)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line


@pytest.mark.parametrize("flags, says", [
    (("--port", "70000"), "ports are 0 … 65535"),
    (("--port", "-1"), "ports are 0 … 65535"),
    (("--host", "203.0.113.7", "--port", "0"), "cannot listen on 203.0.113.7:0"),  # TEST-NET-3: not ours
    (("--host", "no-such-host.invalid", "--port", "0"), "cannot listen on no-such-host.invalid:0"),
    (("--max-inflight-mb", "1", "--max-frame-mb", "2"), "must hold at least one frame"),
    (("--max-connections", "0"), "--max-connections"),
])
def test_serve_bad_address_or_bounds_is_one_line(pi0_bundle, capsys, flags, says):
    assert says in main_error(capsys, "serve", pi0_bundle, *flags)


def test_serve_digest_pins_the_bundle(pi0_bundle, capsys):
    line = main_error(capsys, "serve", pi0_bundle, "--port", "0", "--digest", "0" * 64)
    assert "not the pinned" in line and "refused" in line
    loaded = load_local(pi0_bundle, ServeOptions(digest=manifest_digest(pi0_bundle), threads=1))
    loaded.executor.close()


@pytest.fixture
def obs_npz(observation, tmp_path) -> Path:
    path = tmp_path / "obs.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in observation(60).items()})
    return path


def client_error(capsys, port: int, obs_npz: Path, *flags: str) -> str:
    return main_error(capsys, "client", f"127.0.0.1:{port}", "--observation", obs_npz, *flags)


def test_client_times_out_on_a_silent_server(capsys, obs_npz):
    with socket.socket() as silent:  # the kernel accepts the connection; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        line = client_error(capsys, silent.getsockname()[1], obs_npz, "--timeout", TIMEOUT)
    assert f"within {TIMEOUT} s" in line


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_client_on_a_plain_http_server(capsys, obs_npz):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        line = client_error(capsys, server.server_address[1], obs_npz, "--timeout", "20")
    finally:
        server.shutdown()
        server.server_close()
    assert "is not a websocket policy server (it answered HTTP 200)" in line


@contextlib.contextmanager
def websocket_peer(answer: Callable[[bytes], bytes]) -> Iterator[int]:
    """A real websocket server that sends metadata, then `answer(frame)` for each frame."""
    def handler(ws) -> None:
        ws.send(protocol.packb({"server": "not walkforge"}))
        for frame in ws:
            ws.send(answer(frame))

    with ws_serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.socket.getsockname()[1]
        finally:
            server.shutdown()
            thread.join(20)


def test_client_on_an_answer_without_actions(capsys, obs_npz):
    with websocket_peer(lambda _: protocol.packb({"result": [1, 2]})) as port:
        line = client_error(capsys, port, obs_npz, "--timeout", "20")
    assert "answered without 'actions' (got result)" in line


def test_client_refuses_an_answer_over_its_bound(capsys, obs_npz):
    huge = protocol.packb({"actions": np.zeros((600_000,), np.float32)})  # 2.4 MB
    with websocket_peer(lambda _: huge) as port:
        line = client_error(capsys, port, obs_npz, "--timeout", "20", "--max-answer-mb", "1")
    assert f"over {1 << 20} bytes (--max-answer-mb)" in line
