"""`walkforge client` (walkforge's own codec) and the load-test tool against the real server."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import expected, serving

from walkforge.serving.client import round_trip
from walkforge.serving.loadtest import load


def test_cli_client_prints_chunk_and_round_trip(policy, observation, tmp_path):
    obs = observation(8)
    np.savez(tmp_path / "obs.npz", **{k: np.asarray(v) for k, v in obs.items()})
    with serving(policy) as port:
        done = subprocess.run([sys.executable, "-m", "walkforge.cli", "client", f"127.0.0.1:{port}",
                               "--observation", str(tmp_path / "obs.npz"), "--repeat", "2"],
                              capture_output=True, text=True, timeout=120)
        _, answer, times = round_trip(f"127.0.0.1:{port}", obs)
    assert done.returncode == 0, done.stderr
    assert "actions [50, 32] float32" in done.stdout and "round trip: 2 request(s)" in done.stdout
    assert "server_timing: infer_ms" in done.stdout and len(times) == 1
    np.testing.assert_array_equal(answer["actions"], expected(policy, obs))


def test_cli_client_reports_refusal_as_one_line(policy, observation, tmp_path):
    obs = {k: np.asarray(v) for k, v in observation(8).items() if k != "task"}
    np.savez(tmp_path / "obs.npz", **obs)
    with serving(policy) as port:
        done = subprocess.run([sys.executable, "-m", "walkforge.cli", "client", f"127.0.0.1:{port}",
                               "--observation", str(tmp_path / "obs.npz")],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error:" in done.stderr and "lacks 'task'" in done.stderr


def test_loadtest_counts_every_request(policy):
    with serving(policy, max_batch=2) as port:
        report = load(f"127.0.0.1:{port}", clients=2, requests=2)
    assert report["requests"] == 4 and report["refused"] == 0 and report["batch_sizes"]


def test_serve_missing_bundle_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "walkforge.cli", "serve", str(tmp_path / "nope"),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bundle not found" in done.stderr and len(done.stderr.splitlines()) == 1
