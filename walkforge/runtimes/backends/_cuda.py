"""What the CUDA backends ask of the machine, without initialising CUDA where it cannot exist."""

from __future__ import annotations

import importlib.util


def cuda_device() -> str:
    """"" where torch sees a CUDA device; else what is missing. A CPU-only torch build is
    recognised from `torch.version.cuda` without touching CUDA."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return ""


def onnxruntime_cuda() -> str:
    """"" where onnxruntime offers CUDAExecutionProvider; else what it offers."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime-gpu (no onnxruntime is installed): pip install 'walkforge[cuda]'"
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return ""
    return (f"onnxruntime-gpu with CUDAExecutionProvider; this onnxruntime {ort.__version__} "
            f"has {', '.join(providers)} only")
