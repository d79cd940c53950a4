"""Bundle v1: a directory with `manifest.json` at its root.

The writer stages everything in a sibling temporary directory and renames it into place only
when complete, so an interrupted or failed compile leaves nothing at the destination. The
reader refuses foreign bundles, unknown format versions and any file whose size or sha256
differs from the manifest, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError

FORMAT = "walkforge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` except the manifest, by relative path."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


@contextmanager
def staged_bundle(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside `out`; on success move it to `out` atomically.

    On any exception the staging directory is removed and `out` is left as it was.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise WalkforgeError(f"output {out} already exists (pass --force to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise WalkforgeError(f"cannot write output {out}: {exc.strerror or exc}") from None
    try:
        yield stage
        _replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _replace(stage: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill format fields and the file table, then write `manifest.json` (itself atomically)."""
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION}
    manifest["files"] = file_table(root)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and check the manifest's format fields (no file hashing)."""
    root = Path(root)
    if not root.exists():
        raise WalkforgeError(f"bundle not found: {root}")
    if not root.is_dir():
        raise WalkforgeError(f"{root} is not a bundle directory")
    path = root / MANIFEST
    if not path.is_file():
        raise WalkforgeError(f"{root} is not a walkforge bundle: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WalkforgeError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WalkforgeError(f"{path}: not a walkforge bundle manifest (foreign format)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise WalkforgeError(
            f"{path}: bundle format version {version}, this walkforge reads version {FORMAT_VERSION}"
        )
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check each listed file's size and sha256; refuse missing, truncated or changed files."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise WalkforgeError(f"{Path(root) / MANIFEST}: manifest has no files table; cannot verify it")
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            raise WalkforgeError(f"{Path(root) / MANIFEST}: malformed files entry for {rel}")
        path = Path(root) / rel
        if not path.is_file():
            raise WalkforgeError(f"bundle file missing: {rel}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise WalkforgeError(
                f"bundle file {rel} is {size} bytes, manifest says {entry['size']} (truncated or altered)"
            )
        if sha256_file(path) != entry["sha256"]:
            raise WalkforgeError(f"bundle file {rel} fails its sha256 check (tampered or corrupt)")


class Bundle:
    """An opened, verified bundle: its root and manifest."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: Path | str, verify: bool = True) -> Bundle:
        manifest = read_manifest(Path(root))
        if verify:
            verify_files(Path(root), manifest)
        return cls(Path(root), manifest)

    @property
    def recipe(self) -> str:
        return self.manifest["recipe"]

    def walk(self, name: str) -> dict[str, Any]:
        walks = self.manifest["walks"]
        if name not in walks:
            raise WalkforgeError(f"bundle has no walk '{name}'; walks: {', '.join(walks)}")
        return walks[name]

    def path(self, rel: str) -> Path:
        return self.root / rel
