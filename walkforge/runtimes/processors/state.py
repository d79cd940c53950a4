"""State and action vectors: LeRobot's normalisation modes, zero padding, pi0.5's state bins.

Formulas (docs/model_facts.md, "LeRobot policy folders and processing"), computed in float32 as
LeRobot does (so pi0.5's bins land on the same side of every edge), no clipping:
  MEAN_STD   y = (x − mean) / (std + 1e-8)          x = y · std + mean
  MIN_MAX    y = 2 (x − min) / (max − min) − 1      x = (y + 1)(max − min) / 2 + min
  QUANTILES  y = 2 (x − q01) / (q99 − q01) − 1      x = (y + 1)(q99 − q01) / 2 + q01
  IDENTITY   y = x
A zero range (max = min) is replaced by 1e-8, as LeRobot's normaliser does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from walkforge.errors import WalkforgeError

EPS = np.float32(1e-8)  # LeRobot's normaliser eps: added to std, stands in for a zero range
STATS = {"IDENTITY": (), "MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99")}
STATE_BINS = 256  # pi0.5 writes the state as one of 256 bins per dim


def _pair(stats: Mapping[str, np.ndarray], key: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if mode not in STATS:
        raise WalkforgeError(f"normalisation mode '{mode}' unknown; one of {', '.join(STATS)}")
    names = [f"{key}.{s}" for s in STATS[mode]]
    missing = [n for n in names if n not in stats]
    if missing:
        raise WalkforgeError(f"{key} is normalised with {mode} but the bundle's stats lack "
                             f"{', '.join(missing)}")
    return tuple(np.asarray(stats[n], dtype=np.float32) for n in names)  # type: ignore[return-value]


def _range(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    span = high - low
    return np.where(span == 0, EPS, span).astype(np.float32)


def normalize(x: np.ndarray, mode: str, stats: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """x (…, d) in robot units → normalised float32, by `mode` with `stats[f"{key}.<stat>"]`."""
    x = np.asarray(x, dtype=np.float32)
    if mode == "IDENTITY":
        return x
    a, b = _pair(stats, key, mode)
    if mode == "MEAN_STD":
        return (x - a) / (b + EPS)
    return np.float32(2.0) * (x - a) / _range(a, b) - np.float32(1.0)


def unnormalize(y: np.ndarray, mode: str, stats: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """The inverse of `normalize`: normalised (…, d) → robot units, float32."""
    y = np.asarray(y, dtype=np.float32)
    if mode == "IDENTITY":
        return y
    a, b = _pair(stats, key, mode)
    if mode == "MEAN_STD":
        return y * b + a
    return (y + np.float32(1.0)) * _range(a, b) / np.float32(2.0) + a


def pad_to(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to `dim` (after normalising: padded dims read 0 normalised)."""
    if x.shape[-1] > dim:
        raise WalkforgeError(f"vector of {x.shape[-1]} values is longer than the compiled {dim}")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])])


def state_bins(state: np.ndarray) -> np.ndarray:
    """pi0.5's discretised state: digitize(s, linspace(−1, 1, 257)[:-1]) − 1, int64 in [−1, 255]
    (0 → 128; values below −1 give −1, above 1 give 255)."""
    edges = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]
    return np.digitize(state, bins=edges) - 1
