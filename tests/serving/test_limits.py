"""limits.py on its own (no server, no bundle): the msgpack pre-scan agrees with msgpack on what
is well-formed and bounds work by objects read; observation bounds from a spec, batched or not."""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest

from walkforge.errors import WalkforgeError
from walkforge.serving import protocol
from walkforge.serving.limits import Limits, as_text, check_observation, decode_frame, scan_frame

SPEC = {"cameras": ["cam_0", "cam_1"], "empty_cameras": ["cam_2"], "state": {"key": "state", "dim": 6},
        "task": {"key": "task", "max_tokens": 4}, "noise": [5, 8]}  # task: at most 4 × 64 = 256 bytes
OBS = {"cam_0": np.zeros((20, 30, 3), np.uint8), "state": np.zeros(6, np.float32), "task": "pick"}


def random_value(rng: random.Random, depth: int = 0):
    kinds = 9 if depth < 4 else 6
    kind = rng.randrange(kinds)
    if kind == 0:
        return rng.randrange(-2**63, 2**64)
    if kind == 1:
        return rng.random()
    if kind == 2:
        return rng.choice([None, True, False, rng.randrange(-32, 128)])
    if kind == 3:
        return "s" * rng.randrange(300)
    if kind == 4:
        return b"b" * rng.randrange(300)
    if kind == 5:
        return rng.randrange(-2**31, 2**31)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(20))]
    return {str(i): random_value(rng, depth + 1) for i in range(rng.randrange(20))}


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        if op == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 1 and out:
            del out[rng.randrange(len(out)):]
        else:
            out.append(rng.randrange(256))
    return bytes(out)


def test_scan_agrees_with_msgpack_on_well_formedness():
    """2000 random frames, half of them corrupted: the scan accepts exactly what msgpack decodes
    (bar ext values, which it refuses, and invalid UTF-8, which only decoding sees)."""
    rng = random.Random(32)
    for _ in range(2000):
        data = msgpack.packb(random_value(rng), use_single_float=rng.random() < 0.5)
        if rng.random() < 0.5:
            data = mutate(rng, data)
        try:
            scan_frame(data, max_objects=1 << 20, max_depth=64, max_str=1 << 20)
            scanned = None
        except WalkforgeError as exc:
            scanned = str(exc)
        try:
            msgpack.unpackb(data, strict_map_key=False)
            decoded = None
        except UnicodeDecodeError:
            continue
        except Exception as exc:  # noqa: BLE001 (whatever msgpack raises)
            decoded = repr(exc)
        if scanned is not None and "ext value" in scanned:
            continue
        assert (scanned is None) == (decoded is None), (data[:40].hex(), scanned, decoded)


@pytest.mark.parametrize("frame, says", [
    (b"\xdd" + (1 << 30).to_bytes(4, "big") + b"\x80" * 5000, "container of"),
    (b"\xdc\x10\x00" + b"\x90" * 4096, "msgpack objects"),
    (b"\x91" * 9 + b"\xc0", "deeper than 8"),
    (msgpack.packb("x" * 257), "string of 257 bytes"),
    (msgpack.packb(msgpack.ExtType(3, b"abc")), "ext value"),
    (msgpack.packb({"a": 1}) + b"\x01", "1 bytes after the message"),
    (b"\xc1", "starts no msgpack object"),
    (b"\xdb\xff\xff\xff", "ends inside"),
])
def test_decode_refuses_past_a_bound(frame, says):
    with pytest.raises(WalkforgeError, match=says):
        decode_frame(frame, SPEC, Limits())


def test_decode_takes_an_observation_and_refuses_an_oversized_frame():
    assert decode_frame(protocol.packb(OBS), SPEC, Limits())["task"] == "pick"
    with pytest.raises(WalkforgeError, match="at most 100 are taken"):
        decode_frame(protocol.packb(OBS), SPEC, Limits(max_frame_bytes=100))


@pytest.mark.parametrize("change, says", [
    ({"state": np.zeros((1, 6), np.float32)}, "no batch dim"),
    ({"state": np.zeros(7, np.float32)}, "want (6,)"),
    ({"state": np.array(["a"] * 6)}, "not a real number"),
    ({"cam_0": np.zeros((4097, 8, 3), np.uint8)}, "1 … 4096"),
    ({"cam_0": np.zeros((0, 8, 3), np.uint8)}, "1 … 4096"),
    ({"cam_0": np.zeros((8, 8, 4), np.uint8)}, "(H, W, 3) or (3, H, W)"),
    ({"cam_0": np.zeros((8, 8, 3), np.int32)}, "give uint8"),
    ({"cam_2": np.zeros((9000, 8, 3), np.uint8)}, "cam_2"),  # an empty camera is bounded too
    ({"noise": np.zeros((5, 9), np.float32)}, "noise"),
    ({"task": "x" * 257}, "longer than 256"),
    ({"task": "é" * 129}, "longer than 256"),  # 258 UTF-8 bytes
    ({"task": b"\xc3"}, "not UTF-8"),
    ({"task": 3}, "want a string"),
    ({"other": 1}, "unknown"),
])
def test_observation_bounds(change, says):
    with pytest.raises(WalkforgeError, match=says.replace("(", r"\(").replace(")", r"\)")):
        check_observation(OBS | change, SPEC, Limits())


def test_observation_within_bounds_comes_back_with_text_task():
    for task in ("x" * 256, b"pick", np.array("pick"), np.bytes_(b"pick"), np.str_("pick")):
        out = check_observation(OBS | {"task": task, "cam_1": np.zeros((3, 4096, 2), np.float32),
                                       "noise": np.zeros((5, 8), np.float32)}, SPEC, Limits())
        assert isinstance(out["task"], str) and out["task"] in ("x" * 256, "pick")


def test_batched_observations_up_to_max_batch():
    batched = {"cam_0": np.zeros((3, 8, 8, 3), np.uint8), "state": np.zeros((3, 6), np.float32),
               "task": ["a", "b", b"c"], "noise": np.zeros((3, 5, 8), np.float32)}
    assert check_observation(batched, SPEC, Limits(max_batch=4))["task"] == ["a", "b", "c"]
    with pytest.raises(WalkforgeError, match="batch of 3; at most 2"):
        check_observation(batched, SPEC, Limits(max_batch=2))
    with pytest.raises(WalkforgeError, match="2 tasks for a batch of 3"):
        check_observation(batched | {"task": ["a", "b"]}, SPEC, Limits(max_batch=4))
    with pytest.raises(WalkforgeError, match="batch of 3 wants"):
        check_observation(batched | {"cam_0": np.zeros((2, 8, 8, 3), np.uint8)}, SPEC, Limits(max_batch=4))


def test_text_and_limit_values():
    assert as_text("task", "ok", 2) == "ok"
    with pytest.raises(WalkforgeError, match="3 bytes"):
        as_text("task", b"abc", 2)
    with pytest.raises(WalkforgeError, match="must be positive"):
        Limits(max_image_side=0)
