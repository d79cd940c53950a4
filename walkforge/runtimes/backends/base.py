"""`Backend`: what every backend package under `runtimes/backends/` provides at module level.

A backend is a module, not a class: its module-level names are the Protocol's members (a module
satisfies a Protocol, PEP 544), so `backends.get(name)` returns it typed as `Backend` and checks
it on import. A new backend is one package with these names plus one line in `backends.REGISTRY`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from walkforge.artifacts.bundle import Bundle
    from walkforge.artifacts.manifest import Manifest
    from walkforge.runtimes.backends import Options
    from walkforge.runtimes.engine import Engine
    from walkforge.runtimes.kv_pool import PoolSpec


@runtime_checkable
class Backend(Protocol):
    """One engine backend (`cpu`, `cuda`, `trt`, `torch`, ...), as the registry and the runner use it."""

    NAME: str
    """Its name in `backends.REGISTRY` and on the command line (`--backend NAME`)."""
    AUTO: bool
    """Whether `auto` may choose it (the torch references never are)."""

    def probe(self) -> str:
        """What this machine lacks to run it, in one line; "" when it can run. Builds nothing: no
        TensorRT object, no onnxruntime session, no CUDA initialisation on a CPU-only torch."""

    def has_target(self, manifest: Manifest) -> str:
        """What the bundle (its typed `manifest`) lacks for this backend, in one line; "" when it has it."""

    def load(self, bundle: Bundle, options: Options) -> dict[str, Engine]:
        """One engine per walk of `bundle`, by walk name, made as `options` say."""

    def allocate_pool(self, spec: PoolSpec) -> Any:
        """The zeroed KV page pool of shape `spec.shape`, where this backend's engines read it
        (a host numpy array, a torch tensor on the device, ...)."""


MEMBERS = ("NAME", "AUTO", "probe", "has_target", "load", "allocate_pool")
"""`Backend`'s members, to name the missing ones when a module is not a backend."""


def missing_members(module: object) -> list[str]:
    """The `Backend` members that `module` lacks."""
    return [member for member in MEMBERS if not hasattr(module, member)]
