"""Arrays from an npz file — inputs, observations, calibration data — never unpickled.

Sizes are checked before anything is inflated: the zip's member headers give each member's
uncompressed size (what the zip reader inflates at most), and each member's .npy header, read
alone, its dtype and shape. An npz over `max_bytes` inflated, a member whose shape needs more
bytes than it holds (truncated), an object (pickled) member, an empty file or one with no
arrays is refused in one line naming the file.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from walkforge.errors import WalkforgeError

NPZ_MAX_BYTES = 2 << 30
"""The most an npz read here may inflate to, all arrays together: 2 GiB."""
NPZ_MAX_MEMBERS = 4096


def read_npz(path: Path, what: str = "inputs file", max_bytes: int = NPZ_MAX_BYTES) -> dict[str, np.ndarray]:
    """The arrays of an npz, keyed by name; `what` names it in the one-line error (e.g. the flag)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise WalkforgeError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise WalkforgeError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if path.is_dir():
        raise WalkforgeError(f"{what} {path}: is a directory, not an npz")
    if size == 0:
        raise WalkforgeError(f"{what} {path}: not a readable npz (the file is empty)")
    if zipfile.is_zipfile(path):
        check_npz_sizes(path, what, max_bytes)
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise WalkforgeError(f"{what} {path}: not a readable npz ({_first_line(exc)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a lone .npy array
        raise WalkforgeError(f"{what} {path}: not a readable npz (one .npy array, not named arrays)")
    try:
        with data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # a damaged member
        raise WalkforgeError(f"{what} {path}: not a readable npz ({_first_line(exc)})") from None
    if not arrays:
        raise WalkforgeError(f"{what} {path}: the npz holds no arrays")
    return arrays


def check_npz_sizes(path: Path, what: str = "inputs file", max_bytes: int = NPZ_MAX_BYTES) -> int:
    """Refuse the npz at `path` before inflating it (module doc); returns the bytes it inflates to."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > NPZ_MAX_MEMBERS:
                raise WalkforgeError(f"{what} {path}: {len(members)} members, over the {NPZ_MAX_MEMBERS} "
                                     "an npz may hold")
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                raise WalkforgeError(f"{what} {path}: inflates to {total} bytes, over the {max_bytes} "
                                     f"({max_bytes / 2**30:g} GiB) allowed; refused before inflating it")
            for member in members:
                _check_member(archive, member, f"{what} {path}")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise WalkforgeError(f"{what} {path}: not a readable npz ({_first_line(exc)})") from None
    return total


def _check_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, where: str) -> None:
    """One member's .npy header against its size: dtype and shape only, its data not inflated."""
    name = member.filename.removesuffix(".npy")
    with archive.open(member) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        except (ValueError, EOFError) as exc:
            raise WalkforgeError(f"{where}: member {name!r} is not a .npy array "
                                 f"({_first_line(exc)})") from None
        header = fh.tell()
    if dtype.hasobject:
        raise WalkforgeError(f"{where}: member {name!r} holds Python objects (pickled), which are not read")
    need = math.prod(shape) * dtype.itemsize
    if header + need > member.file_size:
        raise WalkforgeError(f"{where}: member {name!r} of shape {list(shape)} {dtype} needs {need} bytes, "
                             f"it holds {member.file_size - header} (truncated)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
