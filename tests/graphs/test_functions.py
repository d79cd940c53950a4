"""The function-body and fp8-pool passes moved from `walkforge.plugins` to `walkforge.graphs.functions`;
the old import path still gives the same objects (their behaviour: tests/plugins/test_registry.py and
test_fp8_pool.py)."""

from __future__ import annotations

import pytest

from walkforge import plugins
from walkforge.graphs import functions

MOVED = ("MIN_OPSET", "MIN_OPSET_FP8", "attach_functions", "fp8_kv_pool", "pool_is_fp8", "_pool_values")


@pytest.mark.parametrize("name", MOVED)
def test_old_plugins_name_is_the_graphs_functions_object(name: str) -> None:
    assert getattr(plugins, name) is getattr(functions, name)


def test_plugins_still_refuses_unknown_names() -> None:
    with pytest.raises(AttributeError, match="no attribute 'attach_function'"):
        _ = plugins.attach_function
