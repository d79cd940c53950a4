"""TensorRT registration of the walkforge plugins: `tensorrt.plugin` descriptors + AOT kernels.

For every walkforge op a bundle's walks use, `register_plugins` registers
`walkforge::<Op>` with `tensorrt.plugin.register` (output shape/type) and `aot_impl` (the
bundle's ahead-of-time Triton kernel for this GPU: PTX, launch grid, int32 scalar arguments).
TensorRT's parser then maps each ONNX node (op_type = plugin name, `plugin_namespace`
"walkforge", `aot=1`) to the plugin, and the kernel is embedded in the engine: running the plan
needs no Python plugin code.

TensorRT launches an AOT kernel with its arguments in a fixed order: input pointers, the extra
int32 scalars, output pointers. A kernel record whose signature does not follow that order is
not registered (it would read the wrong buffers); TensorRT then inlines the op's ONNX function
body instead, and the returned status says why.

Kernel records are those of `plugins.aot.compile_kernels`, listed in the manifest under
"kernels"; the PTX is inline ("ptx") or in a bundle file ("ptx_file"). TensorRT's AOT path
takes PTX only (not cubin). This module imports TensorRT lazily and deliberately has no
`from __future__ import annotations`: `tensorrt.plugin.register` reads the descriptor's type hints.
"""

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from walkforge.errors import WalkforgeError
from walkforge.plugins.constants import DOMAIN, FP8_KERNEL_SUFFIX, PLUGIN_NAMESPACE

log = logging.getLogger(__name__)

WARP_SIZE = 32
KERNELS = {"PagedAttention": "paged_attention_kernel", "KVCacheWrite": "kv_cache_write_kernel"}
"""ONNX op -> Triton kernel (the `kernel` field of its AOT records)."""
ARITY = {"PagedAttention": (8, 1, ()), "KVCacheWrite": (6, 1, ("pool_out",))}
"""ONNX op -> (inputs, outputs, outputs aliased to an input) of its node (kv_scales included)."""
_REGISTERED: dict[str, str] = {}
"""Plugin id -> sha256 of the PTX registered in this process (registration is process-global)."""


# ---------------------------------------------------------------- pure helpers


def ops_used(bundle_root: Path | str, manifest: Mapping[str, Any]) -> list[str]:
    """walkforge op names used by any walk of the bundle, sorted."""
    used = set()
    for walk in manifest["walks"].values():
        model = onnx.load(str(Path(bundle_root) / walk["onnx"]), load_external_data=False)
        used |= {node.op_type for node in model.graph.node if node.domain == DOMAIN}
    return sorted(used)


def pool_dtype(manifest: Mapping[str, Any]) -> str:
    """The bundle's KV pool dtype ("float32" or "float8_e4m3fn"), which picks the kernel variant."""
    return (manifest.get("kv_cache") or {}).get("dtype", "float32")


def kernel_record(records: Sequence[Mapping[str, Any]], kernel: str, arch: str) -> dict[str, Any]:
    """The AOT record of `kernel` for `arch` ('sm_90'); WalkforgeError naming the archs there are."""
    for record in records:
        if record.get("kernel") == kernel and record.get("arch") == arch:
            return dict(record)
    archs = sorted({r.get("arch") for r in records if r.get("kernel") == kernel})
    have = ", ".join(archs) if archs else "none"
    raise WalkforgeError(f"bundle has no AOT kernel '{kernel}' for {arch} (has: {have})")


def check_abi(record: Mapping[str, Any], n_inputs: int, n_outputs: int, aliased: int = 0) -> None:
    """Check the kernel takes (input pointers, int32 scalars, output pointers), TensorRT's AOT order.

    Pointers of outputs aliased to an input may be left off the end (the kernel writes in place).
    """
    params = list(record["signature"].items())
    kinds = ["ptr" if t.startswith("*") else t for _, t in params]
    rest = kinds[n_inputs:]
    trailing = _trailing_pointers(rest)
    scalars = rest[:len(rest) - trailing]
    ok = (kinds[:n_inputs] == ["ptr"] * n_inputs and all(k == "i32" for k in scalars)
          and n_outputs - aliased <= trailing <= n_outputs)  # fmt: skip
    if not ok:
        got = ", ".join(f"{name}:{kind}" for name, kind in params)
        raise WalkforgeError(
            f"kernel '{record['kernel']}' ({record.get('arch')}) does not follow TensorRT's AOT calling "
            f"convention ({n_inputs} input pointers, int32 scalars, {n_outputs} output pointer(s)): "
            f"it takes ({got})"
        )


def _trailing_pointers(kinds: list[str]) -> int:
    count = 0
    for kind in reversed(kinds):
        if kind != "ptr":
            break
        count += 1
    return count


def read_ptx(bundle_root: Path | str, record: Mapping[str, Any]) -> str:
    if "ptx" in record:
        ptx = record["ptx"]
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    if "ptx_file" in record:
        return (Path(bundle_root) / record["ptx_file"]).read_text()
    raise WalkforgeError(f"AOT record of '{record.get('kernel')}' ({record.get('arch')}) has no PTX")


def block_threads(record: Mapping[str, Any]) -> int:
    return int(record["num_warps"]) * WARP_SIZE


# ---------------------------------------------------------------- registration


def register_plugins(bundle_root: Path | str, manifest: Mapping[str, Any], arch: str) -> dict[str, str]:
    """Register the AOT TensorRT plugin of every walkforge op the bundle uses, for `arch` ('sm_90').

    Call before parsing. Returns op -> "aot" or "onnx-function (<why>)" (TensorRT inlines the
    op's ONNX body when no plugin is registered). Raises WalkforgeError if this process already
    registered a different kernel under the same plugin id (registration cannot be undone).
    """
    status = {}
    for op in ops_used(bundle_root, manifest):
        if op not in KERNELS:
            status[op] = "onnx-function (no TensorRT plugin for this op)"
            continue
        try:
            kernel = KERNELS[op] + (FP8_KERNEL_SUFFIX if pool_dtype(manifest) != "float32" else "")
            record = kernel_record(manifest.get("kernels", []), kernel, arch)
            n_in, n_out, aliased = ARITY[op]
            check_abi(record, n_in, n_out, len(aliased))
            ptx = read_ptx(bundle_root, record)
        except WalkforgeError as exc:
            log.warning("walkforge::%s runs as its ONNX function body under TensorRT: %s", op, exc)
            status[op] = f"onnx-function ({exc})"
            continue
        _register(op, record, ptx)
        status[op] = "aot"
    return status


def _register(op: str, record: dict[str, Any], ptx: str) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{op}"
    digest = hashlib.sha256(ptx.encode()).hexdigest()
    if plugin_id in _REGISTERED:
        if _REGISTERED[plugin_id] != digest:
            raise WalkforgeError(f"{plugin_id} is already registered with another kernel in this process; "
                                 "build each bundle in its own process")
        return
    {"PagedAttention": _register_paged_attention, "KVCacheWrite": _register_kv_cache_write}[op](record, ptx)
    _REGISTERED[plugin_id] = digest
    log.info("registered %s (AOT %s for %s, PTX ISA %s)", plugin_id, record["function_name"],
             record["arch"], record.get("ptx_isa"))


def _register_paged_attention(record: dict[str, Any], ptx: str) -> None:
    """out [B, H, S, D] = PagedAttention(q, k, v, pool, block_table, prefix_lens, suffix_mask)."""
    import tensorrt.plugin as trtp

    consts = record["constexprs"]

    @trtp.register("walkforge::PagedAttention")
    def _descriptor(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, pool: trtp.TensorDesc,
                    block_table: trtp.TensorDesc, prefix_lens: trtp.TensorDesc,
                    suffix_mask: trtp.TensorDesc, kv_scales: trtp.TensorDesc, layer: int,
                    scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.aot_impl("walkforge::PagedAttention")
    def _aot(q, k, v, pool, block_table, prefix_lens, suffix_mask, kv_scales, layer, scale, outputs, tactic):
        if not math.isclose(scale, consts["SCALE"], rel_tol=1e-6):
            raise ValueError(f"node scale {scale} != kernel SCALE {consts['SCALE']} (recompile kernels)")
        batch, heads, seq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(seq, consts["BLOCK_M"])  # grid (cdiv(S, BLOCK_M), H, B)
        launch.grid_y = heads
        launch.grid_z = batch
        launch.block_x = block_threads(record)
        launch.shared_mem = record["shared_mem"]
        # seq_len, num_pages, max_pages, layer
        scalars = [seq, pool.shape_expr[2], block_table.shape_expr[1], layer]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])
        return record["function_name"].encode(), ptx.encode(), launch, extra


def _register_kv_cache_write(record: dict[str, Any], ptx: str) -> None:
    """pool' (aliased to pool: written in place) = KVCacheWrite(pool, k, v, block_table, positions,
    kv_scales)."""
    import tensorrt.plugin as trtp

    @trtp.register("walkforge::KVCacheWrite")
    def _descriptor(pool: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                    block_table: trtp.TensorDesc, positions: trtp.TensorDesc,
                    kv_scales: trtp.TensorDesc) -> trtp.TensorDesc:
        return pool.aliased()

    @trtp.aot_impl("walkforge::KVCacheWrite")
    def _aot(pool, k, v, block_table, positions, kv_scales, outputs, tactic):
        layers, batch, seq = k.shape_expr[0], k.shape_expr[1], k.shape_expr[3]  # k: [L, B, KVH, S, D]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = seq  # grid (S, B, 1)
        launch.grid_y = batch
        launch.block_x = block_threads(record)
        launch.shared_mem = record["shared_mem"]
        scalars = [layers, batch, seq, pool.shape_expr[2], block_table.shape_expr[1]]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])
        return record["function_name"].encode(), ptx.encode(), launch, extra
