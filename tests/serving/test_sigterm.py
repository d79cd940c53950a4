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
    # a long batch wait keeps the first request in flight while the signal arrives
    proc, port = start(pi0_bundle, "--batch-wait-ms", "3000", "--max-batch", "8")
    try:
        assert wait_until(lambda: healthy(port), 90)
        first, _ = connect(f"ws://127.0.0.1:{port}", max_size=None), None
        second = connect(f"ws://127.0.0.1:{port}", max_size=None)
        protocol.unpackb(first.recv()), protocol.unpackb(second.recv())
        obs = observation(6)
        first.send(protocol.packb(obs))
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        second.send(protocol.packb(observation(7)))
        refused = second.recv(timeout=30)
        assert isinstance(refused, str) and "shutting down" in refused
        assert not healthy(port)
        answer = protocol.unpackb(first.recv(timeout=30))
        np.testing.assert_array_equal(answer["actions"], expected(policy, obs))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
