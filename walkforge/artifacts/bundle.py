"""The bundle reader: a directory with `manifest.json` at its root, opened and checked.

The reader refuses foreign bundles, unknown format versions, any path the manifest names that is
not inside the bundle (artifacts/paths.py), a manifest the runtime cannot read (artifacts/schema.py,
artifacts/manifest.py), a file present but not listed or listed but absent, and any file whose size
or sha256 differs from the manifest, naming the file. Each file is hashed once; later opens trust
a per-user stamp of its size, times and inode (artifacts/stamps.py) and hash only what changed.
An older format is read through `manifest.upgrade`, so `Bundle.manifest` is always current.

A bundle's digest is the sha256 of its manifest bytes, which hold every other file's sha256: pin it
(`Bundle.open(root, digest=...)`, `check_digest`) to load only the bundle that was tested. It is
not a signature: whoever can write the bundle can write a manifest to match.

The writer is artifacts/staged_write.py (`staged_bundle`) and artifacts/manifest.py
(`write_manifest`); both are re-exported here, where older code imports them from.
"""

from __future__ import annotations

import hashlib
import json
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
from walkforge.artifacts.staged_write import staged_bundle
from walkforge.artifacts.stamps import file_stamp, read_stamps, write_stamps
from walkforge.errors import WalkforgeError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "Bundle", "bundle_kind", "check_digest", "file_table",
           "has_reference_weights", "manifest_digest", "normal_digest", "read_manifest",
           "require_reference_weights", "sha256_file", "staged_bundle", "verify_files", "write_manifest"]


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest in the current format (an older one upgraded: manifest.upgrade); no file hashing."""
    raw = _read_manifest(Path(root))[0]
    return _upgraded(raw, Path(root) / MANIFEST)


def manifest_digest(root: Path | str) -> str:
    """The bundle's digest: sha256 of its manifest bytes (hex)."""
    return _read_manifest(Path(root))[1]


def _read_manifest(root: Path) -> tuple[dict[str, Any], str]:
    """(manifest as stored, digest) from one read of the manifest's bytes."""
    if not root.exists():
        raise WalkforgeError(f"bundle not found: {root}")
    if not root.is_dir():
        raise WalkforgeError(f"{root} is not a bundle directory")
    path = root / MANIFEST
    if not path.is_file():
        raise WalkforgeError(f"{root} is not a walkforge bundle: no {MANIFEST}")
    try:
        data = path.read_bytes()
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WalkforgeError(f"{path}: corrupt manifest ({exc})") from None
    except OSError as exc:
        raise WalkforgeError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WalkforgeError(f"{path}: not a walkforge bundle manifest (foreign format)")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise WalkforgeError(f"{path}: bundle format version {version!r}, this walkforge reads version "
                             f"{FORMAT_VERSION} (and older: {', '.join(map(str, READABLE_VERSIONS[:-1]))})")
    return manifest, hashlib.sha256(data).hexdigest()


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
                 rehash: bool = False) -> int:
    """Check each listed file's size and sha256; refuse missing, truncated or changed files.

    With the bundle's `digest`, a file whose stamp (artifacts/bundle.py "Stamps") still matches
    is trusted without hashing it, and the stamps are renewed after a check; `rehash` hashes
    every file all the same. Returns how many files were hashed."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise WalkforgeError(f"{Path(root) / MANIFEST}: manifest has no files table; cannot verify it")
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            raise WalkforgeError(f"{Path(root) / MANIFEST}: malformed files entry for {rel}")
    check_listed_exactly(Path(root), set(files), MANIFEST)
    stamps = {} if digest is None or rehash else read_stamps(Path(root), digest)
    seen, hashed = {}, 0
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
            bundle.hashed = verify_files(bundle.root, stored, actual, rehash=integrity)
        return bundle

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
        walks = self.manifest["walks"]
        if name not in walks:
            raise WalkforgeError(f"bundle has no walk '{name}'; walks: {', '.join(walks)}")
        return walks[name]

    def path(self, rel: str, entry: str = "path") -> Path:
        """`root / rel`, refused unless it stays inside the bundle (artifacts/paths.py)."""
        return inside(self.root, rel, entry)
