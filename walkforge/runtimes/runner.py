"""The runner every recipe front builds on.

A runner opens the bundle (hashes checked), makes one engine per walk for the chosen backend
and chains them with the bundle's plan. Inputs from the caller are checked against the walk
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
from walkforge.runtimes.backends import GPU_BACKENDS, gpu_engines, resolve_backend
from walkforge.runtimes.chain import Chain
from walkforge.runtimes.onnxruntime import OrtEngine, to_numpy

log = logging.getLogger(__name__)
BACKENDS = ("cpu", "torch", *GPU_BACKENDS, "auto")


def make_engines(bundle: Bundle, backend: str, threads: int | None = None,
                 spinning: bool = True) -> dict[str, Any]:
    """One engine per walk of `bundle` on a concrete `backend` (Runner resolves `auto`)."""
    if backend == "cpu":
        target = bundle.manifest["targets"].get("cpu")
        if target is None:
            raise WalkforgeError("bundle has no 'cpu' target")
        return {name: OrtEngine(name, bundle.path(rel), bundle.walk(name), threads, spinning)
                for name, rel in target["walks"].items()}
    if backend == "torch":
        import torch

        from walkforge.runtimes.torch_backend import torch_engines

        if threads:
            torch.set_num_threads(threads)
        return torch_engines(bundle)
    if backend in GPU_BACKENDS:
        resolve_backend(backend)  # one-line WalkforgeError naming what this machine lacks
        return gpu_engines(bundle, backend)
    raise WalkforgeError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")


class Runner:
    """Engines of one bundle on one backend, chained by the bundle's plan."""

    def __init__(self, bundle: Bundle, backend: str = "cpu", threads: int | None = None,
                 spinning: bool = True) -> None:
        self.bundle = bundle
        if backend not in BACKENDS:
            raise WalkforgeError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        #: the concrete backend (what `auto` picked) and why it was chosen
        self.backend, self.backend_reason = resolve_backend(backend, bundle.manifest)
        log.info("backend %s: %s", self.backend, self.backend_reason)
        self.manifest = bundle.manifest
        self.engines = make_engines(bundle, self.backend, threads, spinning)
        self.chain = Chain(self.engines, self.manifest["plan"])

    def specs(self, walk: str) -> list[TensorSpec]:
        return [TensorSpec.from_json(s) for s in self.bundle.walk(walk)["inputs"]]

    def check_inputs(self, specs: list[TensorSpec], feeds: Mapping[str, Any]) -> None:
        dims: dict[str, int] = {}
        for spec in specs:
            if spec.name not in feeds:
                raise WalkforgeError(f"missing input '{spec.name}' {spec.describe_shape()} {spec.dtype}")
            spec.check(feeds[spec.name], dims)

    def run_walk(self, walk: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one walk's engine on `feeds` (names as `walkforge inspect` shows)."""
        self.check_inputs(self.specs(walk), feeds)
        outputs = self.engines[walk].run(dict(feeds))
        return {k: to_numpy_any(v) for k, v in outputs.items()}

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError


def to_numpy_any(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return to_numpy(value)
