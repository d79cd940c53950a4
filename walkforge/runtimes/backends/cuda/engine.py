"""One walk's ONNX on onnxruntime-gpu's CUDAExecutionProvider, every value on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from walkforge.errors import WalkforgeError
from walkforge.runtimes.backends.cpu.engine import OrtEngine
from walkforge.runtimes.engine import Contract
from walkforge.runtimes.values import ort_array

PROVIDERS = (("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider")
"""fp32 ONNX stays fp32 (no TF32 matmuls): the cuda target is compared with the fp32 reference."""


class OrtCudaEngine(OrtEngine):
    """One walk's ONNX on CUDAExecutionProvider; inputs not yet on the device are uploaded."""

    device = "cuda"

    def __init__(self, name: str, path: Path, contract: Contract) -> None:
        preload = getattr(ort, "preload_dlls", None)  # CUDA / cuDNN from the nvidia-* wheels
        if preload is not None:
            preload()
        super().__init__(name, path, contract, providers=PROVIDERS)
        providers = self.session.get_providers()
        if providers[0] != "CUDAExecutionProvider":  # onnxruntime-gpu falls back silently
            raise WalkforgeError(f"walk '{name}': onnxruntime did not start CUDAExecutionProvider (session "
                                 f"has {', '.join(providers)}); are CUDA 13 and cuDNN 9 installed?")

    def bind_input(self, name: str, value: Any) -> Any:
        if isinstance(value, ort.OrtValue) and value.device_name().lower() == "cuda":
            return value
        return ort.OrtValue.ortvalue_from_numpy(ort_array(value), "cuda", 0)


