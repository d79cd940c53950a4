"""The walk chainer: runs a bundle's plan over one name → value environment.

A plan is a list of walk names and loops (see graphs.walk). Values stay in the backend's
own type between engines (OrtValue, torch.Tensor), so a cache produced by one walk is handed
to the next by reference. An optional `observer(walk, inputs, seconds)` sees every engine
call (bench timings, verify's per-walk inputs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError

Observer = Callable[[str, Mapping[str, Any], float], None]


def euler(step: int, count: int, batch: int) -> dict[str, np.ndarray]:
    """Flow-matching Euler schedule: t = 1 is noise, t = 0 data; t_k = 1 + k·dt, dt = −1/count."""
    dt = -1.0 / count
    return {"t": np.full((batch,), 1.0 + step * dt, dtype=np.float32),
            "dt": np.array([dt], dtype=np.float32)}


SCHEDULES = {"euler": euler}


class Chain:
    """Engines by walk name plus the plan that orders them."""

    def __init__(self, engines: Mapping[str, Any], plan: list[Any]) -> None:
        self.engines = dict(engines)
        self.plan = plan
        self.observer: Observer | None = None

    def run(self, env: dict[str, Any], settings: Mapping[str, int]) -> dict[str, Any]:
        """Run the plan, updating and returning `env`."""
        for step in self.plan:
            if isinstance(step, str):
                self._walk(step, env)
            else:
                self._loop(step, env, settings)
        return env

    def _walk(self, name: str, env: dict[str, Any]) -> None:
        engine = self.engines[name]
        t0 = time.perf_counter()
        outputs = engine.run(env)
        if self.observer is not None:
            self.observer(name, {s.name: env[s.name] for s in engine.inputs}, time.perf_counter() - t0)
        env.update(outputs)
        for out, inp in engine.aliases.items():  # an in-place output is the input's new value
            env[inp] = outputs[out]

    def _loop(self, loop: Mapping[str, Any], env: dict[str, Any], settings: Mapping[str, int]) -> None:
        count = int(settings[loop["count"]])
        if count < 1:
            raise WalkforgeError(f"{loop['count']} must be ≥ 1, got {count}")
        schedule = SCHEDULES[loop["schedule"]] if loop["schedule"] else None
        first = next(iter(loop["carry"].values()))
        for k in range(count):
            if schedule is not None:
                env.update(schedule(k, count, batch_size(env[first])))
            self._walk(loop["loop"], env)
            for out, inp in loop["carry"].items():
                env[inp] = env[out]


def batch_size(value: Any) -> int:
    """Leading dim of a numpy array, torch tensor or OrtValue."""
    shape = value.shape() if callable(getattr(value, "shape", None)) else value.shape
    return int(shape[0])
