"""Runtimes: load a bundle and run its engines, chained, on a backend (DESIGN.md, "runtimes/").

`load`, `walk_engine`, `to_numpy` and `ort_array` are also what the compiler is handed to run what it compiled
(check, calibration, accuracy gates): it never imports this package itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from walkforge.runtimes.values import ort_array, to_numpy

__all__ = ["load", "ort_array", "to_numpy", "walk_engine"]


def load(bundle: Any, backend: str = "cpu", threads: int | None = None, spinning: bool = True,
         **options: Any) -> Any:
    """Open `bundle` (a path, hashes checked, or an open Bundle) and return its front on `backend`.

    `options` go to the front (every front with a page pool: `kv_pages`, its size in pages).
    """
    from walkforge.artifacts.bundle import Bundle
    from walkforge.runtimes.fronts import front_class

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    return front_class(bundle.manifest)(bundle, backend, threads, spinning, **options)


def walk_engine(name: str, path: Path, walk: dict[str, Any], spinning: bool = True) -> Any:
    """The cpu backend's engine for one walk's ONNX at `path` (`walk`: its manifest contract)."""
    from walkforge.runtimes.backends.cpu.engine import OrtEngine
    from walkforge.runtimes.engine import Contract

    return OrtEngine(name, Path(path), Contract.from_json(walk), spinning=spinning)
