"""What the server checks in an observation before it joins a batch, and openpi-style key maps.

The policy's processor checks everything about one observation (runtimes/processors/); the server
checks first what must never reach a batch or what the processor allows but a server must not:
the frame is within the bounds of limits.py (checked while decoding and before any value is
read), it is a map of string keys, keys are mapped (`--obs-map`), at least one camera the bundle
reads is present (a missing one is masked, as LeRobot and `predict_action_chunk` mask it), every
value has the shape the bundle's spec bounds (limits.check_observation), `noise` is split off,
and no number is NaN or inf. A request the policy then refuses is answered alone
(batcher.py), so a bad request never costs another one its answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.serving.limits import NOISE, RTC_KEYS, Limits, check_observation, check_rtc, decode_frame


def load_obs_map(path: Path | None, spec: Mapping[str, Any]) -> dict[str, str]:
    """The `--obs-map` JSON file: {"client key": "bundle key", …}; every target must be a key the
    bundle takes (a camera, the state key, "task" or "noise")."""
    if path is None:
        return {}
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WalkforgeError(f"--obs-map {path}: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in mapping.items()):
        raise WalkforgeError(f"--obs-map {path}: want a JSON object of string → string")
    known = accepted_keys(spec)
    bad = [v for v in mapping.values() if v not in known]
    if bad:
        raise WalkforgeError(f"--obs-map {path}: '{bad[0]}' is not a key this bundle takes; "
                             f"it takes {', '.join(known)}")
    return mapping


def accepted_keys(spec: Mapping[str, Any]) -> list[str]:
    return [*spec["cameras"], spec["state"]["key"], spec["task"]["key"], NOISE]


def parse_request(frame: bytes, spec: Mapping[str, Any], obs_map: Mapping[str, str], limits: Limits
                  ) -> tuple[dict[str, Any], np.ndarray | None]:
    """One binary frame → (observation, noise), every bound checked first (limits.py). Bounded
    work whatever the frame holds; the server runs it off the event loop."""
    return split_request(decode_frame(frame, spec, limits), spec, obs_map, limits)


def parse_rtc_request(frame: bytes, spec: Mapping[str, Any], obs_map: Mapping[str, str], limits: Limits
                      ) -> tuple[dict[str, Any], np.ndarray | None, dict[str, Any] | None]:
    """`parse_request` that also takes the real-time chunking keys beside the observation
    (limits.RTC_KEYS, checked by limits.check_rtc): (observation, noise, RTC keys or None)."""
    message = decode_frame(frame, spec, limits)
    rtc = None
    if isinstance(message, dict):
        message = dict(message)
        rtc = check_rtc({k: message.pop(k) for k in RTC_KEYS if k in message}, spec)
    observation, noise = split_request(message, spec, obs_map, limits)
    return observation, noise, rtc


def split_request(message: Any, spec: Mapping[str, Any], obs_map: Mapping[str, str],
                  limits: Limits | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
    """(observation keyed by bundle names, its noise or None) from one decoded frame."""
    if not isinstance(message, dict):
        raise WalkforgeError(f"an observation must be a msgpack map, got {type(message).__name__}")
    observation: dict[str, Any] = {}
    for key, value in message.items():
        if not isinstance(key, str):
            raise WalkforgeError(f"observation keys must be strings, got {type(key).__name__} {key!r:.40}")
        name = obs_map.get(key, key)
        if name in observation:
            raise WalkforgeError(f"observation gives '{name}' twice (as '{key}' too)")
        observation[name] = value
    if not any(c in observation for c in spec["cameras"]):  # a missing one is masked, as in LeRobot
        raise WalkforgeError(f"observation has none of this policy's cameras ({', '.join(spec['cameras'])}): "
                             "give at least one")
    observation = check_observation(observation, spec, limits or Limits())  # shapes before values
    for name, value in observation.items():
        _check_value(name, value)
    noise = observation.pop(NOISE, None)
    return observation, noise


def _check_value(name: str, value: Any) -> None:
    """Arrays are real numbers or bool, finite; everything else is a string (the task)."""
    if isinstance(value, str):
        return
    if not isinstance(value, (np.ndarray, np.generic)):
        raise WalkforgeError(f"'{name}': want a numpy array or a string, got {type(value).__name__}")
    kind = value.dtype.kind
    if kind not in "biuf":
        raise WalkforgeError(f"'{name}': dtype {value.dtype} is not a real number type")
    if kind == "f" and not np.isfinite(value).all():
        raise WalkforgeError(f"'{name}': has NaN or inf values")
