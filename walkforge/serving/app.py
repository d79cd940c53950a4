"""`walkforge serve`: load a bundle behind the policy server, locally or on Ray Serve."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError
from walkforge.serving import server
from walkforge.serving.batcher import MicroBatcher
from walkforge.serving.limits import MAX_FRAME_BYTES, MAX_IMAGE_SIDE, Limits
from walkforge.serving.observations import load_obs_map
from walkforge.serving.server import Loaded, ServerLimits, run_server

MB = 1 << 20


@dataclass(frozen=True)
class ServeOptions:
    """Everything `walkforge serve` takes besides the bundle (flags of the same names)."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "cpu"
    obs_map: Path | None = None
    max_batch: int = 8
    batch_wait_ms: float = 2.0
    max_queue: int = 64
    pool_wait_ms: float = 5000.0
    kv_pages: int | None = None
    threads: int | None = None
    ray: bool = False
    replicas: int = 1
    address: str | None = None
    digest: str | None = None
    max_frame_mb: float = MAX_FRAME_BYTES / MB
    max_inflight_mb: float = server.MAX_INFLIGHT / MB
    max_connections: int = server.MAX_CONNECTIONS
    max_image_side: int = MAX_IMAGE_SIDE
    decode_threads: int = server.DECODE_THREADS

    def limits(self) -> ServerLimits:
        """The server's bounds (serving.server, serving.limits) from these options."""
        if self.max_frame_mb <= 0 or self.max_inflight_mb <= 0:
            raise WalkforgeError(f"--max-frame-mb and --max-inflight-mb must be > 0, got "
                                 f"{self.max_frame_mb} and {self.max_inflight_mb}")
        frame = Limits(max_frame_bytes=int(self.max_frame_mb * MB), max_image_side=self.max_image_side)
        return ServerLimits(frame, int(self.max_inflight_mb * MB), self.max_connections, self.decode_threads)


def metadata(info: dict[str, Any], spec: dict[str, Any], options: ServeOptions,
             obs_map: dict[str, str]) -> dict:
    """What a client receives on connect (openpi sends its policy's metadata map the same way).
    `info`: the policy's recipe, variant and backend (`describe`)."""
    import walkforge

    return {"server": "walkforge", "walkforge_version": walkforge.__version__,
            "recipe": info["recipe"], "variant": info["variant"], "backend": info["backend"],
            "observation_spec": spec, "obs_map": obs_map,
            "action_dim": spec["action"]["dim"], "chunk_size": spec["chunk_size"],
            "max_batch": options.max_batch, "replicas": options.replicas if options.ray else 1}


def describe(policy: Any) -> dict[str, Any]:
    manifest = policy.bundle.typed
    return {"recipe": manifest.recipe, "variant": manifest.variant, "backend": policy.backend}


def load_local(bundle: Path, options: ServeOptions, policy: Any = None) -> Loaded:
    """The bundle's policy (or the one given) behind a micro-batcher over its page pool."""
    import walkforge

    if policy is None:
        policy = walkforge.load(bundle, backend=options.backend, digest=options.digest,
                                threads=options.threads, kv_pages=options.kv_pages)
    if not hasattr(policy, "predict_action_chunks"):
        raise WalkforgeError(f"walkforge serve takes a policy bundle (pi0, pi05); {bundle} is a "
                             f"{policy.bundle.recipe} bundle")
    spec = policy.observation_spec()
    obs_map = load_obs_map(options.obs_map, spec)
    batcher = MicroBatcher(policy, options.max_batch, options.batch_wait_ms, options.max_queue,
                           options.pool_wait_ms)
    from walkforge.runtimes.fronts.flow import NO_GUIDE

    refusal = None if getattr(policy, "has_guide", False) else NO_GUIDE
    return Loaded(batcher, spec, metadata(describe(policy), spec, options, obs_map), obs_map, refusal)


def announce(host: str, port: int) -> None:
    print(f"walkforge serve: listening on ws://{host}:{port} (health: http://{host}:{port}/healthz)",
          flush=True)


def serve_bundle(bundle: Path, options: ServeOptions) -> None:
    """Serve until SIGTERM/SIGINT (module doc of serving.server)."""
    limits = options.limits()  # bad bounds are refused before anything loads
    if options.ray:
        try:
            from walkforge.serving.ray_app import load_ray
        except ImportError as exc:
            raise WalkforgeError(f"--ray needs Ray Serve: pip install 'walkforge[ray]' ({exc})") from exc

        def load() -> Loaded:
            return load_ray(bundle, options)
    else:
        def load() -> Loaded:
            return load_local(bundle, options)

    asyncio.run(run_server(load, options.host, options.port, on_listen=announce,
                           on_ready=lambda _: print("walkforge serve: ready", file=sys.stdout, flush=True),
                           limits=limits))
