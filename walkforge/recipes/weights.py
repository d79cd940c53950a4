"""Declarative, strict weight loading.

A `KeyMap` maps checkpoint key prefixes to module key prefixes (both ways, so errors can name
the checkpoint key a module parameter expects). `load_strict` consumes every checkpoint
tensor or fails: each one maps to a module parameter of the same shape, or matches an
`ignore` pattern; every module parameter is filled. Only safetensors are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from walkforge.errors import WalkforgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyMap:
    """`prefixes`: (checkpoint prefix, module prefix) pairs, first match wins.
    `ignore`: regexes of checkpoint keys that are deliberately unused."""

    prefixes: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...] = ()

    def to_module(self, ckpt_key: str) -> str | None:
        for ck, mk in self.prefixes:
            if ckpt_key.startswith(ck):
                return mk + ckpt_key[len(ck):]
        return None

    def to_checkpoint(self, module_key: str) -> str:
        for ck, mk in self.prefixes:
            if module_key.startswith(mk):
                return ck + module_key[len(mk):]
        return module_key

    def ignored(self, ckpt_key: str) -> bool:
        return any(re.search(p, ckpt_key) for p in self.ignore)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (or of every *.safetensors in a folder)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise WalkforgeError(f"no safetensors weights found at {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensors[key] = fh.get_tensor(key)
        except Exception as exc:  # safetensors raises its own types for corrupt headers
            raise WalkforgeError(f"{f}: not a readable safetensors file ({exc})") from None
    return tensors


class CheckpointRead(tuple):
    """What a recipe's `read_checkpoint` may return instead of a plain `(cfg, tensors)` pair: the
    same pair (it unpacks as one) plus `manifest`, entries the compiler adds to the bundle's
    manifest as they are (vae: the checkpoint's scaling factors), and `files`, extra bundle files
    by relative bundle path (pi0: `policy/stats.safetensors`) as bytes or a file to copy; the
    compiler writes them beside the weights, so the manifest's file table hashes them."""

    manifest: dict
    files: dict[str, bytes | Path]

    def __new__(cls, cfg: object, tensors: dict[str, torch.Tensor], manifest: dict,
                files: Mapping[str, bytes | Path] | None = None) -> CheckpointRead:
        read = super().__new__(cls, (cfg, tensors))
        read.manifest = manifest
        read.files = dict(files or {})
        return read


def read_weights(folder: Path, stem: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The weights named `stem` in `folder`, as diffusers' `from_pretrained(variant=...)` picks
    them: `<stem>[.<variant>].safetensors`, or its shards through
    `<stem>[.<variant>].safetensors.index.json`. Other safetensors files are not read."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    single, index = Path(folder) / name, Path(folder) / f"{name}.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        return read_safetensors_shards(index)
    others = sorted(f.name for f in Path(folder).glob(f"{stem}*.safetensors*"))
    raise WalkforgeError(f"{folder}: no {name} (nor {index.name})"
                         + (f"; found {', '.join(others)}" if others else ""))


def read_safetensors_shards(index: Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded checkpoint: `weight_map` of `index` (key → shard file) must name
    every tensor of every shard it lists, and each tensor once."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WalkforgeError(f"{index}: not a safetensors index ({exc!r})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(index.parent / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(part) != listed:
            diff = sorted(set(part) ^ listed)
            raise WalkforgeError(f"{index}: shard {shard} and its weight_map disagree on {diff[:3]}")
        tensors |= part
    return tensors


def match_strict(wanted: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                 keymap: KeyMap) -> tuple[dict[str, str], dict[str, int]]:
    """Check `tensors` against a module's state dict `wanted` (meta tensors are enough) through
    `keymap`, reading no tensor data: every checkpoint tensor maps to a module key of the same
    shape or is ignored, and every module key is filled. Returns (module key → checkpoint key,
    counts loaded/ignored)."""
    pairs: dict[str, str] = {}
    ignored = 0
    for ckpt_key in sorted(tensors):
        tensor = tensors[ckpt_key]
        module_key = keymap.to_module(ckpt_key)
        if module_key is None or module_key not in wanted:
            if keymap.ignored(ckpt_key):
                ignored += 1
                continue
            raise WalkforgeError(
                f"unexpected checkpoint tensor '{ckpt_key}' {list(tensor.shape)}: "
                "not used by the model and not listed as ignored"
            )
        target = wanted[module_key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise WalkforgeError(
                f"checkpoint tensor '{ckpt_key}' has shape {list(tensor.shape)}, "
                f"the model expects {list(target.shape)}"
            )
        pairs[module_key] = ckpt_key
    missing = [k for k in wanted if k not in pairs]
    if missing:
        first = missing[0]
        raise WalkforgeError(
            f"checkpoint is missing '{keymap.to_checkpoint(first)}' "
            f"{list(wanted[first].shape)}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    log.info("matched %d tensors, ignored %d", len(pairs), ignored)
    return pairs, {"loaded": len(pairs), "ignored": ignored}


def load_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                keymap: KeyMap) -> dict[str, int]:
    """Load `tensors` into `module` through `keymap` (checked by `match_strict`); return counts
    (loaded, ignored)."""
    wanted = module.state_dict()
    pairs, counts = match_strict(wanted, tensors, keymap)
    module.load_state_dict({k: tensors[c].to(wanted[k].dtype) for k, c in pairs.items()}, strict=True)
    return counts


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        fingerprint_update(h, key, state[key])
    return "sha256:" + h.hexdigest()


def fingerprint_update(h: Any, key: str, tensor: torch.Tensor) -> None:
    """Add one state-dict entry to a `fingerprint` hash (a writer that streams tensors in key
    order computes the same fingerprint without holding the state dict)."""
    t = tensor.detach().contiguous().cpu()
    h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
