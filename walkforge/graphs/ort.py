"""What onnxruntime must be told to run walkforge's ONNX as written: one place for the compiler
(check, calibration) and the runtime's onnxruntime backends."""

from __future__ import annotations

from walkforge.graphs.fp8 import ORT_DISABLED_OPTIMIZERS


def session_options(threads: int | None = None, spinning: bool = True, fuse_qdq: bool = False,
                    arena: bool = True):
    """Options every walkforge session uses. `spinning=False` for in-process parity with torch
    (onnxruntime's spinning threads starve torch's, TOOLCHAIN.md). `fuse_qdq` for int8 graphs:
    onnxruntime then fuses their Q/DQ into integer kernels; off, Q/DQ run as written (FP8).
    `arena=False` for walks whose shapes vary per call (`varying_shapes`): onnxruntime's CPU arena
    keeps the high-water mark of every shape it has seen, so a tiled VAE decode (tiles of four
    sizes) held 3.0 GiB at 1024² where one 512² decode holds 1.7; without it, 1.4 GiB."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # FP8 Q/DQ must not be fused into int8-only kernels on CPU (TOOLCHAIN.md); int8 Q/DQ must.
    opts.add_session_config_entry("session.disable_quant_qdq", "0" if fuse_qdq else "1")
    return opts


# Symbolic dims that size only the page pool and its tables, not the activations.
PAGING_DIMS = ("num_pages", "max_pages")


def varying_shapes(inputs) -> bool:
    """Whether a walk's activation sizes change from call to call beyond the batch: an input
    (graphs.walk.TensorSpec) has a symbolic dim other than batch and the paging dims (vae:
    height, width; pi0 with compacted prefixes: views, prompt length)."""
    return any(isinstance(d, str) and d not in ("batch", *PAGING_DIMS) for s in inputs for d in s.shape)


# Common-subexpression elimination merges the Q → DQ pairs the int8 pass gives each GEMM back into
# one shared pair, which onnxruntime then cannot fuse into any of them (measured: 18 of 36 small
# pi0 vision GEMMs fused with it, 36 of 36 without; 35 → 21 ms).
INT8_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)


def session_kwargs(providers: list, fuse_qdq: bool = False) -> dict:
    """InferenceSession keyword arguments besides the options: providers, FP8-unsafe rewrites off
    (and, for int8 graphs, the rewrite that would undo their per-GEMM Q/DQ), and no silent retry on
    another provider: onnxruntime would print an "EP Error" banner to stdout and fall back to CPU,
    where the caller asked for exactly these providers."""
    disabled = [*ORT_DISABLED_OPTIMIZERS, *(INT8_DISABLED_OPTIMIZERS if fuse_qdq else ())]
    return {"providers": providers, "disabled_optimizers": disabled, "enable_fallback": 0}
