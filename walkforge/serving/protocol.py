"""openpi's wire format: msgpack with numpy arrays as tagged maps ("msgpack-numpy").

An array travels as the map {b"__ndarray__": True, b"data": raw C-order bytes, b"dtype":
dtype.str (e.g. "<f4"), b"shape": [dims]} and a numpy scalar as {b"__npgeneric__": True,
b"data": its Python value, b"dtype": dtype.str}; the tag keys are msgpack *bin* (bytes), every
other string is msgpack *str*. Written from the format openpi-client 0.1.2 speaks
(`openpi_client.msgpack_numpy`), so frames are byte-for-byte those of its `Packer` and either
side decodes the other's. Nothing is unpickled: object, void and complex dtypes are refused
both ways.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from walkforge.errors import WalkforgeError

ARRAY, SCALAR = b"__ndarray__", b"__npgeneric__"
REFUSED_KINDS = {"O": "object", "V": "void", "c": "complex"}
MAX_NDIM = 32  # numpy allows 64; no observation value has more than 5


def _encode(obj: Any) -> Any:
    """msgpack `default`: numpy arrays and scalars as openpi's tagged maps."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in REFUSED_KINDS:
        raise WalkforgeError(f"cannot send a {REFUSED_KINDS[obj.dtype.kind]} numpy value ({obj.dtype})")
    if isinstance(obj, np.ndarray):
        return {ARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {SCALAR: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _dtype(tag: Any) -> np.dtype:
    if not isinstance(tag, str):
        raise WalkforgeError(f"array dtype must be a string such as '<f4', got {type(tag).__name__}")
    try:
        dtype = np.dtype(tag)
    except TypeError as exc:
        raise WalkforgeError(f"unknown array dtype '{tag[:40]}'") from exc
    if dtype.kind in REFUSED_KINDS:
        raise WalkforgeError(f"{REFUSED_KINDS[dtype.kind]} arrays ('{tag[:40]}') are refused")
    return dtype


def _array(obj: dict) -> np.ndarray:
    data, shape, dtype = obj.get(b"data"), obj.get(b"shape"), _dtype(obj.get(b"dtype"))
    if not isinstance(data, bytes):
        raise WalkforgeError("array data must be msgpack bin bytes")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WalkforgeError(f"array shape must be a list of non-negative ints, got {str(shape)[:60]}")
    if len(shape) > MAX_NDIM:
        raise WalkforgeError(f"array of {len(shape)} dims; at most {MAX_NDIM}")
    need = math.prod(shape) * dtype.itemsize  # Python ints: numpy's product would wrap around
    if need != len(data):
        raise WalkforgeError(f"array of shape {list(shape)} {dtype} needs {need} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decode(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's tagged maps back to numpy values."""
    if ARRAY in obj:
        return _array(obj)
    if SCALAR in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def packer() -> msgpack.Packer:
    """A reusable packer (what one connection keeps, as openpi's server does)."""
    return msgpack.Packer(default=_encode)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes, **bounds: int) -> Any:
    """Decode one frame; anything that is not well-formed msgpack-numpy is a WalkforgeError.
    `bounds`: msgpack's `max_str_len`, `max_array_len`, … (limits.decode_frame passes them)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, **bounds)
    except WalkforgeError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise WalkforgeError(f"not a msgpack-numpy message: {type(exc).__name__}: {str(exc)[:120]}") from exc
