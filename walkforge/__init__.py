"""walkforge: compile multimodal robot and generative models into engine bundles.

    walkforge.compile_bundle(walkforge.CompileRequest("pi0", "build/pi0-tiny"))  # needs [compile]
    policy = walkforge.load("build/pi0-tiny")                                     # runtime only
"""

from typing import Any

from walkforge.errors import WalkforgeError

__version__ = "0.5.0"


def load(bundle, backend: str = "cpu", digest: str | None = None, **options):
    """Load a bundle and return its recipe's front API (`VaeDecoder`, `Pi0Policy`).

    backend: "cpu" (onnxruntime engines), "torch" (the recipe's reference modules), a GPU backend
    ("torch-cuda", "cuda", "trt") or "auto". digest: the bundle's pinned digest (`walkforge
    inspect` prints it); a bundle with another is refused. options: `threads`, `spinning`,
    `prepack` (cpu: False maps the weights instead of prepacking a private copy per session —
    less memory, slower runs) and `kv_pages` for bundles with a KV page pool.
    """
    from walkforge.runtimes import load as _load

    return _load(bundle, backend=backend, digest=digest, **options)


def compile_bundle(request: Any, progress: Any = None) -> dict:
    """Compile a `CompileRequest` into a bundle; return its manifest. The staged engines (check,
    calibration, accuracy gates) run on this walkforge's runtime."""
    from walkforge import runtimes
    from walkforge.compiler.pipeline import compile_bundle as _compile

    return _compile(request, progress, runtime=runtimes)


def __getattr__(name: str) -> Any:
    if name == "CompileRequest":  # imported lazily: `import walkforge` stays light for the runtime
        from walkforge.compiler.request import CompileRequest

        return CompileRequest
    raise AttributeError(f"module 'walkforge' has no attribute {name!r}")


__all__ = ["CompileRequest", "WalkforgeError", "__version__", "compile_bundle", "load"]
