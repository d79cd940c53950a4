"""Recipe configs: frozen dataclasses to and from JSON, with unknown keys refused."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from walkforge.errors import WalkforgeError, did_you_mean

C = TypeVar("C")


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[C], data: dict[str, Any], base: C | None = None) -> C:
    """Build `cls` from `data`; fields absent from `data` come from `base` (or defaults)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise WalkforgeError(f"{cls.__name__}: unknown config key '{key}'{did_you_mean(key, names)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        current = getattr(base, f.name) if base is not None else None
        if f.name not in data:
            if base is not None:
                kwargs[f.name] = current
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise WalkforgeError(f"{cls.__name__}.{f.name}: expected an object")
            value = from_dict(hint, value, current)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def read_json_object(path: Path, expected: str) -> dict[str, Any]:
    """The JSON object in `path` (a checkpoint's config files); a missing file, invalid JSON or a
    JSON value other than an object is a one-line error. `expected` names what the folder should
    be, for the message (e.g. "a diffusers AutoencoderKL folder")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WalkforgeError(f"{path.parent}: no {path.name} (expected {expected})") from None
    except json.JSONDecodeError as exc:
        raise WalkforgeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WalkforgeError(f"{path}: expected a JSON object ({expected})")
    return data


def load_overrides(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WalkforgeError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise WalkforgeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WalkforgeError(f"{path}: expected a JSON object of config fields")
    return data
