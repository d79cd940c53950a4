"""Bundle stamps: a file hashed once is trusted while its metadata is unchanged.

Per user and outside the bundle (which may be read-only): one JSON file per bundle location and
manifest digest in the cache dir, written atomically. `artifacts.bundle.verify_files` reads and
writes them; what a stamp does and does not catch is STAMP_FIELDS' docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import suppress
from pathlib import Path

log = logging.getLogger(__name__)

STAMP_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
"""What a stamp records per file. Any write, truncation, `touch`, `os.utime` (which sets ctime to
now: ctime cannot be set back), replacement by another file (a new inode) or copy (a new inode,
and a new location, hence another stamp file) changes it, and the file is hashed again. A change
that bypasses the file's metadata (bit rot, a write to the raw device, a filesystem restored
from a snapshot with its ctimes) does not: `walkforge verify --integrity` re-hashes on demand."""
STAMP_VERSION = 1
RACY_NS = 2_000_000_000
"""Files modified (mtime) less than this before their check get no stamp: a filesystem's timestamps
are coarse (a kernel tick), so a file rewritten within the tick it was stamped in could keep its
mtime and ctime (git's "racy clean" problem). A file with an older mtime cannot be rewritten
without moving it. Fresh files are hashed again at the next load, once they are older."""
CACHE_ENV = "WALKFORGE_CACHE_DIR"


def stamp_dir() -> Path:
    """Where stamps live: $WALKFORGE_CACHE_DIR/stamps, else $XDG_CACHE_HOME/walkforge/stamps, else
    ~/.cache/walkforge/stamps. Per user and outside the bundle, which may be read-only."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "stamps"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "walkforge" / "stamps"


def file_stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [getattr(st, name) for name in STAMP_FIELDS]


def stamp_path(root: Path, digest: str) -> Path:
    """The stamp file of the bundle at `root` with manifest `digest`: keyed by both, so another
    manifest, or the same bundle at another path, starts unstamped."""
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return stamp_dir() / f"{digest}-{where}.json"


def read_stamps(root: Path, digest: str) -> dict[str, list[int]]:
    """The stamps recorded for this bundle ({} when none, or unreadable: then everything is hashed)."""
    try:
        data = json.loads(stamp_path(root, digest).read_text())
        if (data.get("version") == STAMP_VERSION and data.get("digest") == digest
                and data.get("root") == str(Path(root).resolve()) and isinstance(data.get("files"), dict)):
            return data["files"]
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def write_stamps(root: Path, digest: str, seen: dict[str, list[int]]) -> None:
    """Record the files just checked (all of them passed), less the racy ones (RACY_NS); written
    atomically (a temporary file renamed over the old stamps). A cache that cannot be written
    only costs the next load its hashing."""
    now = time.time_ns()
    files = {rel: stamp for rel, stamp in seen.items() if now - stamp[1] >= RACY_NS}
    path = stamp_path(root, digest)
    data = {"version": STAMP_VERSION, "digest": digest, "root": str(Path(root).resolve()), "files": files}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot write bundle stamps %s: %s", path, exc)
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
