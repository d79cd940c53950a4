"""Every path a manifest names stays inside its bundle, and the files table lists exactly its files.

A bundle path is relative, POSIX-spelled, without `.`/`..` parts or empty parts, and resolves —
symlinks followed — inside the bundle root. The manifest names paths in its files table (the
keys), in each target's `walks` (walk → engine file) and, anywhere in the manifest, under a key
in PATH_KEYS or ending in `_file` (walks' `onnx`, `weights.file`, kernels' `cubin_file` /
`ptx_file`, calibration `scales_file`, TensorRT `timing_cache` / `build_log`, a tokenizer's or
processor's `file`). `check_paths` refuses the first offending entry, naming it; `inside`
checks one path (what `Bundle.path` calls).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError

PATH_KEYS = frozenset({"onnx", "file", "timing_cache", "build_log"})
"""Manifest keys whose string value is a bundle path (so is any key ending in `_file`)."""
MAX_PATH_CHARS, MAX_PATH_PARTS = 4096, 64
"""The longest bundle path (Linux's PATH_MAX) and its most parts."""


def manifest_paths(manifest: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(entry, path) for every bundle path the manifest names; entry reads like `walks.decode.onnx`."""
    files = manifest.get("files")
    if isinstance(files, Mapping):
        for rel in files:
            yield f"files[{rel!r}]", rel
    targets = manifest.get("targets")
    if isinstance(targets, Mapping):
        for key, target in targets.items():
            walks = target.get("walks") if isinstance(target, Mapping) else None
            if isinstance(walks, Mapping):
                for walk, rel in walks.items():
                    yield f"targets.{key}.walks.{walk}", rel
    for name, value in manifest.items():
        if name not in ("files", "targets"):
            yield from _keyed_paths(name, value)
    if isinstance(targets, Mapping):
        for key, target in targets.items():
            if isinstance(target, Mapping):
                yield from _keyed_paths(f"targets.{key}", {k: v for k, v in target.items() if k != "walks"})


def _keyed_paths(entry: str, value: Any) -> Iterator[tuple[str, Any]]:
    """Values under PATH_KEYS / `*_file` keys anywhere below `value`."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and (key in PATH_KEYS or key.endswith("_file")):
                yield f"{entry}.{key}", item
            else:
                yield from _keyed_paths(f"{entry}.{key}", item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _keyed_paths(f"{entry}[{i}]", item)


def inside(root: Path, rel: Any, entry: str) -> Path:
    """`root / rel`, refused (naming `entry`) unless `rel` is a plain relative path that resolves,
    symlinks followed, inside `root`."""
    problem = _spelling_problem(rel)
    if problem is None:
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, rel))
        if os.path.commonpath([real_root, real]) != real_root:
            problem = f"resolves outside the bundle (to {real})"
    if problem is not None:
        raise WalkforgeError(f"{Path(root) / 'manifest.json'}: {entry} = {rel!r} {problem}; refused")
    return Path(root) / rel


def _spelling_problem(rel: Any) -> str | None:
    if not isinstance(rel, str) or not rel:
        return "is not a path"
    if len(rel) > MAX_PATH_CHARS or rel.count("/") >= MAX_PATH_PARTS:
        return f"is longer than a bundle path may be ({MAX_PATH_CHARS} characters, {MAX_PATH_PARTS} parts)"
    if "\\" in rel or not rel.isprintable():
        return "is not a POSIX relative path"
    if rel.startswith("/"):
        return "is absolute"
    parts = rel.split("/")
    if ".." in parts:
        return "leaves the bundle (..)"
    if "" in parts or "." in parts:  # what PurePosixPath would normalise away
        return "is not a normalised relative path"
    return None


def check_paths(root: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse the first path the manifest names that is not inside `root` (module doc). Each distinct
    path is resolved once, from its folder's real path and that folder's listing (read once), so a
    manifest naming many paths costs no system call per path."""
    real_root = os.path.realpath(root)
    below = real_root.rstrip("/") + "/"
    resolver, inside_paths = _Resolver(real_root), set()
    for entry, rel in manifest_paths(manifest):
        if isinstance(rel, str) and rel in inside_paths:
            continue
        problem = _spelling_problem(rel)
        if problem is None:
            real = resolver(rel)
            if real != real_root and not real.startswith(below):
                problem = f"resolves outside the bundle (to {real})"
        if problem is not None:
            raise WalkforgeError(f"{Path(root) / 'manifest.json'}: {entry} = {rel!r} {problem}; refused")
        inside_paths.add(rel)


class _Resolver:
    """os.path.realpath of well-spelled bundle paths, sharing the work: `resolved` maps each path
    (and its folders) to its real path, `listing` each real folder to {name: is a symlink}."""

    def __init__(self, real_root: str) -> None:
        self.resolved: dict[str, str] = {"": real_root}
        self.listing: dict[str, dict[str, bool] | None] = {}

    def __call__(self, rel: str) -> str:
        head, _, tail = rel.rpartition("/")
        if head not in self.resolved:
            self(head)
        real = self._child(self.resolved[head], tail)
        self.resolved[rel] = real
        return real

    def _child(self, folder: str, name: str) -> str:
        if folder not in self.listing:
            try:
                with os.scandir(folder) as entries:
                    self.listing[folder] = {e.name: e.is_symlink() for e in entries}
            except OSError:  # absent, or not a folder: nothing below it can be a symlink
                self.listing[folder] = None
        path = os.path.join(folder, name)
        return os.path.realpath(path) if (self.listing[folder] or {}).get(name) else path


def present_files(root: Path, manifest_name: str) -> set[str]:
    """Relative paths of every file, symlink or other non-directory under `root` but the manifest;
    symlinked directories count as entries and are not descended."""
    found = set()
    for dirpath, dirs, files in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            found.add((rel_dir / name).as_posix())
    found.discard(manifest_name)
    return found


def check_listed_exactly(root: Path, listed: set[str], manifest_name: str) -> None:
    """Refuse a file present but not in the files table, or listed but absent, naming it."""
    present = present_files(root, manifest_name)
    if extra := sorted(present - listed):
        raise WalkforgeError(f"bundle file {_shown(extra[0])} is not in the manifest's files table "
                             f"({len(extra)} unlisted); refused")
    if missing := sorted(listed - present):
        raise WalkforgeError(f"bundle file missing: {missing[0]} ({len(missing)} missing)")


def _shown(name: str) -> str:
    """`name` as is, or quoted where it holds characters that would break a one-line message."""
    return name if name.isprintable() else repr(name)
