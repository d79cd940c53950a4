"""Disk space for a bundle write: refuse early when it cannot fit, explain when the disk fills.

`check_free_space` runs before the weights are written: a bundle holds the weights about
BUNDLE_SIZE_FACTOR times (the safetensors reference copy, every walk's ONNX external data, an
fp8 or TensorRT copy beside them), so a compile refuses up front instead of filling the disk an
hour in. Where the disk fills anyway (another writer took the space), `disk_full_reason` turns
the writer's error — an OSError, or safetensors' and onnx's own wrappers of it — into one line
naming the file being written and the space the bundle needs.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from walkforge.errors import WalkforgeError

BUNDLE_SIZE_FACTOR = 2.0
"""Expected bundle bytes per weight byte: the safetensors reference copy (1×) + ONNX external data (1×)."""
BUNDLE_SLACK_BYTES = 64 << 20  # graphs, kernels, calibration, manifest
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def expected_bytes(weight_bytes: int) -> int:
    """The space a bundle of `weight_bytes` of weights is expected to take."""
    return int(weight_bytes * BUNDLE_SIZE_FACTOR) + BUNDLE_SLACK_BYTES


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path`."""
    return shutil.disk_usage(path).free


def check_free_space(stage: Path, out: Path, need: int) -> int:
    """Refuse when the filesystem of `stage` (beside `out`) has less than `need` bytes free;
    return the free bytes."""
    free = free_bytes(stage)
    if free < need:
        raise WalkforgeError(f"not enough space for {out}: the bundle needs about {gb(need)}, "
                             f"{gb(free)} free there (free some space or choose another -o)")
    return free


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write that ran out of space (ENOSPC / EDQUOT), however it is wrapped."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in DISK_FULL_TEXTS)


def disk_full_reason(exc: BaseException, stage: Path, out: Path, need: int | None) -> str:
    """One line for a write into `stage` that ran out of space: the file, and the space needed
    (`need`: the bundle's expected bytes, None where not known yet)."""
    name = getattr(exc, "filename", None) or newest_file(stage)
    where = Path(name).relative_to(stage).as_posix() if name and Path(name).is_relative_to(stage) else name
    needs = f"the bundle needs about {gb(need)} in all" if need else "free some space"
    return f"no space left on the device writing {where or 'the bundle'} for {out}: {needs}"


def newest_file(root: Path) -> str | None:
    """The most recently modified file under `root`: the one a failed write was writing."""
    newest, when = None, -1
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                mtime = os.lstat(path).st_mtime_ns
            except FileNotFoundError:
                continue
            if mtime > when:
                newest, when = path, mtime
    return newest


def gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
