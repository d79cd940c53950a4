"""walkforge: compile multimodal robot and generative models into engine bundles."""

from walkforge.errors import WalkforgeError

__version__ = "0.1.0"


def load(bundle, backend: str = "cpu", **options):
    """Load a bundle and return its recipe's front API (`VaeDecoder`, `Pi0Policy`).

    backend: "cpu" (onnxruntime engines) or "torch" (the recipe's reference modules).
    options: `threads`, `spinning`, and per-recipe ones such as pi0's `kv_pages`.
    """
    from walkforge.runtimes.front import load as _load

    return _load(bundle, backend=backend, **options)


__all__ = ["WalkforgeError", "__version__", "load"]
