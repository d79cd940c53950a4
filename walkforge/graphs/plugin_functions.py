"""ONNX pass: attach the function body of every walkforge custom op a model uses.

The implementation lives with the ops (`walkforge.plugins.attach_functions`); this is its name
in the pass vocabulary. Returns (model, counts), counts = nodes per op, e.g. {"PagedAttention": 18}.
"""

from __future__ import annotations

from walkforge.plugins import attach_functions as attach_plugin_functions

__all__ = ["attach_plugin_functions"]
