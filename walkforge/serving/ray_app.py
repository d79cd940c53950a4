"""`walkforge serve BUNDLE --ray [--replicas N]`: the policy as a Ray Serve deployment.

Each replica loads the bundle (its own engines and page pool) and batches with Ray Serve's own
`@serve.batch` (max size `--max-batch`, wait `--batch-wait-ms`), running each batch through the
same `answer_batch` as the local server (page-pool bounded wait and refusal, per-request errors).
The websocket/HTTP front is the same server (serving.server) in the process that ran the command;
it hands each checked observation to the deployment's handle, and Ray spreads requests over the
replicas, on one machine or a cluster (`--address`; the bundle path must exist on every node).
Real-time chunking keys are refused here with one line (RAY_NO_RTC): serve without --ray for RTC.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ray import serve

from walkforge.errors import WalkforgeError
from walkforge.serving.batcher import Answer, answer_batch
from walkforge.serving.observations import load_obs_map
from walkforge.serving.server import Loaded

APP = "walkforge"
RAY_NO_RTC = "walkforge serve --ray does not serve real-time chunking yet; serve without --ray"


@serve.deployment
class PolicyReplica:
    """One replica: the bundle's policy and a Ray Serve batch queue in front of it."""

    def __init__(self, bundle: str, backend: str, threads: int | None, kv_pages: int | None,
                 max_batch: int, batch_wait_ms: float, pool_wait_ms: float,
                 digest: str | None = None) -> None:
        import walkforge

        self.policy = walkforge.load(bundle, backend=backend, digest=digest, threads=threads,
                                     kv_pages=kv_pages)
        self.pool_wait_s = pool_wait_ms / 1e3
        self.predict.set_max_batch_size(max_batch)
        self.predict.set_batch_wait_timeout_s(batch_wait_ms / 1e3)

    def describe(self) -> dict[str, Any]:
        from walkforge.serving.app import describe

        return describe(self.policy) | {"spec": self.policy.observation_spec()}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def predict(self, requests: list[tuple[dict, Any]]) -> list[Answer]:
        observations, noises = [r[0] for r in requests], [r[1] for r in requests]
        return await asyncio.to_thread(answer_batch, self.policy, observations, noises, self.pool_wait_s)

    async def __call__(self, request: tuple[dict, Any]) -> Answer:
        return await self.predict(request)


class RayExecutor:
    """The front's executor: each request goes to the deployment (any replica)."""

    def __init__(self, handle: Any, owns_ray: bool) -> None:
        self.handle, self.owns_ray = handle, owns_ray

    async def submit(self, observation: dict, noise: Any = None, rtc: Any = None) -> Answer:
        if rtc is not None:
            return Answer(error=RAY_NO_RTC)
        return await self.handle.remote((observation, noise))

    def close(self) -> None:
        import ray

        serve.delete(APP)
        if self.owns_ray:
            serve.shutdown()
            ray.shutdown()


def load_ray(bundle: Path, options: Any) -> Loaded:
    """Join (or start) Ray, deploy `options.replicas` replicas of the bundle's policy, and return
    the front's view of them."""
    import ray

    from walkforge.serving.app import metadata

    if not Path(bundle).is_dir():
        raise WalkforgeError(f"bundle not found: {bundle}")
    if options.replicas < 1:
        raise WalkforgeError(f"--replicas must be ≥ 1, got {options.replicas}")
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address=options.address, include_dashboard=False)
    serve.start(proxy_location="Disabled")
    deployment = PolicyReplica.options(num_replicas=options.replicas,
                                       ray_actor_options={"num_cpus": options.threads or 1})
    app = deployment.bind(str(Path(bundle).resolve()), options.backend, options.threads, options.kv_pages,
                          options.max_batch, options.batch_wait_ms, options.pool_wait_ms, options.digest)
    handle = serve.run(app, name=APP, route_prefix=None)
    info = handle.describe.remote().result()
    spec = info["spec"]
    obs_map = load_obs_map(options.obs_map, spec)
    return Loaded(RayExecutor(handle, owns_ray), spec,
                  metadata(info, spec, options, obs_map), obs_map, RAY_NO_RTC)
