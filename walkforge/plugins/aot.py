"""Ahead-of-time compilation of the plugin Triton kernels to cubin + PTX, no GPU needed.

Each record holds what a bundle needs to launch the kernel later (docs/design.md, "Custom ops"):
the binary, its PTX and PTX ISA (a driver older than the PTX ISA rejects it), the argument
signature, the constexprs it was specialised for, launch width, shared memory and the grid rule.
What is an op's own (its kernel, signature, constexprs, grid rule) is that op module's `AOT`;
this module holds the machinery: compiling, grid rules (`eval_grid`, also used by the Triton
launchers and the TensorRT plugins) and launching a record through the CUDA driver (`launch_aot`,
for the GPU tests; needs cupy).
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from walkforge.plugins.arch import min_driver
from walkforge.plugins.constants import FP8_KERNEL_SUFFIX, PAGE_SIZE

logger = logging.getLogger(__name__)

WARP_SIZE = 32
FP_FUSION = True
"""Let ptxas fuse multiply-adds (Triton 3.9 default, set explicitly; Triton 3.10 flips the default)."""

POOL_POINTERS = {"float32": "*fp32", "float8_e4m3fn": "*fp8e4nv"}
"""Triton pointer type of the page pool by its dtype (the kernels specialise on it)."""
FP8_MIN_ARCH = 89
"""Triton has float8e4nv (E4M3) on sm_89 and later only; fp8-pool kernels are not built for older archs
(TensorRT then runs the ops' ONNX bodies there)."""
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DEFAULT_SHARED_LIMIT = 48 * 1024
"""Dynamic shared memory a CUDA function may use without opting in."""


@dataclass(frozen=True)
class KernelDims:
    """The model dimensions a plugin kernel is specialised for (its constexprs come from these)."""

    num_heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    scale: float


@dataclass(frozen=True)
class AotKernel:
    """What AOT compilation needs of one op's Triton kernel; each op module declares one as `AOT`.

    `signature`: runtime parameters in TensorRT's AOT order (input pointers, int32 scalars, output
    pointers), the pool pointer typed for a float32 pool (`POOL_POINTERS` retypes it);
    `constexprs(dims)`: the kernel's constexprs; `grid`: the launch grid rule (see `eval_grid`).
    """

    fn: Any
    signature: Mapping[str, str]
    constexprs: Callable[[KernelDims], dict]
    grid: str

    @property
    def name(self) -> str:
        return self.fn.__name__


# ---------------------------------------------------------------- grid rules


_GRID_BINDING = re.compile(r"^\s*(\w+)\s*=\s*(\w+)\.shape\[(-?\d+)\]\s*$")
_GRID_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b,
}  # fmt: skip


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def eval_grid(rule: str, shapes: Mapping[str, Sequence[Any]], constexprs: Mapping[str, Any],
              cdiv: Callable[[Any, Any], Any] = _ceil_div) -> tuple[Any, Any, Any]:
    """Evaluate a kernel's grid rule, e.g. "(cdiv(S, BLOCK_M), H, B): S = q.shape[2], ...", with
    tensor shapes by name and the kernel's constexprs. Returns a 3-D grid.

    Shapes may be symbolic (TensorRT's shape expressions) when `cdiv` is their ceiling division."""
    head, _, bindings = rule.partition(":")
    names: dict[str, Any] = {k: v for k, v in constexprs.items() if isinstance(v, int)}
    for binding in filter(str.strip, bindings.split(",")):
        match = _GRID_BINDING.match(binding)
        if match is None:
            raise ValueError(f"grid rule binding {binding.strip()!r} is not 'NAME = tensor.shape[i]'")
        name, tensor, axis = match.groups()
        names[name] = shapes[tensor][int(axis)]
    node = ast.parse(head.strip(), mode="eval").body
    dims = [_eval_dim(n, names, cdiv) for n in (node.elts if isinstance(node, ast.Tuple) else [node])]
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"grid rule {rule!r} has {len(dims)} dims")
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def _eval_dim(node: ast.AST, names: Mapping[str, Any], cdiv: Callable[[Any, Any], Any] = _ceil_div) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _GRID_OPS:
        return _GRID_OPS[type(node.op)](_eval_dim(node.left, names, cdiv), _eval_dim(node.right, names, cdiv))
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cdiv" and len(node.args) == 2:
        return cdiv(*(_eval_dim(arg, names, cdiv) for arg in node.args))
    raise ValueError(f"unsupported grid expression {ast.unparse(node)!r}")


# ---------------------------------------------------------------- records


def kernel_name(fn_name: str, pool_dtype: str = "float32") -> str:
    """Record name of a kernel for a pool dtype: 'paged_attention_kernel_fp8' for an fp8 pool."""
    return fn_name + (FP8_KERNEL_SUFFIX if pool_dtype != "float32" else "")


def parse_arch(arch: str) -> int:
    """'sm_90' -> 90."""
    match = re.fullmatch(r"sm_(\d+)[af]?", arch)
    if match is None:
        raise ValueError(f"bad CUDA arch {arch!r}; expected e.g. 'sm_90'")
    return int(match.group(1))


def ptx_isa(ptx: str) -> str:
    """The `.version` directive of a PTX text, e.g. '8.7'."""
    match = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    if match is None:
        raise ValueError("PTX has no .version directive")
    return match.group(1)


def ptx_target(ptx: str) -> str:
    """The `.target` directive of a PTX text, e.g. 'sm_90a' (Triton compiles sm_90+ arch-specific)."""
    match = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if match is None:
        raise ValueError("PTX has no .target directive")
    return match.group(1)


def ptx_param_count(ptx: str, name: str) -> int:
    """Number of parameters of the `.entry name(...)` in a PTX text."""
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.DOTALL)
    if match is None:
        raise ValueError(f"PTX has no entry {name!r}")
    return match.group(1).count(".param")


def _launch_facts(kernel, signature: dict) -> dict:
    """What a launcher must know beyond the signature.

    Triton appends hidden pointer parameters (global scratch, profile scratch) after the
    signature's arguments; pass null for them when their sizes are 0. Shared memory above 48 KiB
    needs the dynamic shared memory opt-in on the function before launch.
    """
    md = kernel.metadata
    return {
        "num_warps": md.num_warps,
        "block_dim": md.num_warps * WARP_SIZE,
        "shared_mem": md.shared,
        "hidden_params": ptx_param_count(kernel.asm["ptx"], md.name) - len(signature),
        "global_scratch_size": md.global_scratch_size,
        "profile_scratch_size": md.profile_scratch_size,
    }


def op_kernels() -> dict[str, AotKernel]:
    """ONNX op name -> its kernel's `AotKernel` (the `AOT` of every op module)."""
    from walkforge.plugins import _ops

    return {name: module.AOT for name, module in _ops().items()}


def _kernels(dims: KernelDims, pool_dtype: str = "float32") -> list[tuple]:
    """(jit function, runtime signature, constexprs, grid rule) of every plugin kernel."""
    if pool_dtype not in POOL_POINTERS:
        raise ValueError(f"no kernels for a {pool_dtype!r} pool; pools are {sorted(POOL_POINTERS)}")
    pool = {"pool_ptr": POOL_POINTERS[pool_dtype]}
    return [(k.fn, dict(k.signature) | pool, k.constexprs(dims), k.grid) for k in op_kernels().values()]


def compile_kernel(fn, signature: dict, constexprs: dict, arch: str, num_warps: int = 4,
                   name: str | None = None) -> dict:
    """Compile one jit kernel for one arch; returns its record (see module doc), named `name`
    (default: the function's name)."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{fn!r} is not a JITFunction: AOT compile cannot run with TRITON_INTERPRET=1")
    cc = parse_arch(arch)
    full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn, full_signature, constexprs)
    try:
        kernel = triton.compile(
            source,
            target=GPUTarget("cuda", cc, WARP_SIZE),
            options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION},
        )
    except Exception as error:  # any backend failure (ptxas, unsupported arch): name what failed
        raise RuntimeError(f"AOT compile of {fn.__name__} for {arch} failed: {error}") from error
    cubin, ptx = kernel.asm["cubin"], kernel.asm["ptx"]
    return {
        "kernel": name or fn.__name__,
        "function_name": kernel.metadata.name,
        "arch": arch,
        "cubin": cubin,
        "ptx": ptx,
        "ptx_isa": ptx_isa(ptx),
        "ptx_target": ptx_target(ptx),
        "ptx_min_driver": min_driver(ptx_isa(ptx)),
        "triton_version": triton.__version__,
        "sha256": hashlib.sha256(cubin).hexdigest(),
        "signature": dict(signature),
        "constexprs": dict(constexprs),
        "enable_fp_fusion": FP_FUSION,
        **_launch_facts(kernel, signature),
    }


def compile_kernels(
    archs: Sequence[str] = ("sm_80", "sm_89", "sm_90"),  # the tests' set; the CLI's is kernels.DEFAULT_ARCHS
    *,
    num_heads: int = 8,
    kv_heads: int = 1,
    head_dim: int = 256,
    page_size: int = PAGE_SIZE,
    scale: float | None = None,
    num_warps: int = 4,
    pool_dtype: str = "float32",
) -> list[dict]:
    """Compile every plugin kernel for every arch, specialised for one model's head layout and
    page pool dtype ("float32" or "float8_e4m3fn": records named `kernel_name(fn, pool_dtype)`).

    `scale` defaults to head_dim ** -0.5. Records are those of `compile_kernel` plus "grid", the
    launch grid rule. Raises RuntimeError naming the kernel and arch on the first failure.
    """
    dims = KernelDims(num_heads, kv_heads, head_dim, page_size, head_dim**-0.5 if scale is None else scale)
    records = []
    for arch in archs:
        if pool_dtype != "float32" and parse_arch(arch) < FP8_MIN_ARCH:
            logger.warning("no %s-pool kernels for %s: Triton has float8e4nv from sm_%d", pool_dtype, arch,
                           FP8_MIN_ARCH)  # fmt: skip
            continue
        for fn, signature, constexprs, grid in _kernels(dims, pool_dtype):
            record = compile_kernel(fn, signature, constexprs, arch, num_warps,
                                    kernel_name(fn.__name__, pool_dtype))
            records.append({**record, "grid": grid})
            logger.info("compiled %s for %s: %d B cubin, PTX ISA %s", record["kernel"], arch,
                        len(record["cubin"]), record["ptx_isa"])  # fmt: skip
    return records


# ---------------------------------------------------------------- launching a record (CUDA driver)


def op_of_kernel(kernel: str) -> ModuleType:
    """The op module whose kernel a record named `kernel` holds (fp8-pool variants included)."""
    from walkforge.plugins import _ops

    for module in _ops().values():
        if kernel in (module.AOT.name, kernel_name(module.AOT.name, "float8_e4m3fn")):
            return module
    raise ValueError(f"no walkforge op has kernel {kernel!r}")


def aot_values(kernel: str, x: Mapping[str, Any], device: str = "cuda"
               ) -> tuple[dict[str, Any], dict[str, Sequence[int]], Any]:
    """(argument values by signature name without '_ptr', shapes for the grid rule, output tensor)
    of the record named `kernel`, on the inputs `x` of a plugin case (the keys of
    tests/plugins/plugin_cases.make_inputs; `kv_scales` optional) moved to `device`."""
    op = op_of_kernel(kernel)
    args, shapes, out = op.kernel_args(*op.case_args(x, device))
    return {name.removesuffix("_ptr"): value for name, value in args.items()}, shapes, out


def launch_aot(record: Mapping[str, Any], image: str, x: Mapping[str, Any]) -> Any:
    """Load the record's cubin (or PTX, JIT-compiled by the driver) and launch it once on `x`
    (a plugin case, see `aot_values`) on the current CUDA device; returns the output tensor.

    Arguments in signature order (pointers as u64, i32 scalars), then `hidden_params` null
    pointers; dynamic shared memory above 48 KiB is opted into on the function first. Needs cupy."""
    import cupy
    import torch

    drv = cupy.cuda.driver
    if record["global_scratch_size"] or record["profile_scratch_size"]:
        raise RuntimeError(f"{record['kernel']} wants scratch memory; this launcher passes null pointers")
    values, shapes, out = aot_values(record["kernel"], x)
    data = record["cubin"] if image == "cubin" else record["ptx"].encode() + b"\0"
    module = drv.moduleLoadData(data)
    try:
        func = drv.moduleGetFunction(module, record["function_name"])
        shared = int(record["shared_mem"])
        if shared > DEFAULT_SHARED_LIMIT:
            drv.funcSetAttribute(func, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
        signature = record["signature"].items()
        params = [c_arg(values[name.removesuffix("_ptr")], kind) for name, kind in signature]
        params += [ctypes.c_uint64(0) for _ in range(record["hidden_params"])]
        pointers = (ctypes.c_void_p * len(params))(*(ctypes.addressof(p) for p in params))
        grid = eval_grid(record["grid"], shapes, record["constexprs"])
        torch.cuda.synchronize()
        drv.launchKernel(func, *grid, record["block_dim"], 1, 1, shared, 0, ctypes.addressof(pointers), 0)
        torch.cuda.synchronize()
    finally:
        drv.moduleUnload(module)
    return out


def c_arg(value: Any, kind: str) -> Any:
    """A ctypes value for one kernel argument: a pointer as u64, an i32 scalar."""
    if kind.startswith("*"):
        return ctypes.c_uint64(value.data_ptr())
    if kind == "i32":
        return ctypes.c_int32(int(value))
    raise ValueError(f"no launcher for argument type {kind!r}")
