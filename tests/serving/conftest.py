"""Serving fixtures: one real tiny pi0 bundle (with a tokenizer), its policy, servers on loopback.

`serving(policy, **options)` runs the real server (serving.server.run_server over the real
micro-batcher) in a thread on a free port; `observation(seed)` is a raw robot observation of the
bundle (uint8 frames of another size than the model's, state, task, and its start noise).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lerobot_folder import write_tokenizer

import walkforge
from walkforge.serving.app import ServeOptions, load_local
from walkforge.serving.server import run_server

TASKS = ("pick the cube", "open it", "stack")  # short: tiny compiles 16 prompt tokens


@pytest.fixture(scope="session")
def pi0_bundle(compiled) -> Path:
    """`walkforge compile pi0 --variant tiny --tokenizer DIR` (random weights, seed 3)."""
    tokenizer = compiled.inputs("serving-tokenizer", lambda d: write_tokenizer(d / "tok"))
    return compiled("pi0", variant="tiny", seed=3, gpu_archs=(), tokenizer=tokenizer / "tok")


@pytest.fixture(scope="session")
def policy(pi0_bundle: Path):
    return walkforge.load(pi0_bundle, spinning=False)


def make_observation(spec: dict, seed: int, noise: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    obs: dict = {k: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for k in spec["cameras"]}
    obs[spec["state"]["key"]] = rng.standard_normal(spec["state"]["dim"]).astype(np.float32)
    obs["task"] = TASKS[seed % len(TASKS)]
    if noise:
        obs["noise"] = rng.standard_normal(spec["noise"]).astype(np.float32)
    return obs


@pytest.fixture(scope="session")
def observation(policy):
    spec = policy.observation_spec()
    return lambda seed, noise=True: make_observation(spec, seed, noise)


def expected(policy, obs: dict) -> np.ndarray:
    """The serial in-process answer for a served observation (its noise split off)."""
    obs = dict(obs)
    return policy.predict_action_chunk(obs, obs.pop("noise", None))


@contextlib.contextmanager
def serving(policy, **options) -> Iterator[int]:
    """The real server for `policy` on 127.0.0.1:<free port>, stopped (drained) on exit."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    port: list[int] = []
    ready = threading.Event()
    opts = ServeOptions(port=0, **options)

    def main() -> None:
        loop.run_until_complete(run_server(lambda: load_local(Path(), opts, policy=policy), "127.0.0.1", 0,
                                           stop, on_listen=lambda h, p: port.append(p),
                                           on_ready=lambda _: ready.set()))

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(60), "server did not become ready"
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


def wait_until(predicate, timeout: float = 30.0) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


OPENPI_CLIENT = "openpi-client==0.1.2"  # pins numpy < 2: it gets its own virtual environment
UNDECLARED = "typing_extensions"  # websocket_client_policy imports it; 0.1.2 does not declare it
VENV = Path(__file__).resolve().parents[2] / "build" / "venvs" / "openpi-client"


@pytest.fixture(scope="session")
def openpi_python():
    """`run(script, *args)`: runs `script` with the python of a cached venv holding the real
    openpi-client (created once with `python3 -m venv` + pip; skipped only if pip cannot install it)."""
    import subprocess
    import sys

    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import openpi_client.websocket_client_policy"]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", OPENPI_CLIENT, UNDECLARED],
                             capture_output=True, text=True)
        if pip.returncode != 0:
            pytest.skip(f"pip cannot install {OPENPI_CLIENT}: {pip.stderr.strip()[-300:]}")

    def run(script: Path, *args) -> str:
        done = subprocess.run([str(python), str(script), *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
