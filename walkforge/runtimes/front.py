"""`walkforge.load(bundle)`: open a bundle and return its recipe's front API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError
from walkforge.runtimes.pi0 import Pi0Policy
from walkforge.runtimes.runner import Runner
from walkforge.runtimes.vae import VaeDecoder

FRONTS: dict[str, type[Runner]] = {"vae": VaeDecoder, "pi0": Pi0Policy}


def load(bundle: str | Path | Bundle, backend: str = "cpu", threads: int | None = None,
         spinning: bool = True, **options: Any) -> Runner:
    """Open `bundle` (hashes checked) and return its recipe's runner on `backend`.

    `options` go to the recipe's front (pi0: `kv_pages`, the KV page pool size).
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    cls = FRONTS.get(bundle.recipe)
    if cls is None:
        raise WalkforgeError(f"bundle recipe '{bundle.recipe}' has no runtime front in this walkforge")
    return cls(bundle, backend, threads, spinning, **options)
