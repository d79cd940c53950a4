"""What onnxruntime must be told to run walkforge's ONNX as written: one place for the compiler
(check, calibration) and the runtime's onnxruntime backends."""

from __future__ import annotations

from walkforge.graphs.fp8 import ORT_DISABLED_OPTIMIZERS


def session_options(threads: int | None = None, spinning: bool = True):
    """Options every walkforge session uses. `spinning=False` for in-process parity with torch
    (onnxruntime's spinning threads starve torch's, TOOLCHAIN.md)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # FP8 Q/DQ must not be fused into int8-only kernels on CPU (TOOLCHAIN.md).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


def session_kwargs(providers: list) -> dict:
    """InferenceSession keyword arguments besides the options: providers, FP8-unsafe rewrites off."""
    return {"providers": providers, "disabled_optimizers": list(ORT_DISABLED_OPTIMIZERS)}
