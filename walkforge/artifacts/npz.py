"""Arrays from an npz file — inputs, observations, calibration data — never unpickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from walkforge.errors import WalkforgeError


def read_npz(path: Path, what: str = "inputs file") -> dict[str, np.ndarray]:
    """The arrays of an npz, keyed by name; `what` names it in the one-line error (e.g. the flag)."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise WalkforgeError(f"{what} not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise WalkforgeError(f"{what} {path}: not a readable npz ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a lone .npy array
        raise WalkforgeError(f"{what} {path}: not a readable npz (one .npy array, not named arrays)")
    try:
        with data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:  # a member object array, or a damaged member
        raise WalkforgeError(f"{what} {path}: not a readable npz ({exc})") from None
