"""The one interface every backend's engines share, and their contract from the manifest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from walkforge.graphs.walk import TensorSpec


@dataclass(frozen=True)
class Contract:
    """One walk's tensor contract as the manifest records it (`GraphNode.contract()`)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # output -> the input it updates in place

    @classmethod
    def from_json(cls, walk: Mapping[str, Any]) -> Contract:
        return cls(tuple(TensorSpec.from_json(s) for s in walk["inputs"]),
                   tuple(TensorSpec.from_json(s) for s in walk["outputs"]), dict(walk.get("aliases", {})))

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)


class Engine(Protocol):
    """Runs one walk. `run` takes the chain's name -> value environment and returns the walk's
    outputs by name, values in the backend's own type (so the next engine binds them by
    reference). An output in `aliases` is its input's buffer, updated in place."""

    name: str
    inputs: tuple[TensorSpec, ...] | list[TensorSpec]
    outputs: tuple[TensorSpec, ...] | list[TensorSpec]
    aliases: dict[str, str]

    def run(self, env: Mapping[str, Any]) -> dict[str, Any]: ...
