"""walkforge: compile multimodal robot and generative models into engine bundles."""

from walkforge.errors import WalkforgeError

__version__ = "0.1.0"


def load(bundle, backend: str = "cpu"):
    """Load a bundle and return its recipe's front API (e.g. `VaeDecoder`, `Pi0Policy`)."""
    from walkforge.runtimes.front import load as _load

    return _load(bundle, backend=backend)


__all__ = ["WalkforgeError", "__version__", "load"]
