"""The walk chainer: runs a bundle's plan over one name → value environment, and owns KV paging.

A plan is a list of walk names and loops (see graphs.walk). Values stay in the backend's own
type between engines (OrtValue, torch.Tensor), so a cache produced by one walk is handed to the
next by reference. An optional `observer(walk, inputs, seconds)` sees every engine call (bench
timings, verify's per-walk inputs, calibration).

Paging comes from the walk contracts alone, for any recipe: the page pool is the input that a
walk updates in place (its `aliases`), its pages per request follow from the manifest's
`paging.max_tokens` (or the front's exact token counts), and every walk that takes
`block_table` / `kv_scales` gets the requests' pages and the bundle's per-layer scales. Pages are
allocated when a run starts and freed when it ends, whatever happens in between.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from walkforge.artifacts.manifest import Manifest, as_manifest
from walkforge.errors import WalkforgeError
from walkforge.plugins.constants import kv_pages
from walkforge.runtimes.kv_pool import DEFAULT_POOL_REQUESTS, KVPagePool, PoolSpec, kv_scales
from walkforge.runtimes.values import batch_size

Observer = Callable[[str, Mapping[str, Any], float], None]
BLOCK_TABLE, KV_SCALES = "block_table", "kv_scales"


def euler(step: int, count: int, batch: int) -> dict[str, np.ndarray]:
    """Flow-matching Euler schedule: t = 1 is noise, t = 0 data; t_k = 1 + k·dt, dt = −1/count."""
    dt = -1.0 / count
    return {"t": np.full((batch,), 1.0 + step * dt, dtype=np.float32),
            "dt": np.array([dt], dtype=np.float32)}


def shifted_euler(step: int, count: int, batch: int, timestep_shift: float = 1.0) -> dict[str, np.ndarray]:
    """BAGEL's schedule: N = count + 1 timesteps u_k = linspace(1, 0, N), shifted
    t_k = s·u_k / (1 + (s − 1)·u_k) with s = `timestep_shift` (a run setting); step k evaluates t_k
    and moves by dt = t_{k+1} − t_k < 0 (x ← x + dt·v). fp32, as BAGEL computes it."""
    u = np.linspace(1.0, 0.0, count + 1, dtype=np.float32)[step : step + 2]
    s = np.float32(timestep_shift)
    t = s * u / (np.float32(1.0) + (s - np.float32(1.0)) * u)
    return {"t": np.full((batch,), t[0], dtype=np.float32), "dt": np.array([t[1] - t[0]], dtype=np.float32)}


SCHEDULES = {"euler": euler, "shifted_euler": shifted_euler}
SCHEDULE_SETTINGS = {"shifted_euler": ("timestep_shift",)}
"""The run settings a schedule takes as keywords besides (step, count, batch)."""


def pool_writer(manifest: Manifest | Mapping[str, Any]) -> tuple[str, str] | None:
    """(walk, pool input) of the walk that updates the page pool in place, or None."""
    for name, walk in as_manifest(manifest).walks.items():
        for inp in (walk.aliases or {}).values():
            return name, inp
    return None


class Paging:
    """The page pool of one loaded bundle and its per-request pages (module doc).

    `allocate_pool(spec)` is the backend's: it decides where the buffer lives. `num_pages`
    defaults to DEFAULT_POOL_REQUESTS full-length requests.
    """

    def __init__(self, manifest: Manifest | Mapping[str, Any], engines: Mapping[str, Any],
                 allocate_pool: Callable[[PoolSpec], Any], num_pages: int | None = None) -> None:
        manifest = as_manifest(manifest)
        found = pool_writer(manifest)
        if found is None:
            raise ValueError("bundle has no walk that writes a page pool")
        writer, self.pool = found
        if manifest.paging is None:
            raise WalkforgeError("bundle has a KV page pool but no 'paging' entry (compiled by an older "
                                 "walkforge): recompile it")
        self.max_tokens = int(manifest.paging.max_tokens)
        spec = next(s for s in engines[writer].inputs if s.name == self.pool)  # the engines' own dtype
        layers, _, _, page_size, kv_heads, head_dim = spec.shape
        pages = num_pages or DEFAULT_POOL_REQUESTS * kv_pages(self.max_tokens, page_size)
        self.spec = PoolSpec(layers, kv_heads, head_dim, page_size, pages, spec.dtype)
        self.pages = KVPagePool(self.spec)
        self.buffer = allocate_pool(self.spec)
        self.scales = kv_scales(manifest, layers)
        self._ids = itertools.count(1)  # next() on a count is atomic: ids are unique across threads

    @contextmanager
    def bind(self, tokens: Sequence[int]) -> Iterator[dict[str, Any]]:
        """Pages for one request per entry of `tokens` (its KV token count), bound as the pool,
        block table and scales for the duration of the `with`; freed on exit."""
        for n in tokens:
            if not 0 <= n <= self.max_tokens:
                raise WalkforgeError(f"a request of {n} KV tokens; this bundle holds at most "
                                     f"{self.max_tokens}")
        requests = {next(self._ids): int(n) for n in tokens}
        self.pages.allocate_all(requests)
        try:
            yield {self.pool: self.buffer, BLOCK_TABLE: self.pages.block_table(list(requests)),
                   KV_SCALES: self.scales}
        finally:
            for request in requests:
                self.pages.free(request)


class Chain:
    """Engines by walk name, the plan that orders them and, where a walk writes a page pool,
    its `Paging`."""

    def __init__(self, engines: Mapping[str, Any], plan: list[Any], paging: Paging | None = None,
                 after: Callable[[], None] | None = None) -> None:
        self.engines = dict(engines)
        self.plan = plan
        self.paging = paging
        self.observer: Observer | None = None
        self.after = after  # called after each run, before its results are handed out (Runner: the
        # bundle's files re-checked, since an engine may map a file a writer can change in place)

    def run(self, env: dict[str, Any], settings: Mapping[str, int],
            kv_tokens: Sequence[int] | None = None) -> dict[str, Any]:
        """Run the plan, updating and returning `env`. With paging, each request (batch row) gets
        pages for `kv_tokens[row]` tokens (default: the bundle's most per request)."""
        if self.paging is None:
            env = self._run_plan(env, settings)
        else:
            if kv_tokens is None:
                first = self.engines[self.plan[0] if isinstance(self.plan[0], str) else self.plan[0]["loop"]]
                kv_tokens = [self.paging.max_tokens] * batch_size(env[first.inputs[0].name])
            with self.paging.bind(kv_tokens) as bound:
                env = self._run_plan(env | bound, settings)
        if self.after is not None:
            self.after()
        return env

    def _run_plan(self, env: dict[str, Any], settings: Mapping[str, int]) -> dict[str, Any]:
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
        extra = {k: settings[k] for k in SCHEDULE_SETTINGS.get(loop["schedule"], ()) if k in settings}
        first = next(iter(loop["carry"].values()))
        guide = self._guide(loop, env)
        for k in range(count):
            if schedule is not None:
                env.update(schedule(k, count, batch_size(env[first]), **extra))
            self._walk(loop["loop"], env)
            if guide is not None:
                self._walk(guide, env)
                env[next(iter(loop["carry"]))] = env[self.engines[guide].outputs[0].name]
            for out, inp in loop["carry"].items():
                env[inp] = env[out]

    def _guide(self, loop: Mapping[str, Any], env: Mapping[str, Any]) -> str | None:
        """The loop's guide walk (graphs.walk.Loop) when the caller gave the inputs only it takes
        (those that are none of the body's inputs or outputs), else None."""
        guide = loop.get("guide")
        if not guide:
            return None
        body = self.engines[loop["loop"]]
        made = {s.name for s in (*body.inputs, *body.outputs)}
        own = [s.name for s in self.engines[guide].inputs if s.name not in made]
        return guide if own and all(name in env for name in own) else None
