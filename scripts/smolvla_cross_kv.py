"""What computing SmolVLA's cross-attention K/V once per chunk saves over recomputing them each step.

SmolVLA's expert alternates self- and cross-attention layers. A cross layer j (expert layer i)
attends to K/V = its own k_proj / v_proj applied to VLM layer i's cached prefix K/V. LeRobot 0.6.1
(smolvlm_with_expert.py `forward_cross_attn_layer`) applies those projections in every denoise step,
although they depend on the prefix alone. walkforge's recipe computes them once, in prefill
(walkforge/recipes/smolvla/model.py `prefix_kv` → `prefill_paged`), and writes them into extra
layers of the paged KV pool: pool layer i < L is VLM layer i, pool layer L + j the j-th cross
layer's projected K/V (`SmolVLAConfig.pool_layers` = L + n_cross). The denoise walk only reads them.

This script times, in torch eager on the recipe's own modules (seeded default init, batch 1, every
camera valid, a full prompt), the denoise loop of one chunk (num_steps Euler steps) two ways:

    once      the cache holds the cross K/V (walkforge: prefill wrote them)
    per step  each step first recomputes them from the VLM K/V (LeRobot's way; the same
              `cross_kv` code, written into the same cache tensor, then the same `denoise_step`)

and the cross K/V computation alone (the work the once-per-chunk path skips num_steps − 1 times: on
a shared machine a steadier estimate of the saving than the difference of two loop times), and
prints the analytic FLOPs (2·m·n·k per matmul, attention included, elementwise work not).

    python3 scripts/smolvla_cross_kv.py [--variants small,smolvla] [--views 2] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from walkforge.recipes import get_recipe  # noqa: E402
from walkforge.recipes.blocks.flow import DenseCache  # noqa: E402
from walkforge.recipes.smolvla.config import SmolVLAConfig  # noqa: E402


def flops(cfg: SmolVLAConfig, prefix: int) -> dict[str, float]:
    """Matmul FLOPs of one denoise step (batch 1, `prefix` prefix tokens) and of the cross K/V."""
    e, h, a = cfg.expert, cfg.action_horizon, cfg.action_dim
    d, qd, kv = e.width, e.heads * e.head_dim, e.kv_heads * e.head_dim
    heads = 2 * h * a * d + 2 * h * 2 * d * d + 2 * h * d * d + 2 * h * d * a  # in, time MLP, out
    layer = 2 * h * d * qd + 2 * h * qd * d + 3 * 2 * h * d * e.mlp  # q, o, gated MLP
    n_cross = len(cfg.cross_layers)
    n_self = e.layers - n_cross
    self_layer = layer + 2 * 2 * h * d * kv + 2 * 2 * h * qd * (prefix + h)  # own k, v; QKᵀ and AV
    cross_layer = layer + 2 * 2 * h * qd * prefix  # attends to the prefix only
    cross_kv = n_cross * 2 * 2 * prefix * kv * kv  # k_proj and v_proj over the prefix K/V
    return {"step": heads + n_self * self_layer + n_cross * cross_layer, "cross_kv": cross_kv}


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(variant: str, views: int, reps: int) -> dict[str, float]:
    recipe = get_recipe("smolvla")
    cfg = replace(recipe.variant(variant), num_views=views)
    torch.manual_seed(0)
    model = recipe.build(cfg).eval()
    x = {k: torch.from_numpy(v) for k, v in recipe.fake_inputs(cfg, batch=1, seed=0).items()}
    x["image_masks"][:] = True  # every camera runs
    x["prompt_mask"][:] = True
    steps, dt = cfg.num_steps, -1.0 / cfg.num_steps
    n_layers = cfg.llm.layers
    with torch.inference_mode():
        t0 = time.perf_counter()
        image_tokens = model.embed_images(x["images"])
        t_vision = time.perf_counter() - t0
        t0 = time.perf_counter()
        k, v, pad = model.prefix_kv(image_tokens, x["image_masks"], x["prompt_ids"], x["prompt_mask"],
                                    x["state"])
        t_prefill = time.perf_counter() - t0
        cache = DenseCache(k.clone(), v.clone(), pad)
        vlm_k, vlm_v = k[:n_layers], v[:n_layers]

        def loop(recompute: bool) -> torch.Tensor:
            xt = x["noise"]
            for s in range(steps):
                if recompute:  # LeRobot: the cross layers' k_proj / v_proj over the prefix, every step
                    ck, cv = model.cross_kv(vlm_k, vlm_v)
                    cache.k[n_layers:], cache.v[n_layers:] = ck, cv
                t = torch.full((1,), 1.0 + s * dt)
                xt = model.denoise_step(xt, t, torch.tensor([dt]), cache)
            return xt

        assert torch.allclose(loop(False), loop(True), atol=1e-5)  # the same actions either way
        once, per_step, kv_only = [], [], []
        for _ in range(reps):  # interleaved: a shared machine's drift hits both alike
            once += timed(lambda: loop(False), 1)
            per_step += timed(lambda: loop(True), 1)
            kv_only += timed(lambda: model.cross_kv(vlm_k, vlm_v), 1)
    f = flops(cfg, pad.shape[1])
    n_cross, kv = len(cfg.cross_layers), cfg.llm.kv_heads * cfg.llm.head_dim
    return {
        "variant": variant, "prefix": pad.shape[1], "steps": steps, "n_cross": n_cross,
        "pool_layers": cfg.pool_layers, "vlm_layers": n_layers, "expert_layers": cfg.expert.layers,
        "kv_bytes": n_cross * 2 * int(pad.sum()) * kv * 4,
        "once_ms": 1e3 * statistics.median(once), "per_step_ms": 1e3 * statistics.median(per_step),
        "cross_kv_ms": 1e3 * statistics.median(kv_only), "vision_ms": 1e3 * t_vision,
        "prefill_ms": 1e3 * t_prefill,
        "step_gflop": f["step"] / 1e9, "cross_kv_gflop": f["cross_kv"] / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="small,smolvla")
    parser.add_argument("--views", type=int, default=2, help="cameras, all valid")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, {args.views} cameras, "
          f"medians of {args.reps}")
    print("| variant | prefix P | cross layers (pool layers) | denoise loop, K/V once | K/V per step "
          "| saved per chunk (loop difference) | cross K/V once | (steps − 1) × that | GFLOP per step "
          "| + K/V per step | FLOPs saved per chunk | K/V in the pool |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        r = measure(variant, args.views, args.reps)
        saved = r["per_step_ms"] - r["once_ms"]
        chunk_once = r["steps"] * r["step_gflop"] + r["cross_kv_gflop"]
        chunk_each = r["steps"] * (r["step_gflop"] + r["cross_kv_gflop"])
        print(f"| {variant} | {r['prefix']} | {r['n_cross']} of {r['expert_layers']} "
              f"(pool {r['vlm_layers']}..{r['pool_layers'] - 1} of {r['pool_layers']}) "
              f"| {r['once_ms']:.1f} ms | {r['per_step_ms']:.1f} ms "
              f"| {saved:.1f} ms ({100 * saved / r['per_step_ms']:.1f} %) | {r['cross_kv_ms']:.2f} ms "
              f"| {(r['steps'] - 1) * r['cross_kv_ms']:.1f} ms "
              f"({100 * (r['steps'] - 1) * r['cross_kv_ms'] / r['per_step_ms']:.1f} %) "
              f"| {r['step_gflop']:.3f} | {r['cross_kv_gflop']:.3f} "
              f"| {chunk_each - chunk_once:.2f} GFLOP "
              f"({100 * (1 - chunk_once / chunk_each):.1f} % of the loop's) "
              f"| {r['kv_bytes'] / 1e6:.2f} MB |")
        print(f"  ({variant}: torch eager vision {r['vision_ms']:.0f} ms, prefill incl. cross K/V "
              f"{r['prefill_ms']:.0f} ms, one run each)", flush=True)


if __name__ == "__main__":
    main()
