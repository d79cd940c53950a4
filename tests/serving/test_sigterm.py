"""`walkforge serve` as a subprocess: health after load, and SIGTERM answers in-flight requests,
refuses new ones, closes connections and exits 0. Its own bundle process, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
from conftest import expected, wait_until
from websockets.sync.client import connect

from walkforge.serving import protocol

BATCH_WAIT_S = 10  # far longer than the steps from the first request to the second's refusal (ms)
SLOW_S = 120  # bounds a hang only: a loaded machine may be slow to start, drain or exit


def start(bundle, *flags: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "walkforge.cli", "serve", str(bundle), "--port", "0",
                             "--threads", "1", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert "listening on ws://" in line, line + proc.stderr.read()
    port = int(line.split("ws://")[1].split()[0].rsplit(":", 1)[1])
    return proc, port


def healthy(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read() == b"OK\n"
    except OSError:
        return False


def test_sigterm_answers_in_flight_refuses_new_and_exits(pi0_bundle, policy, observation):
    # The first request's batch waits BATCH_WAIT_S for company: in flight while the signal arrives
    # and the second request is refused. Each step below waits for what it needs (the server
    # draining), not for a time, except the server taking in the first request: ms, given 1 s.
    proc, port = start(pi0_bundle, "--batch-wait-ms", str(BATCH_WAIT_S * 1000), "--max-batch", "8")
    try:
        assert wait_until(lambda: healthy(port), SLOW_S)
        first, _ = connect(f"ws://127.0.0.1:{port}", max_size=None), None
        second = connect(f"ws://127.0.0.1:{port}", max_size=None)
        protocol.unpackb(first.recv()), protocol.unpackb(second.recv())
        obs = observation(6)
        first.send(protocol.packb(obs))
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        assert wait_until(lambda: not healthy(port), SLOW_S)  # draining: 503
        second.send(protocol.packb(observation(7)))
        refused = second.recv(timeout=SLOW_S)
        assert isinstance(refused, str) and "shutting down" in refused
        assert not healthy(port)
        answer = protocol.unpackb(first.recv(timeout=SLOW_S))
        np.testing.assert_array_equal(answer["actions"], expected(policy, obs))
        assert proc.wait(timeout=SLOW_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
