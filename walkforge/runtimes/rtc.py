"""Real-time chunking (RTC) as LeRobot 0.6.1 does it at inference (`policies/rtc/`).

A robot keeps executing the previous chunk while the next one is computed. RTC guides the new
chunk's flow towards the previous chunk's unexecuted rows (the "leftover", in model space), so the
two join without a jump. What each piece reproduces:

- `rtc_settings`: LeRobot's `RTCConfig` fields (`enabled`, `prefix_attention_schedule`,
  `max_guidance_weight`, `execution_horizon`; `debug`, `debug_maxlen` are accepted and unused).
- `prefix_weights`: `RTCProcessor.get_prefix_weights` (ZEROS, ONES, LINEAR, EXP).
- `guidance` + `guide_feeds`: one request's leftover and weights, then a batch's inputs of the
  compiled `guide` walk (recipes/blocks/flow.py `GuideWalk`), which applies the guided Euler update
  inside the chain's denoise loop on every backend. Rows without RTC get weight 0: unchanged.
- `ActionQueue`, `LatencyTracker`, `RealTimeChunker`: the rollout's RTC loop
  (`rollout/inference/rtc.py`, `action_queue.py`, `latency_tracker.py`) for a user's own loop —
  the queue in both spaces, the inference delay from the measured latency, the chunk merge.

Formulas and how LeRobot's code reaches them: docs/policy.md, "Real-time chunking".
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError, did_you_mean
from walkforge.runtimes.processors.state import normalize

log = logging.getLogger(__name__)

SCHEDULES = ("ZEROS", "ONES", "LINEAR", "EXP")
"""LeRobot's `RTCAttentionSchedule` values (recipes/lerobot.py RTC_SCHEDULES checks a folder's)."""
DEFAULTS = {"enabled": True, "prefix_attention_schedule": "LINEAR", "max_guidance_weight": 10.0,
            "execution_horizon": 10}
"""LeRobot 0.6.1's `RTCConfig` defaults (its docs recommend EXP; the default is LINEAR)."""
UNUSED = {"debug": False, "debug_maxlen": 100}
"""`RTCConfig` fields that only drive LeRobot's debug tracker: accepted, ignored."""
LEFTOVER = "prev_chunk_left_over"


@dataclass(frozen=True)
class RTCSettings:
    """LeRobot's `RTCConfig`, checked (`rtc_settings`)."""

    enabled: bool = True
    prefix_attention_schedule: str = "LINEAR"
    max_guidance_weight: float = 10.0
    execution_horizon: int = 10


def rtc_settings(given: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None
                 ) -> RTCSettings:
    """`given` (a mapping with `RTCConfig`'s field names) over `defaults` (a bundle's `rtc_config`)
    over LeRobot's; an unknown key or a bad value is a one-line WalkforgeError."""
    merged: dict[str, Any] = dict(DEFAULTS)
    for where, part in (("the bundle's rtc_config", defaults), ("rtc", given)):
        if part is None:
            continue
        if not isinstance(part, Mapping):
            raise WalkforgeError(f"{where}: want a mapping of RTCConfig fields, got {type(part).__name__}")
        for key, value in part.items():
            if key not in DEFAULTS and key not in UNUSED:
                known = [*DEFAULTS, *UNUSED]
                raise WalkforgeError(f"{where}: unknown setting '{key}'{did_you_mean(str(key), known)}; "
                                     f"LeRobot's RTCConfig has {', '.join(known)}")
            if key in DEFAULTS:
                merged[key] = value
    return RTCSettings(enabled=_flag(merged["enabled"]),
                       prefix_attention_schedule=_schedule(merged["prefix_attention_schedule"]),
                       max_guidance_weight=_positive(merged["max_guidance_weight"]),
                       execution_horizon=count(merged["execution_horizon"], "rtc execution_horizon"))


def _flag(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise WalkforgeError(f"rtc enabled: want true or false, got {value!r}")
    return bool(value)


def _schedule(value: Any) -> str:
    name = getattr(value, "value", value)  # LeRobot's RTCAttentionSchedule is a str enum
    if not isinstance(name, str) or name.upper() not in SCHEDULES:
        raise WalkforgeError(f"rtc prefix_attention_schedule: {value!r} is not one of {', '.join(SCHEDULES)}")
    return name.upper()


def _positive(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise WalkforgeError(f"rtc max_guidance_weight: want a finite number > 0, got {value!r}")
    return float(value)


def count(value: Any, name: str) -> int:
    """`value` as an int ≥ 0 (numpy integers too, never a bool or a float), else a one-line error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise WalkforgeError(f"{name}: want an integer ≥ 0, got {value!r}")
    return int(value)


def prefix_weights(schedule: str, delay: int, horizon: int, total: int) -> np.ndarray:
    """LeRobot's prefix weights (total,) float32 for an inference `delay` and effective `horizon`:
    rows i < min(delay, horizon) weigh 1; ZEROS: 0 after; ONES: 1 up to row `horizon`, 0 after;
    LINEAR: then (horizon − i)/(horizon − start + 1) down to row `horizon`, 0 after (start =
    min(delay, horizon); with delay 0 the first weight is horizon/(horizon + 1)); EXP: each such
    ramp value x times expm1(x)/(e − 1)."""
    start = min(delay, horizon)
    if schedule == "ZEROS":
        weights = np.zeros(total, np.float32)
        weights[:start] = 1
        return weights
    if schedule == "ONES":
        weights = np.ones(total, np.float32)
        weights[horizon:] = 0
        return weights
    steps = total - max(total - horizon, 0) - start
    ramp = np.zeros(0, np.float32)
    if horizon > start and steps > 0:
        ramp = np.linspace(1.0, 0.0, steps + 2, dtype=np.float32)[1:-1]
    if schedule == "EXP":
        ramp = ramp * (np.expm1(ramp) / np.float32(math.e - 1))
    parts = [np.ones(min(start, total)), ramp, np.zeros(max(total - horizon, 0))]
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class Guidance:
    """One request's RTC, resolved: its leftover (rows, dims) float32 in model space, the prefix
    weights (chunk,) and the largest guidance weight."""

    leftover: np.ndarray
    weights: np.ndarray
    max_guidance: float


def guidance(leftover: np.ndarray, delay: int, horizon: int | None, settings: RTCSettings,
             chunk: int) -> Guidance | None:
    """One request's guidance (`leftover` checked by `leftover_rows`), or None where it changes
    nothing (RTC disabled, or every weight 0): as LeRobot, the effective horizon is
    min(horizon or the settings', the leftover's rows)."""
    if not settings.enabled:
        return None
    horizon = settings.execution_horizon if horizon is None else horizon
    weights = prefix_weights(settings.prefix_attention_schedule, delay, min(horizon, len(leftover)), chunk)
    if not weights.any():
        return None
    return Guidance(leftover, weights, settings.max_guidance_weight)


def leftover_rows(value: Any, chunk: int, dims: int, batch: int | None) -> np.ndarray:
    """A caller's `prev_chunk_left_over` as float32 (rows, dims) — (batch, rows, dims) when
    `batch` is given — with rows ≤ `chunk`, dims ≤ `dims` (max_action_dim), finite."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise WalkforgeError(f"{LEFTOVER}: not an array of numbers") from None
    want = f"(rows ≤ {chunk}, dims ≤ {dims})"
    if batch is not None:
        want = f"(batch {batch}, rows ≤ {chunk}, dims ≤ {dims}) for this batched observation"
    ok = array.ndim == (2 if batch is None else 3) and (batch is None or array.shape[0] == batch)
    if not ok or array.shape[-2] > chunk or array.shape[-1] > dims:
        raise WalkforgeError(f"{LEFTOVER}: shape {list(array.shape)}; want {want}, in model space "
                             "(normalised, before the postprocessor)")
    if not np.isfinite(array).all():
        raise WalkforgeError(f"{LEFTOVER}: has NaN or inf values")
    return array


def delays(value: Any, batch: int) -> list[int]:
    """`inference_delay`: one int ≥ 0 for every row, or one per row of a batch."""
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        values = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
        if len(values) != batch:
            raise WalkforgeError(f"inference_delay: {len(values)} values for a batch of {batch}")
        return [count(v, "inference_delay") for v in values]
    return [count(value, "inference_delay")] * batch


def guide_feeds(rows: Sequence[Guidance | None], chunk: int, dims: int) -> dict[str, np.ndarray]:
    """The guide walk's inputs for a batch: each row's leftover zero-padded to (chunk, dims) —
    LeRobot pads both, so padded dims are guided towards 0 —, its prefix weights and max guidance;
    a row without guidance gets weight 0 (its actions are exactly the unguided ones). Empty when
    no row has guidance (the chain then runs no guide)."""
    if all(row is None for row in rows):
        return {}
    prev = np.zeros((len(rows), chunk, dims), np.float32)
    weights = np.zeros((len(rows), chunk), np.float32)
    most = np.zeros(len(rows), np.float32)
    for i, row in enumerate(rows):
        if row is not None:
            prev[i, :row.leftover.shape[0], :row.leftover.shape[1]] = row.leftover
            weights[i], most[i] = row.weights, row.max_guidance
    return {"prev_chunk": prev, "prefix_weights": weights, "max_guidance": most}


# -- the rollout: LeRobot's RTC loop for a user's own -------------------------------------------

class LatencyTracker:
    """LeRobot's: the last `maxlen` inference latencies (seconds) and the largest seen since reset."""

    def __init__(self, maxlen: int = 100) -> None:
        self._values: deque[float] = deque(maxlen=maxlen)
        self.max_latency = 0.0

    def reset(self) -> None:
        self._values.clear()
        self.max_latency = 0.0

    def add(self, latency: float) -> None:
        """Record one latency; a negative one is dropped."""
        if float(latency) >= 0:
            self._values.append(float(latency))
            self.max_latency = max(self.max_latency, float(latency))

    def max(self) -> float:
        return self.max_latency

    def percentile(self, q: float) -> float:
        """The q-quantile (q in [0, 1]) of the kept latencies; 0 when none."""
        if not self._values:
            return 0.0
        if q <= 0:
            return min(self._values)
        if q >= 1:
            return self.max_latency
        return float(np.quantile(np.array(self._values, np.float32), q))

    def __len__(self) -> int:
        return len(self._values)


class ActionQueue:
    """LeRobot's rollout queue, thread-safe: a chunk's actions in robot units (what `get` hands
    out) and in model space (what the next chunk's leftover is cut from), consumed from
    `last_index`. With RTC a new chunk replaces the queue less its first `delay` rows (executed
    from the old one while it was computed); without, it is appended after the unconsumed rest."""

    def __init__(self, rtc: bool = True) -> None:
        self.rtc = rtc
        self.queue: np.ndarray | None = None  # robot units (steps, action_dim)
        self.original: np.ndarray | None = None  # model space (steps, action_dim)
        self.last_index = 0
        self._lock = threading.Lock()

    def get(self) -> np.ndarray | None:
        """The next action (a copy), or None when the queue is empty."""
        with self._lock:
            if self.queue is None or self.last_index >= len(self.queue):
                return None
            self.last_index += 1
            return self.queue[self.last_index - 1].copy()

    def qsize(self) -> int:
        with self._lock:
            return 0 if self.queue is None else len(self.queue) - self.last_index

    def empty(self) -> bool:
        return self.qsize() <= 0

    def action_index(self) -> int:
        with self._lock:
            return self.last_index

    def left_over(self) -> np.ndarray | None:
        """The unconsumed model-space rows (the next `prev_chunk_left_over`), None before any chunk."""
        with self._lock:
            return None if self.original is None else self.original[self.last_index:].copy()

    def processed_left_over(self) -> np.ndarray | None:
        """The unconsumed robot-unit rows, None before any chunk."""
        with self._lock:
            return None if self.queue is None else self.queue[self.last_index:].copy()

    def clear(self) -> None:
        with self._lock:
            self.queue = self.original = None
            self.last_index = 0

    def merge(self, original: np.ndarray, processed: np.ndarray, delay: int) -> None:
        """A new chunk (model space, robot units; (steps, action_dim) each) into the queue."""
        with self._lock:
            if self.rtc:
                skip = max(0, min(delay, len(original), len(processed)))
                self.original, self.queue = original[skip:].copy(), processed[skip:].copy()
            elif self.queue is None:
                self.original, self.queue = original.copy(), processed.copy()
            else:
                self.original = np.concatenate([self.original, original])[self.last_index:]
                self.queue = np.concatenate([self.queue, processed])[self.last_index:]
            self.last_index = 0


@dataclass(frozen=True)
class Request:
    """What one inference of `RealTimeChunker` starts from: the queue index when it began, the
    leftover it hands the policy (model space, `execution_horizon` rows; None for the first chunk)
    and the inference delay in control steps."""

    index: int
    prev_chunk_left_over: np.ndarray | None
    inference_delay: int


class RealTimeChunker:
    """LeRobot's RTC rollout around a `FlowPolicy` (`lerobot-rollout --inference.type=rtc`), for
    a loop of your own. The control loop calls `get()` every 1/fps s; an inference thread calls
    `infer(observation)` whenever `needs_chunk()` (the queue holds ≤ `queue_threshold` actions).

    Each inference hands the policy the queue's unconsumed model-space rows cut or zero-padded to
    `execution_horizon` rows (LeRobot pads them too, and its guidance pulls padded rows towards 0),
    re-anchored to the current state for relative-action policies, and the inference delay
    ceil(max latency so far · fps); the chunk then replaces the queue less its first
    ceil(this latency · fps) rows (the rows executed meanwhile). `rtc`: RTCConfig fields over the
    bundle's `rtc_config` and LeRobot's defaults; with `enabled` false chunks are appended and not
    guided. `clock` measures latency (seconds). Thread-safe between one inference thread and the
    control loop.
    """

    def __init__(self, policy: Any, fps: float, *, rtc: Mapping[str, Any] | None = None,
                 queue_threshold: int = 30, latency_window: int = 100,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not fps > 0:
            raise WalkforgeError(f"fps: want a number > 0, got {fps!r}")
        self.policy, self.fps, self.rtc = policy, float(fps), dict(rtc or {})
        self.settings: RTCSettings = policy.rtc_settings(self.rtc)
        self.queue_threshold = count(queue_threshold, "queue_threshold")
        self.queue = ActionQueue(self.settings.enabled)
        self.latency = LatencyTracker(latency_window)
        self.clock = clock

    def needs_chunk(self) -> bool:
        return self.queue.qsize() <= self.queue_threshold

    def get(self) -> np.ndarray | None:
        """The next action in robot units (action_dim,), or None when none is queued."""
        return self.queue.get()

    def reset(self) -> None:
        """Start of an episode: empty queue, latencies forgotten."""
        self.queue.clear()
        self.latency.reset()

    def request(self, state: np.ndarray | None = None) -> Request:
        """The leftover and delay of the next inference; `state` (the observation's raw state
        (S,)) re-anchors a relative-action policy's leftover (LeRobot's `reanchor_relative_rtc_prefix`)."""
        index, leftover = self.queue.action_index(), self.queue.left_over()
        latency = self.latency.max()
        delay = math.ceil(latency * self.fps) if latency else 0
        if leftover is not None and state is not None and relative(self.policy.processor):
            done = self.queue.processed_left_over()
            if done is not None and done.size:
                leftover = reanchored(self.policy.processor, done, state)
        if leftover is not None:
            horizon = self.settings.execution_horizon
            leftover = leftover[:horizon] if len(leftover) >= horizon else np.pad(
                leftover, ((0, horizon - len(leftover)), (0, 0)))
        return Request(index, leftover, delay)

    def merge(self, request: Request, chunk: Any, latency: float) -> None:
        """`chunk` (a `Chunk` of one observation) into the queue, `latency` seconds after `request`."""
        self.latency.add(latency)
        delay = math.ceil(latency * self.fps)
        executed = self.queue.action_index() - request.index
        if self.settings.enabled and executed != delay:
            log.info("RTC: %d actions executed during the inference, its latency says %d", executed, delay)
        dims = chunk.actions.shape[-1]
        self.queue.merge(chunk.model[..., :dims], chunk.actions, delay)

    def infer(self, observation: Mapping[str, Any], noise: Any = None) -> Any:
        """One timed inference of an unbatched observation, merged into the queue; its `Chunk`."""
        start = self.clock()
        state, _ = self.policy.processor.state(observation)
        request = self.request(state[0])
        chunk = self.policy.predict_chunk(observation, noise, inference_delay=request.inference_delay,
                                          prev_chunk_left_over=request.prev_chunk_left_over, rtc=self.rtc)
        self.merge(request, chunk, self.clock() - start)
        return chunk


def relative(processor: Any) -> bool:
    """Whether the policy predicts actions relative to the state (an `absolute_actions` step)."""
    return any(step["name"] == "absolute_actions" for step in processor.steps.post)


def reanchored(processor: Any, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Robot-unit rows (rows, action_dim) back to model space relative to `state` (S,): the
    post-processing undone, last step first (LeRobot's `reanchor_relative_rtc_prefix`: the state
    subtracted on the mask's dims, then normalised)."""
    out = np.array(actions, dtype=np.float32)
    for step in reversed(processor.steps.post):
        if step["name"] == "absolute_actions":
            mask = np.asarray(step["mask"], dtype=np.float32)
            out[..., :len(mask)] -= np.asarray(state, np.float32)[:len(mask)] * mask
        elif step["name"] == "unnormalize":
            out = normalize(out, step["mode"], processor.stats, step["key"])
    return out
