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

DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_110", "sm_120")
"""A100; RTX 30xx/A10; Jetson Orin; RTX 40xx/L4; H100/H200; B200; Jetson Thor; RTX 50xx. Each
costs the kernels stage seconds (docs/benchmarks.md). Triton 3.9's ptxas (13.4) also builds
sm_103 (B300) and sm_121 (DGX Spark) on request; sm_101 is gone from CUDA 13 (renamed sm_110).
Devices of another minor use the PTX of the newest arch below them where that PTX is not
arch-specific (plugins/arch.py)."""


RENAMED_ARCHS = {"sm_101": "sm_101 is Jetson Thor's pre-CUDA-13 name; CUDA 13's ptxas (Triton's for sm_90+) "
                           "only knows sm_110: use sm_110"}  # fmt: skip


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
        if arch.rstrip("af") in RENAMED_ARCHS:
            raise WalkforgeError(f"--gpu-archs: {RENAMED_ARCHS[arch.rstrip('af')]}")


def fp8_warning(archs: Sequence[str], kv_dtype: str, precision: str) -> str:
    """The build-time warning for FP8 on archs without it, or ''. A warning, not a refusal: the
    bundle is multi-arch (the default list includes sm_80/86/87) and its cpu target runs anywhere;
    the loader refuses those devices in one line (plugins/arch.check_fp8)."""
    from walkforge.plugins.arch import fp8_archs_without

    wanted = (("an FP8 KV pool", kv_dtype == "fp8"), ("FP8 GEMMs", precision == "fp8"))
    uses = [what for what, on in wanted if on]
    without = fp8_archs_without(archs)
    if not uses or not without:
        return ""
    return (f"{' and '.join(uses)} cannot run on {', '.join(without)} (FP8 needs sm_89+): those GPUs "
            "get no fp8 kernels and will refuse this bundle at load")


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
