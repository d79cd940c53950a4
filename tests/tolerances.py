"""The suite's one error measure and the fp32 tolerance rule the named tolerances derive from.

Every numeric comparison is relative to the reference's scale: `rel_err(got, want)` =
max|got - want| / max|want| (`agreement(...).rel`, the number the compile check and `verify`
report). Two fp32 implementations of the same maths (onnxruntime vs torch, Triton vs torch,
ours vs transformers) differ by the order in which they sum: each kernel (MLAS, oneDNN, MKL;
SSE, AVX2, AVX-512, AMX) blocks a K-term reduction its own way and fuses multiply-adds or not.
Rounding errors of K terms grow like a random walk, so the relative difference is about
eps·sqrt(K) (at worst eps·K). `fp32_tol` allows SPREAD times that, per stacked stage, so no
test depends on which SIMD kernels the CPU picks, while staying ≥ 100× below what a real bug
costs: an fp8 (E4M3, 3 mantissa bits) rounding where fp32 was expected moves outputs by 1e-2,
a wrong mask or a missed scale by 1e-1 and more.
"""

from __future__ import annotations

import math

import numpy as np

from walkforge.compiler.check import agreement

FP32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 ≈ 1.19e-7: one fp32 rounding, relative
SPREAD = 8  # ×8 over eps·sqrt(K): the max over thousands of outputs lies ~4σ out, and softmax
# or a norm can double an input's relative error; measured worst cases sit ≥ 10× below the limit

BF16_EPS = 2.0**-7  # torch.finfo(torch.bfloat16).eps, 8 significant bits: one rounding ≤ 2**-8 relative


def rel_err(got, want) -> float:
    """max|got - want| / max|want| of numpy arrays or torch tensors (any float dtype, any device)."""
    return agreement(_numpy(got), _numpy(want)).rel


def cosine(got, want) -> float:
    """Cosine similarity of the flattened values: scale-free, the measure for fp8 vs fp32."""
    return agreement(_numpy(got), _numpy(want)).cosine


def _numpy(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def fp32_tol(reduction: int, depth: int = 1) -> float:
    """Relative tolerance between two fp32 implementations whose longest reduction sums
    `reduction` terms, through `depth` stacked stages (layers, steps) whose errors add up."""
    return SPREAD * FP32_EPS * math.sqrt(reduction) * depth


def attention_tol(head_dim: int, keys: int) -> float:
    """fp32 attention: each logit sums head_dim products, each output sums `keys` weighted values;
    the two rounding walks add (eps²·head_dim + eps²·keys under one square root)."""
    return fp32_tol(head_dim + keys)


def vae_decode_tol(channels: int) -> float:
    """Two fp32 VAE decodes (ours vs diffusers, onnxruntime vs torch): the longest sum is a 3×3 conv
    over the widest block's `channels` (tiny 64: 2.3e-5; sd 512: 6.5e-5). A dropped bias, skip, norm
    or upsample moves the sample by 1e-2 and more; fp8 weights by 1e-1."""
    return fp32_tol(9 * channels)


# pi0 `tiny` actions from two fp32 implementations (ours vs transformers, bundle engines vs eager, a
# request in a batch vs alone): the longest sum is attention over 2·256 + 16 prefix + 51 suffix
# tokens; 10 Euler steps of 1/10 add up to one velocity's error, depth 2 for what the steps feed
# back: 4.6e-5. A mask, RoPE-position or time-embedding slip, or requests of a batch mixing, moves
# actions by 1e-2 and more; fp8 weights and K/V by 2e-2.
PI0_TINY_ACTIONS_TOL = fp32_tol(2 * 256 + 16 + 51, depth=2)


# BAGEL `tiny` (recipes/bagel), two fp32 implementations (ours vs stock transformers/diffusers pieces,
# bundle engines vs the recipe's torch modules). "layer": the 256-term time-embedding sum. "decode":
# the FLUX decoder's longest sum, a 3×3 conv over 32 channels. "latents": 5 Euler steps through 2 MoT
# layers (MLP sums of 128 terms), depth 2 for what the steps feed back, ×2·s_t = 8 because text
# guidance a = v_t + 4·(v_c − v_t) amplifies the branches' difference. "image": the issue's 1e-4 on the
# image, which the decoder maps the latents' error into. A mask, RoPE-position, routing or renorm slip
# moves latents by 1e-2 and more; fp8 weights by 3e-2.
BAGEL_TOL = {"layer": fp32_tol(256), "decode": vae_decode_tol(32),
             "latents": 8 * fp32_tol(128, depth=2), "image": 1e-4}


# runtimes/processors: numpy resize-with-pad vs torch's interpolate(bilinear, align_corners=False,
# antialias=False). Each output is two lerps of inputs ≤ 1; torch computes the source coordinates
# and weights in fp32 (a few roundings each), ours in float64 rounded once to fp32: ≤ 8 fp32 eps
# relative (measured 1.2e-7: one fp32 ulp). A wrong corner rule or half-pixel offset moves pixels by 1e-2.
RESIZE_TOL = 8 * FP32_EPS
# The policy front (raw observation → processors → engines → robot units) vs the recipe's eager
# torch reference fed hand-processed inputs: the engines' fp32 difference (PI0_TINY_ACTIONS_TOL
# ≈ 4.6e-5, pi0.5's 200-token prompt ≈ 5.3e-5) through the per-dim affine un-normalisation
# (scales ≤ 1.5), bounded by the 1e-4. A wrong stat, bin, token or padding pixel moves
# the chunk by 1e-2 and more.
POLICY_CHUNK_TOL = 1e-4


# --precision bf16 (graphs/bf16): bf16 has an 8-bit mantissa (relative rounding 2^-9 ≈ 2e-3 per
# value); a GEMM over random weights keeps the direction of its output to a cosine of ≈ 1 − 1e-5, and
# pi0's Euler loop feeds each step's error forward. The issue's bar for actions vs fp32: 0.999
# (measured on `tiny`: 0.999997). A GEMM left in fp32 or a bf16 norm/softmax would not fail it, a
# wrong cast or a weight rounded to the wrong dtype would (cosine < 0.9).
BF16_ACTIONS_COSINE = 0.999
# The same bf16 graph on two evaluators (onnx.reference vs onnxruntime running emulate_bf16): equal
# roundings, differing only where accumulation order flips a result's last bf16 bit (one ULP,
# 2^-8 relative, on a few elements): cosine ≥ 1 − 1e-5 (measured 0.9999999 on pi0 `tiny` vision).
BF16_EVALUATORS_COSINE = 1 - 1e-5
