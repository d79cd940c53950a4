"""Write a safetensors file one tensor at a time.

`safetensors.torch.save_file` takes the whole state dict and serialises it in memory (a second
copy of every byte); a full-size pi0 is 14 GB in fp32, so the compile writes its weights file
with `write_safetensors` instead: the header is computed from the names, dtypes and shapes
alone (a meta-device state dict is enough), then each tensor is produced, written and dropped
in turn. The result is an ordinary safetensors file (8-byte little-endian header length, JSON
header padded with spaces to 8 bytes, tensors back to back in header order).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from walkforge.errors import WalkforgeError
from walkforge.recipes.weights import fingerprint_update

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
HEADER_ALIGN = 8  # safetensors pads its JSON header so the data starts 8-byte aligned


def header(specs: Mapping[str, torch.Tensor]) -> bytes:
    """The length-prefixed, padded safetensors header of `specs` (name → tensor, meta is fine),
    tensors laid out in sorted name order."""
    entries, offset = {}, 0
    for name in sorted(specs):
        t = specs[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise WalkforgeError(f"weight '{name}': dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, specs: Mapping[str, torch.Tensor],
                      tensor_of: Callable[[str], torch.Tensor]) -> str:
    """Write `tensor_of(name)` for every name of `specs` (sorted) into safetensors `path`; each
    must have its spec's dtype and shape. Returns the weights' fingerprint (recipes.weights
    `fingerprint` of the same state dict), computed on the way."""
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        fh.write(header(specs))
        for name in sorted(specs):
            t = tensor_of(name)
            want = specs[name]
            if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                raise WalkforgeError(f"weight '{name}' is {t.dtype} {list(t.shape)}, its header says "
                                     f"{want.dtype} {list(want.shape)}")
            data = t.detach().contiguous().cpu()
            fingerprint_update(digest, name, data)
            if data.numel():
                fh.write(data.reshape(-1).view(torch.uint8).numpy())
            del t, data
    return "sha256:" + digest.hexdigest()
