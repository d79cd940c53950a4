"""TensorRT registration of the walkforge plugins: `tensorrt.plugin` descriptors + AOT kernels.

For every walkforge op a bundle's walks use, `register_plugins` calls the op module's
`register_trt(record, ptx)`, which hands `register_aot_plugin` what is the op's own (its output
rule and int32 kernel arguments); this module registers `walkforge::<Op>` with
`tensorrt.plugin.register` (inputs and attributes from the op's ONNX schema, output shape/type)
and `aot_impl` (the bundle's ahead-of-time Triton kernel for this GPU: PTX, the record's grid
rule, int32 scalar arguments in signature order).
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
`from __future__ import annotations`: `tensorrt.plugin.register` reads the descriptor's type hints
(given here as real types through `__signature__`, so the op modules need not care).
"""

import hashlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from walkforge.artifacts.manifest import Manifest, as_manifest
from walkforge.errors import WalkforgeError
from walkforge.plugins.constants import DOMAIN, PLUGIN_NAMESPACE, POOL_OUT

log = logging.getLogger(__name__)

WARP_SIZE = 32
PARSER_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")
"""ONNX node attributes TensorRT's parser consumes itself; the plugin gets the op's other attributes."""
_REGISTERED: dict[str, str] = {}
"""Plugin id -> sha256 of the PTX registered in this process (registration is process-global)."""


# ---------------------------------------------------------------- pure helpers


def ops_used(bundle_root: Path | str, manifest: Manifest | Mapping[str, Any]) -> list[str]:
    """walkforge op names used by any walk of the bundle, sorted."""
    used = set()
    for walk in as_manifest(manifest).walks.values():
        model = onnx.load(str(Path(bundle_root) / walk.onnx), load_external_data=False)
        used |= {node.op_type for node in model.graph.node if node.domain == DOMAIN}
    return sorted(used)


def pool_dtype(manifest: Manifest | Mapping[str, Any]) -> str:
    """The bundle's KV pool dtype ("float32" or "float8_e4m3fn"), which picks the kernel variant."""
    return as_manifest(manifest).pool_dtype


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


def arity(module: ModuleType) -> tuple[int, int, int]:
    """(inputs, outputs, outputs aliased to an input) of an op's node, from its schema: the pool
    output POOL_OUT is written in place into the pool input."""
    schema = module.SCHEMA
    aliased = sum(p.name == POOL_OUT for p in schema.outputs)
    return len(schema.inputs), len(schema.outputs), aliased


# ---------------------------------------------------------------- registration


def register_plugins(bundle_root: Path | str, manifest: Manifest | Mapping[str, Any],
                     arch: str) -> dict[str, str]:
    """Register the AOT TensorRT plugin of every walkforge op the bundle uses, for `arch` ('sm_90').

    Each op gets the PTX that JITs on this device and driver (`arch.select_kernel`: TensorRT takes
    PTX only); an FP8-pool bundle on a GPU before sm_89 is refused in one line (`arch.check_fp8`).
    Call before parsing. Returns op -> "aot" or "onnx-function (<why>)" (TensorRT inlines the
    op's ONNX body when no plugin is registered). Raises WalkforgeError if this process already
    registered a different kernel under the same plugin id (registration cannot be undone).
    """
    from walkforge.plugins import _OP_MODULES, _ops
    from walkforge.plugins.aot import kernel_name
    from walkforge.plugins.arch import Target, check_fp8, driver_cuda_version, select_kernel

    manifest = as_manifest(manifest)
    cc, device, driver = Target.parse(arch).cc, "this GPU", driver_cuda_version()
    if pool_dtype(manifest) != "float32":
        check_fp8(cc, device)
    status = {}
    used = ops_used(bundle_root, manifest)
    ops = _ops() if set(used) & set(_OP_MODULES) else {}  # the op modules import torch and Triton
    for op in used:
        if op not in ops:
            status[op] = "onnx-function (no TensorRT plugin for this op)"
            continue
        try:
            kernel = kernel_name(ops[op].AOT.name, pool_dtype(manifest))
            record = select_kernel(manifest.kernels or [], kernel, cc, driver, device, ("ptx",)).record
            check_abi(record, *arity(ops[op]))
            ptx = read_ptx(bundle_root, record)
        except WalkforgeError as exc:
            log.warning("walkforge::%s runs as its ONNX function body under TensorRT: %s", op, exc)
            status[op] = f"onnx-function ({exc})"
            continue
        _register(ops[op], record, ptx)
        status[op] = "aot"
    return status


def _register(module: ModuleType, record: dict[str, Any], ptx: str) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{module.ONNX_NAME}"
    digest = hashlib.sha256(ptx.encode()).hexdigest()
    if plugin_id in _REGISTERED:
        if _REGISTERED[plugin_id] != digest:
            raise WalkforgeError(f"{plugin_id} is already registered with another kernel in this process; "
                                 "build each bundle in its own process")
        return
    module.register_trt(record, ptx)
    _REGISTERED[plugin_id] = digest
    log.info("registered %s (AOT %s for %s, PTX ISA %s)", plugin_id, record["function_name"],
             record["arch"], record.get("ptx_isa"))


Shapes = Mapping[str, Sequence[Any]]


def register_aot_plugin(module: ModuleType, record: Mapping[str, Any], ptx: str,
                        output: Callable[[Mapping[str, Any]], Any],
                        scalars: Callable[[Shapes, Mapping[str, Any]], Mapping[str, Any]]) -> None:
    """Register `walkforge::<op>` for an op module (its SCHEMA, ATTRIBUTES, ONNX_NAME) with TensorRT.

    `output(descs)`: the output TensorDesc from the input TensorDescs by name (e.g. `q.like()`,
    `pool.aliased()`); `scalars(shapes, attrs)`: the kernel's int32 arguments by name from the input
    shape expressions and the node's attributes. The grid is the record's rule, symbolically.
    """
    import tensorrt.plugin as trtp

    plugin_id = f"{PLUGIN_NAMESPACE}::{module.ONNX_NAME}"
    tensors = [p.name for p in module.SCHEMA.inputs]
    attrs = {name: kind for name, kind in module.ATTRIBUTES.items() if name not in PARSER_ATTRIBUTES}

    def descriptor(*args: Any, **kwargs: Any) -> Any:
        bound = descriptor.__signature__.bind(*args, **kwargs).arguments
        return output({name: bound[name] for name in tensors})

    def aot(*args: Any, **kwargs: Any) -> tuple:
        bound = aot.__signature__.bind(*args, **kwargs).arguments
        shapes = {name: bound[name].shape_expr for name in tensors}
        return aot_launch(record, ptx, shapes, scalars(shapes, {a: bound[a] for a in attrs}))

    hints = {**dict.fromkeys(tensors, trtp.TensorDesc), **attrs}
    descriptor.__signature__ = _signature([*tensors, *attrs], hints, trtp.TensorDesc)
    aot.__signature__ = _signature([*tensors, *attrs, "outputs", "tactic"], {}, inspect.Signature.empty)
    trtp.register(plugin_id)(descriptor)
    trtp.aot_impl(plugin_id)(aot)


def _signature(names: Sequence[str], annotations: Mapping[str, Any], returns: Any) -> inspect.Signature:
    kind, empty = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty
    params = [inspect.Parameter(name, kind, annotation=annotations.get(name, empty)) for name in names]
    return inspect.Signature(params, return_annotation=returns)


def aot_launch(record: Mapping[str, Any], ptx: str, shapes: Shapes, scalars: Mapping[str, Any]) -> tuple:
    """What an `aot_impl` returns: (kernel name, PTX, launch parameters, int32 scalar arguments in
    the record's signature order). Grid from the record's rule over TensorRT shape expressions."""
    import tensorrt.plugin as trtp

    from walkforge.plugins.aot import eval_grid

    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = eval_grid(record["grid"], shapes, record["constexprs"],
                                                            cdiv=trtp.cdiv)  # fmt: skip
    launch.block_x = block_threads(record)
    launch.shared_mem = record["shared_mem"]
    ints = [scalars[name] for name, kind in record["signature"].items() if kind == "i32"]
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(value) for value in ints])
    return record["function_name"].encode(), ptx.encode(), launch, extra
