"""The recipe registry and the `Recipe` contract, checked for every registered recipe: what the
compiler, regress, the TensorRT builder and the runtime read from it is there and consistent."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

from walkforge.errors import WalkforgeError
from walkforge.recipes import RECIPES, Recipe, get_recipe
from walkforge.recipes.configs import from_dict, to_dict

KV_PAGE_DIMS = {"num_pages", "max_pages"}  # sized from the manifest's "paging", not trt_dims
FRONT_RENAMES = {"noise": "x_t"}  # a front input that feeds a walk input of another name


def tiny_walks(recipe: Recipe):
    cfg = recipe.variant("tiny")
    with torch.device("meta"):
        model = recipe.build(cfg).eval()
    return cfg, recipe.walks(model, cfg)


@pytest.fixture(params=sorted(RECIPES))
def recipe(request: pytest.FixtureRequest) -> Recipe:
    return get_recipe(request.param)


def test_registry_gives_each_package_recipe(recipe: Recipe) -> None:
    assert isinstance(recipe, Recipe)
    assert importlib.import_module(RECIPES[recipe.name]).RECIPE is recipe


def test_declares_a_tiny_variant_of_its_config(recipe: Recipe) -> None:
    tiny = recipe.variant("tiny")
    assert isinstance(tiny, recipe.config)
    assert from_dict(recipe.config, json.loads(json.dumps(to_dict(tiny)))) == tiny


def test_precisions_are_ones_the_compiler_builds(recipe: Recipe) -> None:
    from walkforge.compiler.pipeline import PRECISIONS

    assert recipe.precisions and set(recipe.precisions) <= set(PRECISIONS)


def test_tiny_fake_inputs_fit_the_walk_contracts(recipe: Recipe) -> None:
    cfg, seq = tiny_walks(recipe)
    specs = {s.name: s for node in seq.nodes for s in node.inputs}
    dims: dict[str, int] = {}
    for name, value in recipe.fake_inputs(cfg, batch=3, seed=1).items():
        spec = specs[FRONT_RENAMES.get(name, name)]
        spec.check(value, dims)  # shape, symbolic dims and dtype
    assert dims.pop("batch") == 3
    trt = recipe.trt_dims(cfg)
    assert set(dims) <= set(recipe.input_dims) | set(trt)
    for dim, size in dims.items():  # the default sizes lie in the TensorRT profile
        lo, _, hi = trt[dim]
        assert lo <= size <= hi, dim


def test_every_symbolic_dim_has_a_tensorrt_range(recipe: Recipe) -> None:
    cfg, seq = tiny_walks(recipe)
    symbolic = {d for node in seq.nodes for s in node.inputs for d in s.shape if isinstance(d, str)}
    assert symbolic - {"batch"} - KV_PAGE_DIMS == set(recipe.trt_dims(cfg))
    assert bool(symbolic & KV_PAGE_DIMS) == bool(seq.kv_tokens)  # paged walks say how many tokens


def test_kernel_shapes_are_ints(recipe: Recipe) -> None:
    shapes = recipe.kernel_shapes(recipe.variant("tiny"))
    assert all(isinstance(v, int) for v in shapes.values())
    _, seq = tiny_walks(recipe)
    assert bool(shapes) == bool(seq.kv_tokens)  # today only the paged ops have AOT kernels


def test_front_is_a_runtime_front(recipe: Recipe) -> None:
    from walkforge.runtimes.fronts import FRONTS

    assert recipe.front in FRONTS  # the runtime resolves the manifest's "front" by this name


def test_unknown_names_are_user_errors_with_a_suggestion() -> None:
    with pytest.raises(WalkforgeError, match=r"unknown recipe 'vea' \(did you mean 'vae'\?\)"):
        get_recipe("vea")
    with pytest.raises(WalkforgeError, match=r"no variant 'tinny' \(did you mean 'tiny'\?\); known: "):
        get_recipe("pi0").variant("tinny")


def test_a_recipe_without_tiny_is_refused() -> None:
    vae = get_recipe("vae")
    with pytest.raises(TypeError, match="tiny"):
        dataclasses.replace(vae, variants={"sd": vae.variant("sd")})
    with pytest.raises(TypeError, match="trt_dims"):
        dataclasses.replace(vae, trt_dims=lambda cfg: {"height": (64, 8, 128)})


# --- package layout ------------------------------------------------------------------------

def sibling_imports(package: str) -> dict[str, set[str]]:
    """module → the modules of the same package it imports (parsed, not executed)."""
    folder = Path(importlib.import_module(package).__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    found: dict[str, set[str]] = {}
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == package:
                deps |= {a.name for a in node.names} & modules
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
                deps.add(node.module.removeprefix(package + "."))
        found[name] = deps
    return found


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_config_imports_no_sibling_and_checkpoint_only_config(name: str) -> None:
    deps = sibling_imports(RECIPES[name])
    assert {"config", "model", "walks", "checkpoint"} <= set(deps)
    assert deps["config"] == set()  # config is read by all, reads none of them: no import circle
    assert deps["checkpoint"] <= {"config"}
    assert deps["model"] <= {"config"}
