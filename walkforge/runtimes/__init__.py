"""Runtimes: load a bundle and run its engines, chained, on a backend (docs/design.md, "Layers").

`load`, `walk_engine`, `to_numpy` and `ort_array` are also what the compiler is handed to run what it compiled
(check, calibration, accuracy gates): it never imports this package itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from walkforge.runtimes.values import ort_array, to_numpy

__all__ = ["load", "ort_array", "to_numpy", "walk_engine"]


def load(bundle: Any, backend: str = "cpu", threads: int | None = None, spinning: bool = True,
         digest: str | None = None, **options: Any) -> Any:
    """Open `bundle` (a path, hashes checked, or an open Bundle) and return its front on `backend`.

    `digest` pins the bundle: one whose manifest sha256 differs is refused, naming both digests.
    `options` go to the front (every front with a page pool: `kv_pages`, its size in pages).
    """
    from walkforge.artifacts.bundle import MANIFEST, Bundle, check_digest
    from walkforge.artifacts.schema import check_schema
    from walkforge.runtimes.chain import SCHEDULES
    from walkforge.runtimes.fronts import front_class

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle, digest=digest)
    check_digest(bundle, digest)
    check_schema(bundle.manifest, str(bundle.root / MANIFEST), schedules=SCHEDULES)
    return front_class(bundle.typed.front)(bundle, backend, threads, spinning, **options)


def walk_engine(name: str, path: Path, walk: dict[str, Any], spinning: bool = True) -> Any:
    """The cpu backend's engine for one walk's ONNX at `path` (`walk`: its manifest contract)."""
    from walkforge.runtimes.backends.cpu.engine import OrtEngine
    from walkforge.runtimes.engine import Contract

    return OrtEngine(name, Path(path), Contract.from_json(walk), spinning=spinning)
