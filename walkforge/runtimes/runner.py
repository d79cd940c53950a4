"""The runner every recipe front builds on.

A runner takes an opened bundle, makes one engine per walk on the chosen backend and chains
them with the bundle's plan; where a walk writes a page pool, the chain owns its paging and the
backend decides where the pool lives. Inputs from the caller are checked against the walk
contracts before any engine runs, so bad input is a one-line WalkforgeError.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import TensorSpec
from walkforge.runtimes import backends
from walkforge.runtimes.chain import Chain, Paging, pool_writer
from walkforge.runtimes.values import to_numpy

log = logging.getLogger(__name__)


class Runner:
    """Engines of one bundle on one backend, chained by the bundle's plan.

    `kv_pages` sizes the page pool of a bundle that has one (default: room for
    DEFAULT_POOL_REQUESTS full-length requests).
    """

    def __init__(self, bundle: Bundle, backend: str = "cpu", threads: int | None = None,
                 spinning: bool = True, kv_pages: int | None = None, prepack: bool = True) -> None:
        self.bundle, self.manifest = bundle, bundle.manifest  # manifest: JSON; bundle.typed: its types
        typed = bundle.typed
        #: the concrete backend (what `auto` picked) and why it was chosen
        self.backend, self.backend_reason = backends.resolve(backend, bundle.typed)
        log.info("backend %s: %s", self.backend, self.backend_reason)
        impl = backends.get(self.backend)
        self.engines = impl.load(bundle, backends.Options(threads, spinning, prepack=prepack))
        paging = None
        if pool_writer(typed) is not None:
            paging = Paging(typed, self.engines, impl.allocate_pool, kv_pages)
        elif kv_pages is not None:
            raise WalkforgeError(f"kv_pages: this {bundle.recipe} bundle has no KV page pool")
        # after each run, before its answer is handed out: a bundle file changed since the load
        # (an engine may map its file) is refused (Bundle.check_unchanged)
        self.chain = Chain(self.engines, typed.plan, paging, after=bundle.check_unchanged)

    @property
    def paging(self) -> Paging | None:
        return self.chain.paging

    def specs(self, walk: str) -> list[TensorSpec]:
        return [TensorSpec.from_json(s) for s in self.bundle.walk(walk)["inputs"]]

    def spec(self, walk: str, name: str) -> TensorSpec:
        return next(s for s in self.specs(walk) if s.name == name)

    def check_inputs(self, specs: list[TensorSpec], feeds: Mapping[str, Any]) -> None:
        dims: dict[str, int] = {}
        for spec in specs:
            if spec.name not in feeds:
                raise WalkforgeError(f"missing input '{spec.name}' {spec.describe_shape()} {spec.dtype}")
            spec.check(feeds[spec.name], dims)

    def run_walk(self, walk: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one walk's engine on `feeds` (names as `walkforge inspect` shows)."""
        if walk not in self.engines:
            raise WalkforgeError(f"bundle has no walk '{walk}'; walks: {', '.join(self.engines)}")
        self.check_inputs(self.specs(walk), feeds)
        outputs = {k: to_numpy(v) for k, v in self.engines[walk].run(dict(feeds)).items()}
        self.bundle.check_unchanged()
        return outputs

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError
