"""What onnxruntime must be told to run walkforge's ONNX as written: one place for the compiler
(check, calibration) and the runtime's onnxruntime backends."""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from types import ModuleType

from walkforge.errors import WalkforgeError
from walkforge.graphs.qdq import ORT_DISABLED_OPTIMIZERS

ORT_HINT = "pip install 'walkforge[cpu]' (or 'walkforge[cuda]' for onnxruntime-gpu; one of the two)"


def require_onnxruntime() -> ModuleType:
    """onnxruntime, imported. Where it is missing (`walkforge[compile]` alone does not bring it: it
    comes as [cpu] or [cuda], one build per environment), a one-line WalkforgeError saying what to
    install instead of a ModuleNotFoundError traceback."""
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":  # onnxruntime is there and lacks a dependency: a traceback helps
            raise
        raise WalkforgeError(f"onnxruntime is not installed: {ORT_HINT}") from None
    return onnxruntime


# CPU flags of the x86 instructions that sum u8×s8 products straight into int32 (exact).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# Without them a pair of u8×s8 products is summed in int16: exact while 2·255·|w| ≤ 32767.
PAIR_SAFE_WEIGHT_MAX = 32767 // (2 * 255)  # 64: 7-bit weights (±63) never saturate


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them; None where /proc/cpuinfo is unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def int8_pairs_saturate(flags: frozenset[str] | None = None, weight_max: float = 127) -> bool:
    """Whether onnxruntime's u8×s8 GEMM kernels clamp on this CPU (`flags`: cpu_flags()) for int8
    weights up to `weight_max` in magnitude: x86 without VNNI (AVX2, or AVX-512 without VNNI)
    sums each pair of products in int16 (vpmaddubsw), which saturates once 2·255·weight_max
    exceeds 32767. Full-range weights (±127) then lose accuracy (docs/benchmarks.md, 0.3.1); 7-bit
    weights (±63, graphs.qdq.int8_weight_max) never saturate. Other architectures: False. Unknown flags on x86
    count as saturating (exact, slower, is the safe side)."""
    if weight_max <= PAIR_SAFE_WEIGHT_MAX:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is None or not VNNI_FLAGS & flags


def session_options(threads: int | None = None, spinning: bool = True, fuse_qdq: bool = False,
                    arena: bool = True, prepack: bool = True, int8_weight_max: float = 127,
                    spin_after_run: bool = True):
    """Options every walkforge session uses. `spinning=False` for in-process parity with torch
    (onnxruntime's spinning threads starve torch's, docs/toolchain.md). `spin_after_run=False`: the
    pool's threads spin within a run and stop when it returns, for a walk that another session
    runs after (`STOP_SPINNING_AFTER_RUN`). `fuse_qdq` for int8 graphs:
    onnxruntime then fuses their Q/DQ into integer kernels (exact ones: `int8_pairs_saturate` for
    weights up to `int8_weight_max`, the manifest's precision.int8_weight_max); off, Q/DQ run as
    written (FP8).
    `arena=False` for walks whose shapes vary with the image size (`varying_shapes`): onnxruntime's
    CPU arena keeps the high-water mark of every shape it has seen, so a tiled VAE decode (tiles of
    four sizes) would keep a block for each size.
    `prepack=False` for the compiler's sessions of large walks: onnxruntime then reads GEMM weights
    where it maps them from the external data file, one page-cache copy that every session of the
    walk shares, instead of a private prepacked copy per session; slower per run, which calibration
    and gates can afford."""
    ort = require_onnxruntime()

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning and not spin_after_run:
        opts.add_session_config_entry(STOP_SPINNING_AFTER_RUN, "1")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    # FP8 Q/DQ must not be fused into int8-only kernels on CPU (docs/toolchain.md); int8 Q/DQ must.
    opts.add_session_config_entry("session.disable_quant_qdq", "0" if fuse_qdq else "1")
    if fuse_qdq and int8_pairs_saturate(weight_max=int8_weight_max):
        # onnxruntime then stores the int8 weights as uint8 (w + 128, zero point moved with it:
        # the same products) and runs its u8×u8 kernels, which widen to int16 before multiplying:
        # exact, as VNNI is, so int8 results do not depend on the CPU. Slower than u8×s8
        # (7-bit weights need none of it: they run exactly on the u8×s8 kernels).
        opts.add_session_config_entry("session.x64quantprecision", "1")
    return opts


# Each session has its own intra-op pool, whose threads spin for a while after a run returns. On
# a chain of sessions (pi0: vision → prefill → the denoise loop) that spinning takes cores from the
# next walk. So every session but the loop body's stops spinning when its run returns: denoise
# runs again right after itself, and stopping there costs more than it frees
# (docs/benchmarks.md, 0.3.3).
STOP_SPINNING_AFTER_RUN = "session.force_spinning_stop"

# Symbolic dims of image sizes (the VAE's latents and pixels, BAGEL's latent grid and image): any
# size a user asks for, and within one run the tiles of a tiled VAE decode (up to four sizes). The
# arena would keep a block for each size seen (`varying_shapes`).
# Other symbolic dims (batch, pi0's views and prompt length) are bounded by the bundle, so the
# arena's high-water mark is at most one largest call: it serves them, and without it pi0's prefill
# re-faulted its large activations on every call (docs/benchmarks.md, 0.3.2).
IMAGE_DIMS = ("height", "width", "sample_height", "sample_width", "grid_h", "grid_w")


def varying_shapes(inputs) -> bool:
    """Whether a walk's activation sizes vary with the image size asked for (an input,
    graphs.walk.TensorSpec, has an IMAGE_DIMS dim: the VAE's walks, BAGEL's denoise and decode)."""
    return any(d in IMAGE_DIMS for s in inputs for d in s.shape)


# Common-subexpression elimination merges the Q → DQ pairs the int8 pass gives each GEMM back into
# one shared pair, which onnxruntime then cannot fuse into any of them (small pi0's vision walk:
# 18 of 36 GEMMs fused with it, 36 of 36 without).
INT8_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)


def session_kwargs(providers: list, fuse_qdq: bool = False) -> dict:
    """InferenceSession keyword arguments besides the options: providers, FP8-unsafe rewrites off
    (and, for int8 graphs, the rewrite that would undo their per-GEMM Q/DQ), and no silent retry on
    another provider: onnxruntime would print an "EP Error" banner to stdout and fall back to CPU,
    where the caller asked for exactly these providers."""
    disabled = [*ORT_DISABLED_OPTIMIZERS, *(INT8_DISABLED_OPTIMIZERS if fuse_qdq else ())]
    return {"providers": providers, "disabled_optimizers": disabled, "enable_fallback": 0}
