"""Issue #32's goal, measured: a second robot's request latency (p50 / p99) on a `walkforge serve`
subprocess while one client sends each hostile kind, against its quiet latency, and the server's
peak RSS against its baseline. Not a test (timing): run it by hand and quote its output.

    python3 scripts/hostile_probe.py BUNDLE [--requests 40]

BUNDLE: a tiny pi0 bundle with a tokenizer (`walkforge compile pi0 --variant tiny --tokenizer DIR`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
from websockets.sync.client import connect

from walkforge.serving import protocol


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the server in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values["VmRSS"], values["VmHWM"]


def latencies(port: int, obs: dict, n: int) -> np.ndarray:
    """The robot's request → answer times (s) for `n` requests in a row."""
    ws = connect(f"ws://127.0.0.1:{port}", max_size=None)
    ws.recv()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        ws.send(protocol.packb(obs))
        ws.recv(timeout=120)
        out.append(time.perf_counter() - t0)
    ws.close()
    return np.array(out)


def attacker(port: int, frames: Callable[[], list[bytes]], read: bool, stop: threading.Event) -> None:
    """Send the hostile frames again and again until `stop`; a refused connection reconnects."""
    while not stop.is_set():
        try:
            with connect(f"ws://127.0.0.1:{port}", max_size=None, open_timeout=30) as c:
                c.recv(timeout=30)
                for frame in frames():
                    c.send(frame)
                for _ in frames() if read else ():
                    c.recv(timeout=60)
        except Exception:  # noqa: BLE001  the server may drop a hostile connection: that is its job
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=40)
    args = ap.parse_args()
    command = [sys.executable, "-m", "walkforge.cli", "serve", args.bundle, "--port", "0", "--threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        port = int(line.split("ws://")[1].split()[0].rsplit(":", 1)[1])
        for _ in range(600):
            try:
                with connect(f"ws://127.0.0.1:{port}") as c:
                    meta = protocol.unpackb(c.recv(timeout=10))
                break
            except Exception:  # noqa: BLE001  not listening yet
                time.sleep(0.2)
        spec = meta["observation_spec"]
        rng = np.random.default_rng(0)
        obs = {c: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for c in spec["cameras"]}
        obs[spec["state"]["key"]] = np.zeros(spec["state"]["dim"], np.float32)
        obs["task"] = "pick up the cup"
        latencies(port, obs, 5)  # warm
        quiet = latencies(port, obs, args.requests)
        base = rss_kb(server.pid)[0]
        print(f"quiet: p50 {np.percentile(quiet, 50) * 1e3:.1f} ms, "
              f"p99 {np.percentile(quiet, 99) * 1e3:.1f} ms; server RSS {base / 1024:.0f} MB")
        batch = {c: np.zeros((40000, 1, 1, 3), np.uint8) for c in spec["cameras"]}
        kinds = {
            "batch of 40000 (1.4 MB)": (lambda: [protocol.packb(obs | batch | {
                spec["state"]["key"]: np.zeros((40000, spec["state"]["dim"]), np.float32)})], True),
            "20 MB task": (lambda: [protocol.packb(obs | {"task": "x" * (20 << 20)})], True),
            "60 MB of empty maps": (lambda: [b"\xdd" + (60 << 20).to_bytes(4, "big") + b"\x80" * (60 << 20)],
                                    True),
            "12 × 60 MB frames, answers unread": (lambda: [protocol.packb({"task": b"\0" * (60 << 20)})] * 12,
                                                  False),
            "garbage bytes": (lambda: [bytes(rng.integers(0, 256, 4096, dtype=np.uint8))], True),
        }
        for name, (frames, read) in kinds.items():
            stop = threading.Event()
            thread = threading.Thread(target=attacker, args=(port, frames, read, stop), daemon=True)
            thread.start()
            time.sleep(1.0)
            loud = latencies(port, obs, args.requests)
            stop.set()
            thread.join(120)
            rss, hwm = rss_kb(server.pid)
            p99 = np.percentile(loud, 99)
            print(f"{name}: p50 {np.percentile(loud, 50) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms "
                  f"({p99 / np.percentile(quiet, 99):.2f}× quiet); server peak RSS {hwm / 1024:.0f} MB "
                  f"(baseline + {(hwm - base) / 1024:.0f} MB), now {rss / 1024:.0f} MB")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
