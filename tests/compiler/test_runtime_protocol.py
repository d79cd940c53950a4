"""The runtime the compiler is handed: `walkforge.runtimes` satisfies `compiler.runtime_protocol.Runtime`."""

from __future__ import annotations

import types

from walkforge import runtimes
from walkforge.compiler.runtime_protocol import Runtime


def test_walkforge_runtimes_is_a_runtime() -> None:
    assert isinstance(runtimes, Runtime)


def test_a_runtime_lacking_walk_engine_is_not() -> None:
    partial = types.SimpleNamespace(load=runtimes.load, to_numpy=runtimes.to_numpy,
                                    ort_array=runtimes.ort_array)
    assert not isinstance(partial, Runtime)
