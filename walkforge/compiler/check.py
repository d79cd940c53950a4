"""Compare an engine's outputs with the torch module they were traced from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    """How closely `got` matches `want`: max abs error, error relative to scale, cosine."""

    max_abs: float
    rel: float
    cosine: float

    def to_json(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "rel": self.rel, "cosine": self.cosine}


def agreement(got: np.ndarray, want: np.ndarray) -> Agreement:
    a = np.asarray(got, dtype=np.float64).ravel()
    b = np.asarray(want, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {np.shape(got)} vs {np.shape(want)}")
    if a.size == 0:
        return Agreement(0.0, 0.0, 1.0)
    max_abs = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    rel = max_abs / scale if scale > 0 else max_abs
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    return Agreement(max_abs, rel, cosine)


def worst(results: list[Agreement]) -> Agreement:
    return Agreement(
        max(r.max_abs for r in results), max(r.rel for r in results), min(r.cosine for r in results)
    )
