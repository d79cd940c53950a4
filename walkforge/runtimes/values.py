"""Values between engines: the one dtype table and the conversions every backend uses.

A value is a numpy array, an onnxruntime OrtValue (host or device) or a torch tensor (CPU or
CUDA). TensorSpec dtype names (graphs.walk.DTYPES) map to numpy through `graphs.walk.numpy_dtype`
and to torch through `torch_dtype`. float8_e4m3fn (an fp8 page pool) is one byte per element
everywhere; onnxruntime sees it as its uint8 bytes (its Gather/ScatterND take no float8), so
`ort_array` views it as uint8 and `to_numpy` of such an OrtValue returns those bytes.
torch is imported only by the functions that need it: the cpu runtime runs without torch.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from walkforge.errors import WalkforgeError

TORCH_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32",
                "bool": "bool", "float8_e4m3fn": "float8_e4m3fn"}  # fmt: skip
"""TensorSpec dtype name -> torch dtype attribute name (every name in graphs.walk.DTYPES)."""


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def is_ortvalue(value: Any) -> bool:
    return type(value).__name__ == "OrtValue"


def shape_of(value: Any) -> tuple[int, ...]:
    """Shape of a numpy array, torch tensor or OrtValue (whose `shape` is a method)."""
    shape = value.shape() if callable(getattr(value, "shape", None)) else value.shape
    return tuple(int(d) for d in shape)


def batch_size(value: Any) -> int:
    return shape_of(value)[0]


def to_numpy(value: Any) -> np.ndarray:
    """A host numpy array of `value`; a torch float8 tensor becomes ml_dtypes.float8_e4m3fn."""
    if is_ortvalue(value):
        return value.numpy()
    if is_torch(value):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.float8_e4m3fn:
            return tensor.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        return tensor.numpy()
    return np.asarray(value)


def ort_array(value: Any) -> np.ndarray:
    """Contiguous host array for onnxruntime; a float8_e4m3fn array as its uint8 bytes (no copy)."""
    array = np.ascontiguousarray(to_numpy(value))
    return array.view(np.uint8) if array.dtype == ml_dtypes.float8_e4m3fn else array


def to_torch(value: Any, dtype: str, device: str = "cpu", name: str = "") -> Any:
    """`value` as a contiguous torch tensor of TensorSpec dtype `dtype` on `device`; a tensor
    already there passes uncopied. A dtype other than `dtype` is a WalkforgeError naming `name`."""
    import torch

    if is_torch(value):
        tensor = value
    else:
        array = np.ascontiguousarray(to_numpy(value))
        if array.dtype == ml_dtypes.float8_e4m3fn or (dtype == "float8_e4m3fn" and array.dtype == np.uint8):
            tensor = torch.from_numpy(array.view(np.uint8)).view(torch.float8_e4m3fn)
        else:
            tensor = torch.from_numpy(array)
    if tensor.dtype != torch_dtype(dtype):
        raise WalkforgeError(f"{name or 'value'}: expected {dtype}, got {tensor.dtype}")
    return tensor.to(device, non_blocking=True).contiguous()
