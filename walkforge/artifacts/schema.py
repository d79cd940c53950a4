"""The shape of a manifest as the runtime reads it: checked once when a bundle opens, so an edited or
damaged manifest is refused in one line naming the entry instead of failing deep in a front.

Checked: the walks' tensor contracts (`inputs`/`outputs` specs, `aliases`), the plan (walk names
and loops over a walk), every target's walk table (one engine file per walk), the sections read
as objects, the paging and KV-scale numbers, and the front's name. Paths are artifacts/paths.py's;
recipe configs are the recipe's own (`recipes.configs.from_dict`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from walkforge.errors import WalkforgeError

OBJECT_SECTIONS = ("walks", "targets", "config", "weights", "precision", "dim_ranges", "vae", "paging")
"""Top-level entries that, where present, must be JSON objects."""


class Malformed(Exception):
    """One problem, `entry` first: turned into a WalkforgeError naming the manifest."""


def check_schema(manifest: Mapping[str, Any], where: str, schedules: Collection[str] | None = None) -> None:
    """Refuse (naming `where`, the manifest's path, and the entry) a manifest the runtime cannot
    read; `schedules`: the loop schedules this runtime knows (None: any name)."""
    try:
        _check(manifest, schedules)
    except Malformed as exc:
        raise WalkforgeError(f"{where}: malformed manifest: {exc}") from None


def _check(m: Mapping[str, Any], schedules: Collection[str] | None) -> None:
    for name in OBJECT_SECTIONS:
        if name in m:
            _object(m[name], name)
    for name in ("front", "recipe"):
        if name in m and not isinstance(m[name], str):
            raise Malformed(f"{name} is {_shown(m[name])}, not a name")
    walks = _object(m.get("walks"), "walks")
    if not walks:
        raise Malformed("walks is empty")
    for name, walk in walks.items():
        _walk(_object(walk, f"walks.{name}"), f"walks.{name}")
    for key, target in _object(m.get("targets"), "targets").items():
        table = _object(_object(target, f"targets.{key}").get("walks"), f"targets.{key}.walks")
        for walk in table:
            _known(walk, walks, f"targets.{key}.walks")
        if missing := sorted(set(walks) - set(table)):
            raise Malformed(f"targets.{key}.walks lacks walk {missing[0]!r}")
    _plan(m.get("plan"), walks, schedules)
    if "paging" in m:
        for key in ("max_tokens", "page_size"):
            _count(m["paging"].get(key), f"paging.{key}")
    if m.get("kv_cache") is not None:
        scales = _object(m["kv_cache"], "kv_cache").get("scales")
        if scales is not None and not (isinstance(scales, list) and all(map(_is_pair, scales))):
            raise Malformed(f"kv_cache.scales is {_shown(scales)}, not a [K, V] scale pair per layer")


def _walk(walk: Mapping[str, Any], entry: str) -> None:
    from walkforge.graphs.walk import DTYPES

    names = {}
    for side in ("inputs", "outputs"):
        specs = walk.get(side)
        if not isinstance(specs, list):
            raise Malformed(f"{entry}.{side} is {_shown(specs)}, not a list of tensors")
        for i, spec in enumerate(specs):
            at = f"{entry}.{side}[{i}]"
            spec = _object(spec, at)
            if not isinstance(spec.get("name"), str):
                raise Malformed(f"{at}.name is {_shown(spec.get('name'))}, not a name")
            if spec.get("dtype") not in DTYPES:
                raise Malformed(f"{at}.dtype is {_shown(spec.get('dtype'))}, not one of {', '.join(DTYPES)}")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, str) or _is_count(d, 0) for d in shape):
                raise Malformed(f"{at}.shape is {_shown(shape)}, not a list of sizes and dim names")
        names[side] = {spec["name"] for spec in specs}
    for out, inp in _object(walk.get("aliases", {}), f"{entry}.aliases").items():
        _known(out, names["outputs"], f"{entry}.aliases")
        _known(inp, names["inputs"], f"{entry}.aliases.{out}")


def _plan(plan: Any, walks: Mapping[str, Any], schedules: Collection[str] | None) -> None:
    if not isinstance(plan, list) or not plan:
        raise Malformed(f"plan is {_shown(plan)}, not a list of steps")
    for i, step in enumerate(plan):
        if isinstance(step, str):
            _known(step, walks, f"plan[{i}]")
            continue
        loop = _object(step, f"plan[{i}]")
        _known(loop.get("loop"), walks, f"plan[{i}].loop")
        if not isinstance(loop.get("count"), str):
            raise Malformed(f"plan[{i}].count is {_shown(loop.get('count'))}, not a setting name")
        schedule = loop.get("schedule")
        if schedule is not None and (not isinstance(schedule, str)
                                     or (schedules is not None and schedule not in schedules)):
            raise Malformed(f"plan[{i}].schedule is {_shown(schedule)}, not a known schedule")
        carry = _object(loop.get("carry"), f"plan[{i}].carry")
        if not carry or not all(isinstance(v, str) for v in carry.values()):
            raise Malformed(f"plan[{i}].carry is {_shown(carry)}, not a map of output to input names")


def _object(value: Any, entry: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Malformed(f"{entry} is {_shown(value)}, not an object")
    return value


def _known(name: Any, known: Collection[str], entry: str) -> None:
    if not isinstance(name, str) or name not in known:
        raise Malformed(f"{entry} names {_shown(name)}, not one of {', '.join(sorted(known))}")


def _count(value: Any, entry: str) -> None:
    if not _is_count(value, 1):
        raise Malformed(f"{entry} is {_shown(value)}, not a positive integer")


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A short one-line rendering of a manifest value."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
