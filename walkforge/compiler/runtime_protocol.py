"""`Runtime`, the Protocol of what the compiler needs of a runtime to run what it compiled: the
check, calibration and the accuracy gates run the staged bundle's cpu engines. The compiler is
handed one (`walkforge.runtimes` is one: `walkforge.compile_bundle` passes it) and never imports
the runtime itself (docs/design.md, "Layer rules": recipe → compiler → artifacts → runtimes).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runtime(Protocol):
    """What `compile_bundle` is handed as `runtime`; the `walkforge.runtimes` module satisfies it."""

    def load(self, bundle: Any, backend: str = "cpu", threads: int | None = None, spinning: bool = True,
             **options: Any) -> Any:
        """The bundle's front on `backend` (with `.run(feeds)`, `.engines`, `.chain.observer`)."""

    def walk_engine(self, name: str, path: Path, walk: dict[str, Any], spinning: bool = True) -> Any:
        """A cpu engine for one walk's ONNX (`.run(env) -> outputs by name`)."""

    def to_numpy(self, value: Any) -> np.ndarray:
        """A host numpy array of an engine value."""

    def ort_array(self, value: Any) -> np.ndarray:
        """A host array as onnxruntime takes it (an fp8 pool as its uint8 bytes)."""


def host_copy(runtime: Runtime, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Host copies of engine values by name, as onnxruntime sessions take them (an observer's
    view of a call's inputs, fed to calibration sessions)."""
    return {k: runtime.ort_array(v).copy() for k, v in values.items()}
