"""Runtime fronts by name: the API `walkforge.load` returns for a bundle.

A recipe declares its front's name and the compiler stamps it into the manifest (`front`;
bundles from before that field name their recipe, which is the same name), so the runtime
never imports a recipe to choose one. A new front is one module plus one line here.
"""

from __future__ import annotations

import importlib

from walkforge.errors import WalkforgeError

FRONTS = {
    "pi0": "walkforge.runtimes.fronts.flow:FlowPolicy",
    "pi05": "walkforge.runtimes.fronts.flow:FlowPolicy",
    "smolvla": "walkforge.runtimes.fronts.flow:FlowPolicy",
    "vae": "walkforge.runtimes.fronts.vae:VaeDecoder",
    "bagel": "walkforge.runtimes.fronts.bagel:BagelGenerator",
}


def front_class(name: str) -> type:
    """The class of the front the manifest's `front` names."""
    if name not in FRONTS:
        raise WalkforgeError(f"bundle front '{name}' is not in this walkforge; known: {', '.join(FRONTS)}")
    module, cls = FRONTS[name].split(":")
    return getattr(importlib.import_module(module), cls)
