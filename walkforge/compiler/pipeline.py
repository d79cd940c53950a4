"""The compile pipeline: load → trace → passes → check → build → package.

Each stage takes the shared `Job`, does one thing and returns counts that are logged and
recorded in the manifest. A stage failure raises `CompileError` naming the stage and the
stages that finished. Everything is written into a staging directory that becomes the
bundle only after `package` succeeds.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from safetensors.torch import save_file

import walkforge
from walkforge import plugins
from walkforge.artifacts.bundle import staged_bundle, write_manifest
from walkforge.compiler.check import agreement, worst
from walkforge.compiler.export import OPSET, export_walk, op_counts
from walkforge.compiler.progress import Progress
from walkforge.errors import CompileError, WalkforgeError
from walkforge.recipes import get_recipe, get_variant
from walkforge.recipes.configs import from_dict, load_overrides, to_dict
from walkforge.recipes.weights import fingerprint, load_strict
from walkforge.runtimes.onnxruntime import OrtEngine, to_numpy

log = logging.getLogger(__name__)
CHECK_REL_TOL = 1e-3  # fp32 ONNX vs torch, relative to output scale: catches broken exports
WEIGHTS_FILE = "weights/model.safetensors"


@dataclass
class CompileRequest:
    """What to compile. Without `checkpoint`, weights are seeded random (`seed`)."""

    recipe: str
    out: Path
    variant: str | None = None
    checkpoint: Path | None = None
    config_file: Path | None = None
    seed: int = 0
    force: bool = False


@dataclass
class Job:
    request: CompileRequest
    stage_dir: Path
    progress: Progress
    recipe: Any = None
    cfg: Any = None
    model: torch.nn.Module | None = None
    walks: Any = None
    manifest: dict[str, Any] = field(default_factory=dict)


def load(job: Job) -> dict[str, int]:
    req = job.request
    job.recipe = get_recipe(req.recipe)
    if req.checkpoint is not None:
        if req.variant is not None:
            raise WalkforgeError("give either --variant or --checkpoint, not both")
        job.cfg, tensors = job.recipe.read_checkpoint(Path(req.checkpoint))
    else:
        job.cfg, tensors = get_variant(job.recipe, req.variant or "tiny"), None
    if req.config_file is not None:
        job.cfg = from_dict(job.recipe.Config, load_overrides(req.config_file), job.cfg)
    torch.manual_seed(req.seed)
    job.model = job.recipe.build(job.cfg).eval()
    counts = {"parameters": sum(p.numel() for p in job.model.parameters())}
    if tensors is not None:
        counts |= load_strict(job.model, tensors, job.recipe.KEY_MAP)
    state = job.model.state_dict()
    (job.stage_dir / WEIGHTS_FILE).parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(job.stage_dir / WEIGHTS_FILE))
    source = ({"source": "checkpoint", "path": str(req.checkpoint)} if tensors is not None
              else {"source": "random", "seed": req.seed})
    job.manifest |= {
        "recipe": job.recipe.NAME, "variant": req.variant or ("tiny" if tensors is None else None),
        "config": to_dict(job.cfg),
        "weights": {"fingerprint": fingerprint(state), "file": WEIGHTS_FILE, **source, **counts},
    }
    return counts


def trace(job: Job) -> dict[str, int]:
    with torch.no_grad():
        job.walks = job.recipe.walks(job.model, job.cfg)
    (job.stage_dir / "walks").mkdir()
    walks = {}
    for node in job.walks.nodes:
        job.progress.say(f"exporting walk '{node.name}'")
        counts = export_walk(node, job.stage_dir / "walks" / f"{node.name}.onnx")
        walks[node.name] = {"onnx": f"walks/{node.name}.onnx", **node.contract(), "ops": counts}
    job.manifest["walks"] = walks
    job.manifest["plan"] = job.walks.plan()
    job.manifest["edges"] = [e.to_json() for e in job.walks.edges]
    return {"walks": len(walks), "nodes": sum(sum(w["ops"].values()) for w in walks.values())}


PASSES: tuple[Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict[str, int]]], ...] = (
    plugins.attach_functions,
)


def passes(job: Job) -> dict[str, int]:
    totals: dict[str, int] = {}
    for _name, walk in job.manifest["walks"].items():
        path = job.stage_dir / walk["onnx"]
        model = onnx.load(str(path), load_external_data=False)
        for apply in PASSES:
            model, counts = apply(model)
            for key, n in counts.items():
                totals[key] = totals.get(key, 0) + n
        onnx.save(model, str(path))
        walk["ops"] = op_counts(model)
    return totals


def check(job: Job) -> dict[str, int]:
    """Run each walk's ONNX on onnxruntime against the torch module on the example inputs."""
    checks = {}
    for node in job.walks.nodes:
        walk = job.manifest["walks"][node.name]
        engine = OrtEngine(node.name, job.stage_dir / walk["onnx"], walk, spinning=False)
        feeds = {k: v.detach().numpy() for k, v in node.example_inputs.items()}
        got = engine.run(feeds)
        with torch.no_grad():
            want = node.module(*(node.example_inputs[s.name] for s in node.inputs))
        want = want if isinstance(want, tuple) else (want,)
        result = worst([agreement(to_numpy(got[s.name]), w.numpy().astype("float64"))
                        for s, w in zip(node.outputs, want, strict=True)])
        checks[node.name] = result.to_json()
        job.progress.say(f"{node.name}: max abs {result.max_abs:.2e}, cosine {result.cosine:.7f}")
        if result.rel > CHECK_REL_TOL:
            raise WalkforgeError(f"walk '{node.name}' ONNX disagrees with torch: relative error "
                                 f"{result.rel:.2e} > {CHECK_REL_TOL:.0e}")
    job.manifest["check"] = checks
    return {"walks_checked": len(checks)}


def build(job: Job) -> dict[str, int]:
    """The `cpu` target runs the walk ONNX files directly on onnxruntime's CPU provider."""
    import onnxruntime as ort

    job.manifest["targets"] = {"cpu": {
        "backend": "onnxruntime", "provider": "CPUExecutionProvider",
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "opset": OPSET},
        "walks": {name: w["onnx"] for name, w in job.manifest["walks"].items()},
    }}
    return {"targets": 1}


def package(job: Job) -> dict[str, int]:
    job.manifest = write_manifest(job.stage_dir, job.manifest)
    return {"files": len(job.manifest["files"]),
            "bytes": sum(f["size"] for f in job.manifest["files"].values())}


STAGES = (("load", load), ("trace", trace), ("passes", passes), ("check", check),
          ("build", build), ("package", package))


def compile_bundle(request: CompileRequest, progress: Progress | None = None) -> dict[str, Any]:
    """Compile `request` into a bundle at `request.out`; return the manifest."""
    progress = progress or Progress(enabled=False)
    with staged_bundle(Path(request.out), force=request.force) as stage_dir:
        job = Job(request, stage_dir, progress)
        job.manifest = {"walkforge_version": walkforge.__version__,
                        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        "precision": {"weights": "fp32", "activations": "fp32", "kv": "fp32",
                                      "calibration": None}}
        done: list[str] = []
        with progress.stages(len(STAGES)):
            for name, stage in STAGES:
                progress.begin(name)
                try:
                    counts = stage(job)
                except CompileError:
                    raise
                except WalkforgeError as exc:
                    raise CompileError(name, done, str(exc)) from None
                log.info("%s: %s", name, counts)
                job.manifest.setdefault("stages", {})[name] = counts
                done.append(name)
                progress.end(name, counts)
        return job.manifest
