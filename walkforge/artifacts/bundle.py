"""The bundle reader: a directory with `manifest.json` at its root, opened and checked.

The reader refuses foreign bundles, unknown format versions, any path the manifest names that is
not inside the bundle (artifacts/paths.py), a manifest the runtime cannot read (artifacts/schema.py,
artifacts/manifest.py), a file present but not listed or listed but absent, and any file whose size
or sha256 differs from the manifest, naming the file. Each file is hashed once; later opens trust
a per-user stamp of its size, times and inode (artifacts/stamps.py) and hash only what changed.
An older format is read through `manifest.upgrade`, so `Bundle.manifest` is always current.

A bundle's digest is the sha256 of its manifest bytes, which hold every other file's sha256: pin it
(`Bundle.open(root, digest=...)`, `check_digest`) to load only the bundle that was tested. It is
not a signature: whoever can write the bundle can write a manifest to match. The manifest is read
once (at most MANIFEST_MAX_BYTES, checked by stat first): its digest and its file table come from
the same bytes, so the table a pinned bundle checks files against is the tested one.

After the load: a file read later (the policy's stats and tokenizer, BAGEL's tokenizer) is read
with `Bundle.read_verified`, whose bytes are the ones hashed against that table; and since an
engine may map its files rather than copy them (onnxruntime maps an ONNX graph's external data),
`Bundle.check_unchanged` re-stats every file against what `open` verified, to run after a request
and before its answer is handed out.

The writer is artifacts/staged_write.py (`staged_bundle`) and artifacts/manifest.py
(`write_manifest`); both are re-exported here, where older code imports them from.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from walkforge.artifacts.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    READABLE_VERSIONS,
    Manifest,
    as_manifest,
    bundle_kind,
    file_table,
    has_reference_weights,
    sha256_file,
    upgrade,
    write_manifest,
)
from walkforge.artifacts.paths import check_listed_exactly, check_paths, inside
from walkforge.artifacts.schema import Malformed, check_schema
from walkforge.artifacts.staged_write import interrupted_replacement, staged_bundle
from walkforge.artifacts.stamps import STAMP_FIELDS, file_stamp, read_stamps, write_stamps
from walkforge.errors import WalkforgeError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MANIFEST_MAX_BYTES", "Bundle", "bundle_kind",
           "check_digest", "enclosing_bundle", "file_table", "has_reference_weights", "manifest_digest",
           "normal_digest", "read_manifest", "read_typed_manifest", "require_reference_weights",
           "sha256_file", "staged_bundle", "verify_files", "write_manifest"]


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest in the current format (an older one upgraded: manifest.upgrade); no file hashing."""
    raw = _read_manifest(Path(root))[0]
    return _upgraded(raw, Path(root) / MANIFEST)


def read_typed_manifest(root: Path | str) -> Manifest:
    """`read_manifest` as artifacts/manifest.py's types (another bundle's, read without hashing)."""
    return _typed(read_manifest(Path(root)), Path(root) / MANIFEST)


def manifest_digest(root: Path | str) -> str:
    """The bundle's digest: sha256 of its manifest bytes (hex)."""
    return _read_manifest(Path(root))[1]


MANIFEST_MAX_BYTES = 16 << 20
"""The largest manifest.json read (16 MiB; a compiled one is tens of kB), checked by stat before
reading: a bigger one is refused rather than parsed."""
MANIFEST_MAX_DEPTH = 64
"""The deepest nesting of lists and objects a manifest may have (a compiled one: under 10)."""


def _read_manifest(root: Path) -> tuple[dict[str, Any], str]:
    """(manifest as stored, digest) from one read of the manifest's bytes."""
    if not root.exists():
        previous = interrupted_replacement(root)
        raise WalkforgeError(f"bundle not found: {root}" + (
            "" if previous is None else f" (a `--force` replacement of it was interrupted; the old bundle "
            f"is at {previous}, and the next compile or build to {root} puts it back)"))
    if not root.is_dir():
        raise WalkforgeError(f"{root} is not a bundle directory")
    path = root / MANIFEST
    if not path.is_file():
        raise WalkforgeError(f"{root} is not a walkforge bundle: no {MANIFEST}")
    try:
        if path.stat().st_size > MANIFEST_MAX_BYTES:
            raise WalkforgeError(f"{path}: the manifest is {path.stat().st_size} bytes, over the "
                                 f"{MANIFEST_MAX_BYTES >> 20} MiB a manifest may be; refused")
        with open(path, "rb") as fh:
            data = fh.read(MANIFEST_MAX_BYTES + 1)
        if len(data) > MANIFEST_MAX_BYTES:  # grew since the stat
            raise WalkforgeError(f"{path}: the manifest is over the {MANIFEST_MAX_BYTES >> 20} MiB a "
                                 "manifest may be; refused")
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WalkforgeError(f"{path}: corrupt manifest ({exc})") from None
    except OSError as exc:
        raise WalkforgeError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WalkforgeError(f"{path}: not a walkforge bundle manifest (foreign format)")
    if _nested_deeper(manifest, MANIFEST_MAX_DEPTH):
        raise WalkforgeError(f"{path}: malformed manifest: nested deeper than {MANIFEST_MAX_DEPTH} levels")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise WalkforgeError(f"{path}: bundle format version {version!r}, this walkforge reads version "
                             f"{FORMAT_VERSION} (and older: {', '.join(map(str, READABLE_VERSIONS[:-1]))})")
    return manifest, hashlib.sha256(data).hexdigest()


def enclosing_bundle(path: Path | str) -> Path | None:
    """The bundle that writing `path` would put a file into: the nearest folder above `path`
    (symlinks followed) holding a walkforge manifest.json; None if there is none. A bundle lists
    exactly its files, so a file written inside one makes every later load refuse it."""
    folder = Path(os.path.realpath(os.path.abspath(path))).parent
    for candidate in (folder, *folder.parents):
        manifest = candidate / MANIFEST
        try:
            if not manifest.is_file() or manifest.stat().st_size > MANIFEST_MAX_BYTES:
                continue
            data = json.loads(manifest.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return candidate
    return None


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests lists and objects more than `limit` deep (checked without
    recursion, so the readers after it, which recurse, never exhaust the stack)."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)
                 if isinstance(c, dict | list)]
        if not level:
            return False
    return True


def _upgraded(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        return upgrade(raw)
    except Malformed as exc:
        raise WalkforgeError(f"{path}: malformed manifest: {exc}") from None


def _typed(manifest: dict[str, Any], path: Path) -> Manifest:
    try:
        return Manifest.from_json(manifest)
    except Malformed as exc:
        raise WalkforgeError(f"{path}: malformed manifest: {exc}") from None


def normal_digest(digest: str) -> str:
    """`digest` as 64 lowercase hex digits (a `sha256:` prefix is accepted); refuse anything else."""
    value = digest.strip().lower().removeprefix("sha256:") if isinstance(digest, str) else ""
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise WalkforgeError(f"--digest must be the 64 hex digits `walkforge inspect` prints, got {digest!r}")
    return value


def check_digest(bundle: Bundle, expected: str | None) -> Bundle:
    """`bundle` if its digest is `expected` (or nothing is pinned); else refuse, naming both."""
    if expected is not None and bundle.digest != normal_digest(expected):
        raise WalkforgeError(f"bundle {bundle.root} has digest {bundle.digest}, not the pinned "
                             f"{normal_digest(expected)}; refused")
    return bundle


def verify_files(root: Path, manifest: dict[str, Any], digest: str | None = None,
                 rehash: bool = False, seen: dict[str, list[int]] | None = None) -> int:
    """Check each listed file's size and sha256; refuse missing, truncated or changed files.

    With the bundle's `digest`, a file whose stamp (artifacts/bundle.py "Stamps") still matches
    is trusted without hashing it, and the stamps are renewed after a check; `rehash` hashes
    every file all the same. Returns how many files were hashed; `seen`, when given, gets each
    file's stamp as checked (`Bundle.check_unchanged` compares with it)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise WalkforgeError(f"{Path(root) / MANIFEST}: manifest has no files table; cannot verify it")
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            raise WalkforgeError(f"{Path(root) / MANIFEST}: malformed files entry for {rel}")
    check_listed_exactly(Path(root), set(files), MANIFEST)
    stamps = {} if digest is None or rehash else read_stamps(Path(root), digest)
    seen, hashed = {} if seen is None else seen, 0
    for rel, entry in files.items():
        path = inside(Path(root), rel, f"files[{rel!r}]")
        if not path.is_file():
            raise WalkforgeError(f"bundle file missing: {rel}")
        seen[rel] = file_stamp(path)
        size = seen[rel][0]
        if size != entry["size"]:
            raise WalkforgeError(
                f"bundle file {rel} is {size} bytes, manifest says {entry['size']} (truncated or altered)"
            )
        if stamps.get(rel) == seen[rel]:
            continue
        hashed += 1
        if sha256_file(path) != entry["sha256"]:
            raise WalkforgeError(f"bundle file {rel} fails its sha256 check (tampered or corrupt)")
    if digest is not None and (hashed or set(stamps) != set(seen)):
        write_stamps(Path(root), digest, seen)
    return hashed


# -- kinds: a full bundle carries the torch reference weights, a deployment bundle does not ----

def require_reference_weights(bundle: Bundle, what: str) -> None:
    """Refuse, in one line naming `what` needs them, a bundle without reference weights."""
    if not bundle.typed.has_reference_weights:
        raise WalkforgeError(f"{what} needs the torch reference weights, which bundle {bundle.root} does "
                             "not carry (a deployment bundle, compiled with --no-reference-weights): "
                             "run it on an engine backend (cpu, cuda, trt), or recompile without the flag")



def _content_fields(stamp: list[int]) -> tuple[int, ...]:
    """A stamp less its ctime, for `Bundle.check_unchanged`: size, mtime, inode and device move
    when a file is written, truncated or replaced, while ctime also moves when nothing in it
    changed (a hard link made to it — `cp -al`, rsync --link-dest, another loader's copy —, a
    chmod). Loading still trusts a stamp only with its ctime (artifacts/stamps.py)."""
    return tuple(v for name, v in zip(STAMP_FIELDS, stamp, strict=True) if name != "st_ctime_ns")

class Bundle:
    """An opened, verified bundle: its root, manifest and digest (None for one being staged).

    `manifest` is the JSON in the current format (an older bundle's upgraded), `typed` the same as
    artifacts/manifest.py's types, and `stored` the JSON as the file holds it (what `inspect` shows)."""

    def __init__(self, root: Path, manifest: dict[str, Any], digest: str | None = None) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.stored = manifest
        self.digest = digest
        self.hashed = 0  # files whose sha256 `open` computed (the rest were trusted by their stamps)
        self._typed: Manifest | None = None
        self._checked: dict[str, list[int]] = {}  # rel → its stamp when `open` verified it
        self._verified: dict[str, bytes] = {}  # read_verified's cache
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: Path | str, verify: bool = True, digest: str | None = None,
             integrity: bool = False) -> Bundle:
        """Read `root`'s manifest and refuse any path in it that leaves the bundle; with `verify`,
        refuse unlisted, missing or altered files (hashing each file once, then trusting its stamp
        while its size, times and inode are unchanged; `integrity` hashes every file again);
        with `digest`, a bundle of another digest. A manifest the runtime cannot read
        (artifacts/schema.py, artifacts/manifest.py) is refused too."""
        stored, actual = _read_manifest(Path(root))
        bundle = check_digest(cls(Path(root), stored, actual), digest)
        where = bundle.root / MANIFEST
        check_paths(bundle.root, stored)
        check_schema(stored, str(where))
        bundle.manifest = _upgraded(stored, where)
        bundle._typed = _typed(bundle.manifest, where)
        if verify or integrity:
            bundle.hashed = verify_files(bundle.root, stored, actual, rehash=integrity, seen=bundle._checked)
        return bundle

    def read_verified(self, rel: str) -> bytes:
        """The bytes of bundle file `rel`, read once and checked against the manifest's files table
        (size and sha256; the table the digest covers): the bytes returned are the bytes hashed, so
        a file changed after `open` is refused (WalkforgeError naming it), never used. Cached: the
        file is read at the first call only. A staged bundle (no digest: the compiler runs it
        before its files table is written) reads the file as it is."""
        with self._lock:
            cached = self._verified.get(rel)
        if cached is not None:
            return cached
        path = self.path(rel, f"read_verified({rel!r})")
        entry = self.typed.files.get(rel) if self.digest is not None else None
        if self.digest is not None and entry is None:
            raise WalkforgeError(f"bundle file {rel} is not in the manifest's files table; refused")
        try:
            with open(path, "rb") as fh:
                data = fh.read() if entry is None else fh.read(entry.size + 1)
        except FileNotFoundError:
            raise WalkforgeError(f"bundle file missing: {rel}") from None
        except OSError as exc:
            raise WalkforgeError(f"cannot read bundle file {rel}: {exc.strerror or exc}") from None
        if entry is not None and (len(data) != entry.size
                                  or hashlib.sha256(data).hexdigest() != entry.sha256):
            raise WalkforgeError(f"bundle file {rel} fails its sha256 check against the manifest of "
                                 f"bundle {self.root} (changed after it was loaded, or corrupt); refused")
        with self._lock:
            return self._verified.setdefault(rel, data)

    def check_unchanged(self) -> None:
        """Refuse (WalkforgeError naming the first) any file changed, replaced or removed since
        `open` verified it: one stat per file against its stamp then, less its ctime (size, mtime,
        inode, device: `_content_fields`). An
        engine may map its file (onnxruntime maps external data), so a write after the load can
        change answers: call this after a run and before handing its answer out. Checks nothing
        on a bundle opened without `verify`."""
        for rel, stamp in self._checked.items():
            try:
                now = file_stamp(self.root / rel)
            except OSError:
                now = None
            if now is None or _content_fields(now) != _content_fields(stamp):
                raise WalkforgeError(f"bundle file {rel} changed after bundle {self.root} was loaded "
                                     f"({'removed' if now is None else 'written or replaced'}); refused: "
                                     "load it again to check it")

    @property
    def typed(self) -> Manifest:
        """The manifest as typed sections. A staged bundle's (no digest: the compiler runs it while
        it still fills the dict in) is read afresh each time, as it will be written less its file table."""
        if self._typed is not None and self.digest is not None:
            return self._typed
        try:
            return as_manifest(self.manifest)
        except Malformed as exc:
            raise WalkforgeError(f"{self.root / MANIFEST}: malformed manifest: {exc}") from None

    @property
    def recipe(self) -> str:
        return self.typed.recipe

    @property
    def kind(self) -> str:
        return self.typed.kind

    def walk(self, name: str) -> dict[str, Any]:
        """The walk's JSON entry (its tensor contract: runtimes.engine.Contract.from_json)."""
        walks = self.typed.walks
        if name not in walks:
            raise WalkforgeError(f"bundle has no walk '{name}'; walks: {', '.join(walks)}")
        return walks[name].to_json()

    def path(self, rel: str, entry: str = "path") -> Path:
        """`root / rel`, refused unless it stays inside the bundle (artifacts/paths.py)."""
        return inside(self.root, rel, entry)
