"""Bounds on one observation, checked before any work is done on it (issue #32).

Small pure functions (no server state), so the server and, later, the command line share them:

- `scan_frame`: walks a msgpack frame's structure WITHOUT building it and refuses one with more
  than `max_objects` msgpack objects, deeper than `max_depth`, a string longer than the longest
  this bundle takes, an ext type, a container claiming more items than the frame can hold, or
  trailing bytes. A frame of 64 MB of empty maps is refused after reading a few bytes.
- `decode_frame`: size check, `scan_frame`, then openpi's msgpack-numpy decode (protocol.py) with
  msgpack's own `max_*_len` bounds as a second fence.
- `check_observation`: each value against the bundle's observation spec
  (`policy.observation_spec()`): cameras are (H, W, 3) or (3, H, W) uint8/float frames of at most
  `max_image_side` per side (any size up to that is resized by the processor, so it is a bound,
  not an equality); the state exactly (state dim,); noise exactly the spec's noise shape; the
  task a str of at most `max_tokens × task_bytes_per_token` UTF-8 bytes (bytes and numpy string
  values are decoded as UTF-8 or refused); no unknown key. An observation is unbatched unless
  `max_batch` > 0 allows a leading batch dim of at most that many (the server takes one robot's
  observation per frame: `max_batch` 0).
- `check_rtc`: the real-time chunking keys a request may carry beside its observation
  (`executed`, `inference_delay`, `prev_chunk_left_over`, `rtc`; docs/serving.md), each bounded
  by the bundle's chunk size and max_action_dim; the `rtc` map is checked as LeRobot's RTCConfig.

Every refusal is a `WalkforgeError` with a one-line message naming the key and the bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError, did_you_mean
from walkforge.serving import protocol

MAX_FRAME_BYTES = 64 << 20  # one observation frame: a few full-size camera frames fit many times over
MAX_IMAGE_SIDE = 4096  # a camera frame's height and width (any size up to it is resized)
TASK_BYTES_PER_TOKEN = 64  # task bytes allowed per prompt token: far more text than a prompt holds
MAX_OBJECTS = 1024  # msgpack objects in one frame (an observation has a few dozen)
MAX_DEPTH = 8  # msgpack nesting (an observation: map → array map → shape list, depth 3)
MIN_STRING = 256  # the longest str any frame may hold is at least this (keys, dtype tags)
CHANNELS = 3
NOISE = "noise"
RTC_KEYS = ("executed", "inference_delay", "prev_chunk_left_over", "rtc")
"""Real-time chunking keys a request may carry beside its observation (docs/serving.md)."""
MAX_RTC_FIELDS = 8  # entries of the `rtc` map (LeRobot's RTCConfig has 6 fields)


@dataclass(frozen=True)
class Limits:
    """What one observation frame may hold (module doc); the defaults are `walkforge serve`'s."""

    max_frame_bytes: int = MAX_FRAME_BYTES
    max_image_side: int = MAX_IMAGE_SIDE
    task_bytes_per_token: int = TASK_BYTES_PER_TOKEN
    max_objects: int = MAX_OBJECTS
    max_depth: int = MAX_DEPTH
    max_batch: int = 0  # 0: unbatched only; N: a leading batch dim of at most N

    def __post_init__(self) -> None:
        small = [f"{k} {v}" for k, v in vars(self).items() if v < (0 if k == "max_batch" else 1)]
        if small:
            raise WalkforgeError(f"limits must be positive: {', '.join(small)}")


def task_max_bytes(spec: Mapping[str, Any], limits: Limits) -> int:
    """The longest task (UTF-8 bytes) this bundle takes: its prompt's max_tokens × bytes per token."""
    return int(spec["task"]["max_tokens"]) * limits.task_bytes_per_token


def max_string(spec: Mapping[str, Any], limits: Limits) -> int:
    """The longest msgpack str a frame may hold (the task is the only long one)."""
    return max(task_max_bytes(spec, limits), MIN_STRING)


# --- msgpack structure, before decoding --------------------------------------------------------

# first byte → (kind, width of the length/value that follows); fix* types are handled inline
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
          0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}
_BIN = {0xc4: 1, 0xc5: 2, 0xc6: 4}
_STR = {0xd9: 1, 0xda: 2, 0xdb: 4}
_ARRAY = {0xdc: 2, 0xdd: 4}
_MAP = {0xde: 2, 0xdf: 4}
_EXT = {0xc7, 0xc8, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8}


def _malformed(why: str) -> WalkforgeError:
    return WalkforgeError(f"not a msgpack-numpy message: {why}")


def scan_frame(data: bytes, max_objects: int = MAX_OBJECTS, max_depth: int = MAX_DEPTH,
               max_str: int = MIN_STRING) -> int:
    """Walk `data`'s msgpack structure without building it; return its object count or refuse it
    (module doc). Work is O(objects read), at most `max_objects`, whatever the frame's size."""
    size, pos, objects = len(data), 0, 0
    todo = [1]  # items still to read in each open container (the frame is one object)

    def length(width: int) -> int:
        nonlocal pos
        if pos + width > size:
            raise _malformed("frame ends inside a length")
        value = int.from_bytes(data[pos:pos + width], "big")
        pos += width
        return value

    while todo:
        if todo[-1] == 0:
            todo.pop()
            continue
        todo[-1] -= 1
        if pos >= size:
            raise _malformed(f"frame ends after {size} bytes, inside a container")
        first = data[pos]
        pos += 1
        objects += 1
        if objects > max_objects:
            raise WalkforgeError(f"frame holds more than {max_objects} msgpack objects; an observation "
                                 "has a few dozen")
        items = None
        if first <= 0x7f or first >= 0xe0 or first in _FIXED:  # ints, nil, bool, floats
            pos += _FIXED.get(first, 0)
        elif 0x80 <= first <= 0x8f:
            items = 2 * (first & 0x0f)
        elif 0x90 <= first <= 0x9f:
            items = first & 0x0f
        elif first in _MAP:
            items = 2 * length(_MAP[first])
        elif first in _ARRAY:
            items = length(_ARRAY[first])
        elif 0xa0 <= first <= 0xbf or first in _STR:
            n = first & 0x1f if first <= 0xbf else length(_STR[first])
            if n > max_str:
                raise WalkforgeError(f"frame holds a string of {n} bytes; at most {max_str} are taken "
                                     "(the task's bound: max_tokens × bytes per token)")
            pos += n
        elif first in _BIN:
            n = length(_BIN[first])  # (not `pos += length(…)`: length moves pos)
            pos += n
        elif first in _EXT:
            raise WalkforgeError("frame holds a msgpack ext value; observations are maps of "
                                 "msgpack-numpy arrays and strings")
        else:  # 0xc1: never used
            raise _malformed(f"byte 0x{first:02x} at offset {pos - 1} starts no msgpack object")
        if pos > size:
            raise _malformed(f"frame ends inside a value ({size} bytes)")
        if items is not None:
            if items > size - pos:  # each item is at least one byte
                raise WalkforgeError(f"frame holds a container of {items} items in {size - pos} bytes")
            if items > max_objects - objects:
                raise WalkforgeError(f"frame holds more than {max_objects} msgpack objects; an "
                                     "observation has a few dozen")
            if len(todo) > max_depth:
                raise WalkforgeError(f"frame nests deeper than {max_depth} levels")
            todo.append(items)
    if pos != size:
        raise _malformed(f"{size - pos} bytes after the message")
    return objects


def decode_frame(data: bytes, spec: Mapping[str, Any], limits: Limits) -> Any:
    """One observation frame → its decoded value, refused (WalkforgeError) past any bound."""
    if len(data) > limits.max_frame_bytes:
        raise WalkforgeError(f"frame of {len(data)} bytes; at most {limits.max_frame_bytes} are taken")
    longest = max_string(spec, limits)
    scan_frame(data, limits.max_objects, limits.max_depth, longest)
    return protocol.unpackb(data, max_str_len=longest, max_array_len=limits.max_objects,
                            max_map_len=limits.max_objects, max_ext_len=0)


# --- values, against the bundle's observation spec ---------------------------------------------

def _shape(value: np.ndarray) -> str:
    return str(list(value.shape))


def _array(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, (np.ndarray, np.generic)):
        raise WalkforgeError(f"'{name}': want a numpy array, got {type(value).__name__}")
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
        raise WalkforgeError(f"'{name}': dtype {value.dtype} is not a real number type")
    return value


def _batch_of(name: str, value: np.ndarray, core: int, limits: Limits) -> int | None:
    """None for an unbatched value of `core` dims; B for a batched one (core + 1 dims)."""
    if value.ndim == core + 1 and limits.max_batch > 0:
        batch = value.shape[0]
        if not 1 <= batch <= limits.max_batch:
            raise WalkforgeError(f"'{name}': batch of {batch}; at most {limits.max_batch} per observation")
        return batch
    return None


def _unbatched_only(name: str, value: np.ndarray, want: str, limits: Limits) -> WalkforgeError:
    more = (f" or with a leading batch dim of at most {limits.max_batch}" if limits.max_batch
            else "; one observation per frame, no batch dim")
    return WalkforgeError(f"'{name}': shape {_shape(value)}; want {want}{more}")


def check_state(name: str, value: Any, dim: int, limits: Limits) -> int | None:
    """The state is exactly (dim,) (or (B, dim)); returns B or None."""
    state = _array(name, value)
    batch = _batch_of(name, state, 1, limits)
    if state.shape[-1:] != (dim,) or state.ndim != (1 if batch is None else 2):
        raise _unbatched_only(name, state, f"({dim},)", limits)
    return batch


def check_noise(value: Any, shape: tuple[int, ...], batch: int | None, limits: Limits) -> None:
    noise = _array(NOISE, value)
    want = shape if batch is None else (batch, *shape)
    if noise.shape != want:
        raise WalkforgeError(f"'{NOISE}': shape {_shape(noise)}; want {list(want)} "
                             "(chunk_size, max_action_dim" + (" after the batch dim)" if batch else ")"))


def check_camera(name: str, value: Any, batch: int | None, limits: Limits) -> None:
    """(H, W, 3) or (3, H, W) (after the batch dim), 1 ≤ H, W ≤ max_image_side, uint8 or float."""
    frame = _array(name, value)
    core = frame.shape if batch is None else frame.shape[1:]
    if batch is not None and (frame.ndim != 4 or frame.shape[0] != batch):
        raise WalkforgeError(f"'{name}': shape {_shape(frame)}; this observation's batch of {batch} "
                             f"wants ({batch}, H, W, 3) or ({batch}, 3, H, W)")
    if len(core) != 3 or CHANNELS not in (core[0], core[-1]):
        raise _unbatched_only(name, frame, "(H, W, 3) or (3, H, W)", limits)
    sides = core[:2] if core[-1] == CHANNELS else core[1:]
    if not all(1 <= s <= limits.max_image_side for s in sides):
        raise WalkforgeError(f"'{name}': frame of {sides[0]} × {sides[1]} pixels; each side must be "
                             f"1 … {limits.max_image_side} (frames are resized to the model's size)")
    if frame.dtype != np.uint8 and frame.dtype.kind != "f":
        raise WalkforgeError(f"'{name}': dtype {frame.dtype}; give uint8 (0..255) or float in [0, 1]")


def as_text(name: str, value: Any, max_bytes: int) -> str:
    """A str of at most `max_bytes` UTF-8 bytes from a str, bytes, or numpy string scalar/0-d array;
    the length is checked before anything is decoded or encoded."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "US":
        value = value.item()
    if isinstance(value, (bytes, bytearray)):
        if len(value) > max_bytes:
            raise WalkforgeError(f"'{name}': {len(value)} bytes; at most {max_bytes} (max_tokens × "
                                 "bytes per token)")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WalkforgeError(f"'{name}': bytes are not UTF-8 ({exc.reason} at {exc.start})") from None
    if not isinstance(value, str):
        raise WalkforgeError(f"'{name}': want a string (the instruction text), got {type(value).__name__}")
    if len(value) > max_bytes or len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise WalkforgeError(f"'{name}': longer than {max_bytes} UTF-8 bytes (max_tokens × bytes per "
                             "token); the prompt would be cut long before")
    return str(value)


def check_task(name: str, value: Any, batch: int | None, max_bytes: int) -> str | list[str]:
    if batch is not None and isinstance(value, (list, tuple, np.ndarray)) and not (
            isinstance(value, np.ndarray) and value.ndim == 0):
        if len(value) != batch:
            raise WalkforgeError(f"'{name}': {len(value)} tasks for a batch of {batch}")
        return [as_text(name, v, max_bytes) for v in value]
    return as_text(name, value, max_bytes)


def check_observation(observation: Mapping[str, Any], spec: Mapping[str, Any], limits: Limits
                      ) -> dict[str, Any]:
    """The observation (keyed by bundle names, `noise` included) with every value within the
    bundle's bounds (module doc); the task comes back as str. Cheap: it reads shapes, dtypes and
    the task's length, never pixel values."""
    cameras = [*spec["cameras"], *spec.get("empty_cameras", [])]
    state_key, task_key = spec["state"]["key"], spec["task"]["key"]
    known = [*cameras, state_key, task_key, NOISE]
    for key in observation:
        if key not in known:
            raise WalkforgeError(f"observation key '{key}' unknown{did_you_mean(str(key), known)}; "
                                 "this policy takes "
                                 f"{', '.join(k for k in known if k not in spec.get('empty_cameras', []))}")
    if state_key not in observation:
        raise WalkforgeError(f"observation lacks '{state_key}' ({spec['state']['dim']} values)")
    if task_key not in observation:
        raise WalkforgeError(f"observation lacks '{task_key}' (the instruction text)")
    out = dict(observation)
    batch = check_state(state_key, observation[state_key], int(spec["state"]["dim"]), limits)
    for key in cameras:
        if key in observation:
            check_camera(key, observation[key], batch, limits)
    if NOISE in observation:
        check_noise(observation[NOISE], tuple(spec["noise"]), batch, limits)
    out[task_key] = check_task(task_key, observation[task_key], batch, task_max_bytes(spec, limits))
    return out


# --- real-time chunking keys -------------------------------------------------------------------

def _steps(name: str, value: Any, most: int) -> int:
    """An int 0 … `most` (numpy integers too, never a bool or a float)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value <= most:
        raise WalkforgeError(f"'{name}': want an integer 0 … {most} (the chunk size), got {str(value)[:40]}")
    return int(value)


def check_rtc(given: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """A request's RTC keys (those of RTC_KEYS it has), checked against the bundle's chunk size and
    max_action_dim; None when it has none. `executed` and `prev_chunk_left_over` exclude each
    other (both say where the leftover comes from). Cheap: reads shapes and a few scalars."""
    if not given:
        return None
    chunk, dims = (int(n) for n in spec["noise"])  # (chunk_size, max_action_dim)
    out: dict[str, Any] = {}
    if "executed" in given and "prev_chunk_left_over" in given:
        raise WalkforgeError("give either 'executed' (the server cuts the leftover from this connection's "
                             "last chunk) or 'prev_chunk_left_over', not both")
    for key in ("executed", "inference_delay"):
        if key in given:
            out[key] = _steps(key, given[key], chunk)
    if "prev_chunk_left_over" in given:
        from walkforge.runtimes.rtc import leftover_rows

        value = _array("prev_chunk_left_over", given["prev_chunk_left_over"])
        out["prev_chunk_left_over"] = leftover_rows(value, chunk, dims, None)
    if "rtc" in given:
        from walkforge.runtimes.rtc import rtc_settings

        fields = given["rtc"]
        if not isinstance(fields, dict) or len(fields) > MAX_RTC_FIELDS \
                or not all(isinstance(k, str) for k in fields):
            raise WalkforgeError(f"'rtc': want a map of at most {MAX_RTC_FIELDS} RTCConfig fields "
                                 "(string keys)")
        rtc_settings(fields)  # unknown fields and bad values: one line
        out["rtc"] = dict(fields)
    return out
