"""Real-time chunking on small pi0: what the guidance costs and what it buys (docs/policy.md,
"Real-time chunking"). Random weights, so the numbers say what RTC does to the joins, not how
well a trained policy behaves.

    python scripts/rtc_sim.py build build/rtc-pi0-small   # small pi0 (random weights) + a tiny tokenizer
    python scripts/rtc_sim.py cost  build/rtc-pi0-small   # chunk latency with / without RTC, each mode
                                                          # in its own process, alternating
    python scripts/rtc_sim.py jump  build/rtc-pi0-small   # the simulated loop: the jump at each join

The loop (`jump`): chunks of 50 at `--fps`; a new inference starts once 25 actions of the chunk
ran; it takes `--delay` control steps, during which the old chunk keeps running; the new chunk
then replaces the queue less its first `delay` rows (`runtimes.rtc.RealTimeChunker`'s request /
merge, LeRobot's rollout). The jump is the distance (L2 over the action dims, robot units) from
the last action executed from one chunk to the first executed from the next; beside it, the mean
step between consecutive actions inside a chunk, and how far the first new action lies from the
one the old chunk had planned for that step. Each chunk starts from fresh noise (the same draws
with and without RTC): white, as LeRobot draws it, and smooth along the chunk — a random-weight
model's chunk is mostly its start noise, so white noise makes every chunk as rough inside as at
its joins, while smooth noise gives chunks that move like a trained policy's. The state fed back
is the last action.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkforge from this checkout

ITERS = 8
LEFTOVER_ROWS = 10  # what the rollout hands: execution_horizon rows
CORPUS = ["pick up the red block", "open the drawer", "stack the blue cup on the red one", "wave"]


def build(out: Path) -> None:
    """Small pi0 with random weights and a tiny trained SentencePiece tokenizer (tasks as text)."""
    import sentencepiece as spm

    import walkforge

    tok = Path(tempfile.mkdtemp(prefix="rtc-tok-"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 50), model_writer=model, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    (tok / "tokenizer.model").write_bytes(model.getvalue())
    walkforge.compile_bundle(walkforge.CompileRequest("pi0", out, variant="small", tokenizer=tok,
                                                      gpu_archs=(), force=True))
    print(f"wrote {out}")


def observation(policy, state: np.ndarray | None = None, seed: int = 0) -> dict:
    spec = policy.observation_spec()
    rng = np.random.default_rng(seed)
    obs = {k: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for k in spec["cameras"]}
    dim = spec["state"]["dim"]
    obs[spec["state"]["key"]] = (np.zeros(dim, np.float32) if state is None else
                                 np.resize(state, dim).astype(np.float32))
    return obs | {"task": CORPUS[0]}


def time_mode(bundle: Path, mode: str, iters: int) -> dict:
    """One process: chunk latencies (ms) of `mode` ("plain", "rtc", or "both": the two alternating
    call by call, so load that drifts meanwhile weighs on both alike) and per-walk medians."""
    import walkforge
    from walkforge.runtimes.rtc import guide_feeds

    policy = walkforge.load(bundle)
    obs = observation(policy)
    noise = np.random.default_rng(1).standard_normal(policy.observation_spec()["noise"]).astype(np.float32)
    prev = policy.predict_chunk(obs, noise).model[25:25 + LEFTOVER_ROWS, :policy.processor.action_dim]
    kwargs = {"plain": {}, "rtc": {"inference_delay": 3, "prev_chunk_left_over": prev}}
    modes = ["plain", "rtc"] if mode == "both" else [mode]
    for m in modes * 2:
        policy.predict_chunk(obs, noise, **kwargs[m])
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(iters):
        for m in modes:
            start = time.perf_counter()
            policy.predict_chunk(obs, noise, **kwargs[m])
            times[m].append(time.perf_counter() - start)
    walks: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for _ in range(max(2, iters // 2)):
        for m in modes:
            policy.chain.observer = lambda walk, _i, sec, m=m: walks[m].setdefault(walk, []).append(sec)
            policy.predict_chunk(obs, noise, **kwargs[m])
    out = {m: {"median_ms": 1e3 * statistics.median(times[m]), "min_ms": 1e3 * min(times[m]),
               "walks_ms": {w: 1e3 * statistics.median(s) for w, s in walks[m].items()}} for m in modes}
    if "rtc" in out:  # the front's share: checking the RTC arguments and building the guide's inputs
        start = time.perf_counter()
        for _ in range(100):
            rows = policy._guidance(1, False, 3, prev)
            guide_feeds(rows, policy.processor.chunk_size, policy.processor.max_action_dim)
        out["rtc"]["front_ms"] = 1e3 * (time.perf_counter() - start) / 100
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cost(bundle: Path, iters: int, rounds: int) -> None:
    """Each mode in its own process (plain, rtc, then rtc, plain, …), then both alternating in one."""
    load = os.getloadavg()
    runs: dict[str, list[dict]] = {"plain": [], "rtc": []}
    for r in range(rounds):
        for mode in ("plain", "rtc") if r % 2 == 0 else ("rtc", "plain"):
            runs[mode].append(_child(bundle, mode, iters)[mode])
    both = _child(bundle, "both", iters)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average (1 min) before {load[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    print("| how | mode | chunk median ms | vision ms | prefill ms | denoise ms / step | guide ms / step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for how, results in [*((f"own process {i + 1}", {m: runs[m][i] for m in runs}) for i in range(rounds)),
                         ("one process, alternating", both)]:
        for mode, r in results.items():
            w = r["walks_ms"]
            print(f"| {how} | {mode} | {r['median_ms']:.0f} | {w['vision']:.1f} | {w['prefill']:.1f} | "
                  f"{w['denoise']:.2f} | {w.get('guide', 0.0):.3f} |")
    guide, chunk, steps = both["rtc"]["walks_ms"]["guide"], both["plain"]["median_ms"], 10
    alternating = 100 * (both["rtc"]["median_ms"] / chunk - 1)
    own = 100 * (min(r["median_ms"] for r in runs["rtc"]) / min(r["median_ms"] for r in runs["plain"]) - 1)
    front = both["rtc"]["front_ms"]
    print(f"guide walk: {steps} × {guide:.3f} ms = {100 * steps * guide / chunk:.3f} % of the chunk; front: "
          f"{front:.3f} ms; chunk medians rtc / plain − 1: alternating {alternating:+.2f} %, own processes "
          f"(best of each) {own:+.2f} %")


def _child(bundle: Path, mode: str, iters: int) -> dict:
    cmd = [sys.executable, __file__, "_time", str(bundle), mode, "--iters", str(iters)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def smooth_noise(rng: np.random.Generator, shape: list[int], width: float = 5.0) -> np.ndarray:
    """N(0, 1) in every entry like the flow's usual start, but correlated along the chunk (a Gaussian
    kernel of `width` rows over white noise, scaled to unit variance)."""
    rows, dims = shape
    pad = int(4 * width)
    k = np.exp(-0.5 * (np.arange(-pad, pad + 1) / width) ** 2)
    k /= np.sqrt((k**2).sum())
    white = rng.standard_normal((rows + 2 * pad, dims))
    return np.stack([np.convolve(white[:, d], k, mode="valid") for d in range(dims)], 1).astype(np.float32)


def jump(bundle: Path, chunks: int, fps: float, delay: int, execute: int, seed: int) -> None:
    import walkforge
    from walkforge.runtimes.rtc import RealTimeChunker

    policy = walkforge.load(bundle)
    chunk_size, shape = policy.observation_spec()["chunk_size"], policy.observation_spec()["noise"]
    modes = {"without RTC": None, "RTC, LINEAR (LeRobot's default)": {},
             "RTC, EXP": {"prefix_attention_schedule": "EXP"}}
    draws = {"white (LeRobot's)": lambda rng: rng.standard_normal(shape).astype(np.float32),
             "smooth along the chunk": lambda rng: smooth_noise(rng, shape)}
    print(f"{chunks} chunks of {chunk_size}, {execute} executed before each inference, inference delay "
          f"{delay} steps at {fps:g} fps; L2 over the {policy.processor.action_dim} action dims")
    print("| start noise | mode | mean jump at a join | max jump | mean step inside a chunk | "
          "first new action vs the old chunk's plan |")
    print("|---|---|---:|---:|---:|---:|")
    for draw_name, draw in draws.items():
        for name, rtc in modes.items():
            chunker = RealTimeChunker(policy, fps, rtc=rtc or {}, queue_threshold=chunk_size - execute)
            row = simulate(policy, chunker, rtc, draw, np.random.default_rng(seed), chunks, fps, delay, seed)
            print(f"| {draw_name} | {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


def simulate(policy, chunker, rtc, draw, rng, chunks: int, fps: float, delay: int, seed: int) -> tuple:
    """(mean jump, max jump, mean step inside a chunk, mean |first new − old plan at that step|)."""
    last, planned, jumps, steps, drift = None, None, [], [], []
    for k in range(chunks):
        while not chunker.needs_chunk():
            action = chunker.get()
            if last is not None:
                steps.append(float(np.linalg.norm(action - last)))
            last = action
        request = chunker.request()
        obs = observation(policy, last, seed)
        for _ in range(delay if k else 0):  # the old chunk runs on while the new one is computed
            action = chunker.get()
            steps.append(float(np.linalg.norm(action - last)))
            last = action
        planned = chunker.queue.processed_left_over()
        leftover = request.prev_chunk_left_over if rtc is not None else None
        chunk = policy.predict_chunk(obs, draw(rng), inference_delay=request.inference_delay,
                                     prev_chunk_left_over=leftover, rtc=rtc)
        chunker.merge(request, chunk, (delay - 1e-6) / fps)  # measured: `delay` steps
        first = chunker.get()
        if last is not None:
            jumps.append(float(np.linalg.norm(first - last)))
            drift.append(float(np.linalg.norm(first - planned[0])))
        last = first
    return statistics.mean(jumps), max(jumps), statistics.mean(steps), statistics.mean(drift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["build", "cost", "jump", "_time"])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("mode", nargs="?", default="plain")
    parser.add_argument("--iters", type=int, default=ITERS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--fps", type=float, default=50.0)
    parser.add_argument("--delay", type=int, default=3)
    parser.add_argument("--execute", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "build":
        build(args.bundle)
    elif args.what == "cost":
        cost(args.bundle, args.iters, args.rounds)
    elif args.what == "_time":
        print(json.dumps(time_mode(args.bundle, args.mode, args.iters)))
    else:
        jump(args.bundle, args.chunks, args.fps, args.delay, args.execute, args.seed)


if __name__ == "__main__":
    main()
