"""Bundles compiled once per test session, shared read-only by every test that asks for the same compile.

`BundleCache(root)(recipe, **fields)` returns the folder that `compile_bundle(CompileRequest(recipe=
recipe, out=..., **fields))` writes, compiling it only the first time that request is asked for.
The key is the whole request less `out` and `force`: recipe, variant, precision and every option,
defaults filled in (a path option by its name). Under pytest-xdist the workers share `root`, and a
file lock per bundle lets one worker compile it while the others wait and then read it.

Tests must not modify a shared bundle: one that tampers takes `private_copy(bundle, folder)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

UNKEYED = ("out", "force")  # where the bundle goes and whether it may replace one: not what it is


class BundleCache:
    """Compiled bundles under `root`, one folder per distinct request (module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._done: dict[str, Path] = {}

    def __call__(self, recipe: str, **fields: Any) -> Path:
        """The bundle `compile_bundle` makes of this request; do not modify it."""
        from walkforge import CompileRequest, compile_bundle  # at first use: conftest imports this module

        name = self.name(recipe, **fields)
        if name not in self._done:
            out = self.root / name
            with FileLock(str(self.root / f"{name}.lock")):
                if not (out / "manifest.json").is_file():  # a bundle is written whole or not at all
                    compile_bundle(CompileRequest(recipe=recipe, out=out, **fields))
            self._done[name] = out
        return self._done[name]

    def inputs(self, name: str, make: Callable[[Path], object]) -> Path:
        """A folder of inputs (a tokenizer, a config file) that `make(folder)` fills, once per session
        and shared like the bundles: a request naming a file in it has one key in every worker."""
        folder = self.root / "inputs" / name
        with FileLock(str(self.root / f"inputs-{name}.lock")):
            if not folder.is_dir():
                staging = folder.with_name(f".{name}.partial")
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                make(staging)
                staging.rename(folder)
        return folder

    @staticmethod
    def name(recipe: str, **fields: Any) -> str:
        """`<recipe>-<variant>-<precision>-<hash of the whole request>`, e.g. `pi0-tiny-fp8-1a2b3c4d5e`."""
        from walkforge import CompileRequest

        request = CompileRequest(recipe=recipe, out=Path("unused"), **fields)  # checked, defaults filled in
        key = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name not in UNKEYED}
        if key["variant"] is None and key["checkpoint"] is None:
            key["variant"] = "tiny"  # what the compile takes without either
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return f"{recipe}-{key['variant'] or 'checkpoint'}-{request.precision}-{digest[:10]}"


def private_copy(bundle: Path, folder: Path) -> Path:
    """A copy of a shared bundle at `folder`, free to tamper with."""
    return Path(shutil.copytree(bundle, folder))
