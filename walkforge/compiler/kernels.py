"""AOT kernels: compile the plugin Triton kernels a bundle's walks use, per GPU architecture.

Runs on a machine without a GPU. Each (kernel, arch) lands as `kernels/<kernel>-<arch>.cubin`
and `.ptx` in the bundle; the manifest's "kernels" list records the Triton version, PTX ISA,
sha256, signature, constexprs and launch facts (grid rule, warps, shared memory) a launcher
(TensorRT's AOT plugin, the CUDA driver) needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError

DEFAULT_ARCHS = ("sm_80", "sm_89", "sm_90")


def plugin_ops(walks: Mapping[str, Any]) -> set[str]:
    """walkforge ops used by any walk (from the manifest's op counts)."""
    return {op.split("::", 1)[1] for w in walks.values() for op in w["ops"] if op.startswith("walkforge::")}


def check_archs(archs: Sequence[str]) -> None:
    """A one-line WalkforgeError naming the first entry of `archs` that is not like 'sm_90'."""
    if not archs:
        return
    from walkforge.plugins.aot import parse_arch

    for arch in archs:
        try:
            parse_arch(arch)
        except ValueError:
            raise WalkforgeError(f"--gpu-archs: '{arch}' is not an architecture like sm_90") from None


def build_kernels(root: Path, archs: Sequence[str], shapes: Mapping[str, int]) -> list[dict[str, Any]]:
    """Compile every plugin kernel for `archs`, specialised to `shapes` (num_heads, kv_heads,
    head_dim, page_size, optionally pool_dtype: fp8-pool kernels are named `<kernel>_fp8` and built
    for sm_89+ only); write cubin/PTX under `root/kernels/`; return manifest records."""
    from walkforge.plugins.aot import compile_kernels

    check_archs(archs)
    try:
        records = compile_kernels(archs, **shapes)
    except RuntimeError as exc:
        raise WalkforgeError(str(exc).splitlines()[0]) from None
    (root / "kernels").mkdir(exist_ok=True)
    return [_store(root, record) for record in records]


def _store(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    stem = f"kernels/{record['kernel']}-{record['arch']}"
    (root / f"{stem}.cubin").write_bytes(record["cubin"])
    (root / f"{stem}.ptx").write_text(record["ptx"])
    entry = {k: v for k, v in record.items() if k not in ("cubin", "ptx")}
    entry |= {"cubin_file": f"{stem}.cubin", "ptx_file": f"{stem}.ptx",
              "ptx_sha256": hashlib.sha256(record["ptx"].encode()).hexdigest()}
    return entry
