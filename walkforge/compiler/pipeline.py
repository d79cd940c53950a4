"""The compile pipeline: load → trace → passes → check → build → kv_cache → calibrate → kernels →
trt_lint → package.

Each stage takes the shared `Job`, does one thing and returns counts that are logged and
recorded in the manifest. A stage failure raises `CompileError` naming the stage and the
stages that finished. Everything is written into a staging directory that becomes the
bundle only after `package` succeeds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
import torch
from safetensors import safe_open

import walkforge
from walkforge.artifacts.bundle import Bundle, staged_bundle, write_manifest
from walkforge.artifacts.space import check_free_space, disk_full_reason, expected_bytes, is_disk_full
from walkforge.compiler.check import agreement, worst
from walkforge.compiler.export import OPSET, export_walk, op_counts, structure_key
from walkforge.compiler.kernels import build_kernels, fp8_warning, plugin_ops
from walkforge.compiler.passes import add_counts, run_pass
from walkforge.compiler.request import (  # noqa: F401 (the request and its vocabularies lived here)
    KV_DTYPES,
    PRECISIONS,
    WEIGHTS_VARIANTS,
    CompileRequest,
)
from walkforge.compiler.runtime_protocol import Runtime
from walkforge.compiler.weights_file import write_safetensors
from walkforge.errors import CompileError, WalkforgeError
from walkforge.graphs.ort import require_onnxruntime
from walkforge.graphs.walk import GraphNode
from walkforge.plugins.constants import PAGE_SIZE
from walkforge.progress import Progress
from walkforge.recipes import Recipe, get_recipe
from walkforge.recipes.configs import from_dict, load_overrides, to_dict
from walkforge.recipes.weights import match_strict

log = logging.getLogger(__name__)
CHECK_REL_TOL = 1e-3  # fp32 ONNX vs torch, relative to output scale: catches broken exports
WEIGHTS_FILE = "weights/model.safetensors"


@dataclass
class Job:
    request: CompileRequest
    stage_dir: Path
    progress: Progress
    runtime: Runtime | None = None  # runs the staged bundle (check, calibration, gates)
    recipe: Recipe | None = None
    cfg: Any = None
    walks: Any = None  # the recipe's walks on a weightless (meta) model, set by `trace`
    manifest: dict[str, Any] = field(default_factory=dict)
    need: int | None = None  # the bundle's expected bytes, from its weights (set by `load`)


def load(job: Job) -> dict[str, int]:
    """Write the model's weights to WEIGHTS_FILE one tensor at a time (`weights_source`: from the
    memory-mapped checkpoint, or a random model): later stages read weights from that file, one
    walk or one tensor at a time. So a full-size pi0 compiles in 24 GiB (peak RSS: docs/benchmarks.md)."""
    req = job.request
    job.recipe = get_recipe(req.recipe)
    overrides = load_overrides(req.config_file) if req.config_file is not None else {}
    if req.checkpoint is not None:
        # the overrides go in first: head counts and sizes are in no tensor shape
        read = job.recipe.read_checkpoint(Path(req.checkpoint), overrides, **checkpoint_options(job))
        job.cfg, tensors = read
        job.manifest |= getattr(read, "manifest", {})  # recipe entries, e.g. the vae's scaling
        for line in policy_notes(job.manifest.get("policy") or {}):
            job.progress.say(line)
            log.warning("%s", line)
        files = dict(getattr(read, "files", {}))  # e.g. pi0's policy/stats.safetensors
    else:
        job.cfg = from_dict(job.recipe.config, overrides, job.recipe.variant(req.variant or "tiny"))
        tensors = None
        job.manifest |= job.recipe.variant_manifest(job.cfg)  # e.g. pi0's default "policy" entry
        files = {}
    if req.tokenizer is not None:
        files |= bundle_tokenizer(job, Path(req.tokenizer))
    specs, tensor_of, counts = weights_source(job, tensors)
    job.need = expected_bytes(sum(t.numel() * t.element_size() for t in specs.values()))
    check_free_space(job.stage_dir, Path(req.out), job.need)
    (job.stage_dir / WEIGHTS_FILE).parent.mkdir(parents=True)
    weights_fingerprint = write_safetensors(job.stage_dir / WEIGHTS_FILE, specs, tensor_of)
    del tensors, tensor_of  # the checkpoint's memory map (or the random model) goes here
    write_extra_files(job.stage_dir, files)
    source = ({"source": "checkpoint", "path": str(req.checkpoint)} if req.checkpoint is not None
              else {"source": "random", "seed": req.seed})
    job.manifest |= {
        "recipe": job.recipe.name, "variant": req.variant or ("tiny" if req.checkpoint is None else None),
        "config": to_dict(job.cfg),
        "weights": {"fingerprint": weights_fingerprint, "file": WEIGHTS_FILE, **source, **counts},
        "front": job.recipe.front,  # the runtime resolves it; it never imports recipes
        "dim_ranges": {k: list(v) for k, v in job.recipe.trt_dims(job.cfg).items()},  # TensorRT ranges
    }
    return counts


def policy_notes(policy: Mapping[str, Any]) -> list[str]:
    """What a LeRobot folder's reading decided that the user should see: an unsure release, a
    model-only folder."""
    notes = []
    if (release := policy.get("lerobot")) and not release["certain"]:
        notes.append(f"warning: LeRobot {release['release']} semantics: {release['how']}")
    if "processors" in policy and policy["processors"] is None:
        notes.append("warning: model-only folder (no policy_preprocessor.json / policy_postprocessor.json): "
                     "the bundle runs infer() but not the policy API; --processors DIR supplies them")
    return notes


# CompileRequest fields a recipe's read_checkpoint takes when it can use them, with what a
# recipe that cannot says.
CHECKPOINT_OPTIONS = {"weights_variant": "reads one weights file",
                      "lerobot_version": "reads no LeRobot folder", "processors": "reads no LeRobot folder"}


# Options a reader also takes when it wants them, used elsewhere by the others (SmolVLA reads the
# VLM's sizes from the `--tokenizer` folder's config.json; every text recipe bundles its tokenizer).
CHECKPOINT_INPUTS = ("tokenizer",)


def checkpoint_options(job: Job) -> dict[str, Any]:
    """The given checkpoint options, each refused in one line by a recipe that takes none, and
    the CHECKPOINT_INPUTS its reader takes."""
    given = {k: getattr(job.request, k, None) for k in (*CHECKPOINT_OPTIONS, *CHECKPOINT_INPUTS)}
    given = {k: v for k, v in given.items() if v is not None}
    takes = inspect.signature(job.recipe.read_checkpoint).parameters
    for name in given:
        if name not in takes and name in CHECKPOINT_OPTIONS:
            flag = "--" + name.replace("_", "-")
            raise WalkforgeError(f"{flag}: recipe '{job.request.recipe}' {CHECKPOINT_OPTIONS[name]}")
    return {k: Path(v) if k in CHECKPOINT_INPUTS else v for k, v in given.items() if k in takes}


def weights_source(job: Job, tensors: Mapping[str, torch.Tensor] | None
                   ) -> tuple[dict[str, torch.Tensor], Callable[[str], torch.Tensor], dict[str, int]]:
    """(the model's state dict on the meta device, name → its tensor, counts) for WEIGHTS_FILE.

    From a checkpoint nothing is built: the keys are matched against a meta-device model
    (recipes.weights.match_strict) and each tensor is converted to the model's dtype only when
    the writer asks for it, so a bf16 checkpoint (memory-mapped) never exists as a whole fp32
    copy. Random weights need the model built for real (its initialisers), once."""
    req = job.request
    model = skeleton(job.recipe, job.cfg, req.walks)
    specs, counts = model.state_dict(), {"parameters": sum(p.numel() for p in model.parameters())}
    if tensors is not None:
        pairs, matched = match_strict(specs, tensors, job.recipe.key_map)
        return specs, lambda name: tensors[pairs[name]].to(specs[name].dtype), counts | matched
    torch.manual_seed(req.seed)
    state = build_model(job.recipe, job.cfg, req.walks).eval().state_dict()
    return specs, state.pop, counts  # pop: each tensor is freed once written


def bundle_tokenizer(job: Job, folder: Path) -> dict[str, bytes | Path]:
    """`--tokenizer`: the recipe checks the folder and says where its files go (its manifest
    entries are merged in); a recipe without text refuses it."""
    if job.recipe.tokenizer is None:
        raise WalkforgeError(f"--tokenizer: recipe '{job.recipe.name}' takes no text prompt")
    entries, files = job.recipe.tokenizer(job.manifest, folder, job.cfg)
    job.manifest |= entries
    return files


def write_extra_files(stage_dir: Path, files: dict[str, bytes | Path]) -> int:
    """Write a recipe's extra bundle files (relative path → bytes, or a file to copy) into the
    staging dir, where the manifest's file table hashes them; return how many."""
    for rel, data in files.items():
        path = PurePosixPath(rel)
        if (path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] == "weights"
                or rel == "manifest.json"):
            raise WalkforgeError(f"bundle file '{rel}': must be a relative path inside the bundle, "
                                 "outside weights/ and not the manifest")
        target = stage_dir.joinpath(*path.parts)
        if target.exists():
            raise WalkforgeError(f"bundle file '{rel}' is given twice")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            shutil.copyfile(data, target)
    return len(files)


def build_model(recipe: Recipe, cfg: Any, walks: tuple[str, ...] = ()) -> torch.nn.Module:
    """`recipe.build(cfg)`, told which walks to hold where the request names them (`--walks`)."""
    if not walks:
        return recipe.build(cfg)
    if "walks" not in inspect.signature(recipe.build).parameters:
        raise WalkforgeError(f"--walks: recipe '{recipe.name}' always compiles all its walks")
    return recipe.build(cfg, walks=tuple(walks))


def skeleton(recipe: Recipe, cfg: Any, walks: tuple[str, ...] = ()) -> torch.nn.Module:
    """The recipe's model without weights: every parameter and buffer on the meta device."""
    with torch.device("meta"):
        return build_model(recipe, cfg, walks).eval()


def trace(job: Job) -> dict[str, int]:
    """Export every walk from a weightless model; stream its weights into `<walk>.onnx.data`."""
    job.walks = job.recipe.walks(skeleton(job.recipe, job.cfg, job.request.walks), job.cfg)
    (job.stage_dir / "walks").mkdir()
    walks, totals = {}, Counter()
    for node in job.walks.nodes:
        job.progress.say(f"exporting walk '{node.name}'")
        key = structure_key(walkforge.__version__, OPSET, job.recipe.name, to_dict(job.cfg),
                            job.request.walks, node.name)
        ops, counts = export_walk(node, job.stage_dir / "walks" / f"{node.name}.onnx",
                                  job.stage_dir / WEIGHTS_FILE, key)
        totals.update(counts)
        walks[node.name] = {"onnx": f"walks/{node.name}.onnx", **node.contract(), "ops": ops}
    job.manifest["walks"] = walks
    job.manifest["plan"] = job.walks.plan()
    job.manifest["edges"] = [e.to_json() for e in job.walks.edges]
    if job.walks.kv_tokens:
        job.manifest["paging"] = {"max_tokens": job.walks.kv_tokens, "page_size": PAGE_SIZE}
    return {"walks": len(walks), "nodes": sum(sum(w["ops"].values()) for w in walks.values()),
            "initializers": totals["initializers"], "weight_bytes": totals["bytes"],
            "transposes_folded": totals["transposes_folded"]}


PASSES = ("attach_functions",)
"""The passes stage's passes (compiler/passes.py); fp8_kv_pool and quantize_fp8 run in the
kv_cache and calibrate stages, which know their scales."""


def passes(job: Job) -> dict[str, int]:
    totals: dict[str, int] = {}
    for _name, walk in job.manifest["walks"].items():
        path = job.stage_dir / walk["onnx"]
        model = onnx.load(str(path), load_external_data=False)
        for name in PASSES:
            model, counts = run_pass(name, model)
            add_counts(totals, counts)
        onnx.save(model, str(path))
        walk["ops"] = op_counts(model)
    return totals


def check(job: Job) -> dict[str, int]:
    """Run each walk's ONNX on onnxruntime against its torch module on the example inputs.

    One walk at a time: the torch reference holds only that walk's weights and is freed
    before onnxruntime loads the same weights.
    """
    checks = {}
    for node in job.walks.nodes:
        walk = job.manifest["walks"][node.name]
        feeds, want = reference(job.recipe, job.cfg, node.name, job.stage_dir / WEIGHTS_FILE,
                                job.request.walks)
        got = onnx_outputs(job.runtime, node.name, job.stage_dir / walk["onnx"], walk, feeds)
        result = worst([agreement(g, w) for g, w in zip(got, want, strict=True)])
        checks[node.name] = result.to_json()
        job.progress.say(f"{node.name}: max abs {result.max_abs:.2e}, cosine {result.cosine:.7f}")
        if result.rel > CHECK_REL_TOL:
            raise WalkforgeError(f"walk '{node.name}' ONNX disagrees with torch: relative error "
                                 f"{result.rel:.2e} > {CHECK_REL_TOL:.0e}")
    job.manifest["check"] = checks
    return {"walks_checked": len(checks)}


def reference(recipe: Recipe, cfg: Any, name: str, weights: Path, walks: tuple[str, ...] = ()
              ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """(example inputs, torch outputs) of walk `name`, its weights read from `weights`.

    The example inputs are copied before torch runs, so a walk that updates an input in place
    (an aliased KV pool) hands onnxruntime the same inputs torch saw.
    """
    node = walk_with_weights(recipe, cfg, name, weights, walks)
    feeds = {k: v.detach().numpy().copy() for k, v in node.example_inputs.items()}
    with torch.no_grad():
        want = node.module(*(node.example_inputs[s.name] for s in node.inputs))
    want = want if isinstance(want, tuple) else (want,)
    return feeds, [w.numpy().astype("float64") for w in want]


def onnx_outputs(runtime: Runtime, name: str, path: Path, walk: dict[str, Any],
                 feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The walk's outputs from the runtime's cpu engine, in contract order; freed on return."""
    got = runtime.walk_engine(name, path, walk, spinning=False).run(feeds)
    return [runtime.to_numpy(got[s["name"]]) for s in walk["outputs"]]


def walk_with_weights(recipe: Recipe, cfg: Any, name: str, weights: Path,
                      walks: tuple[str, ...] = ()) -> GraphNode:
    """Walk `name` of a model that holds real weights for that walk only, read from `weights`.

    The other weights are one-element CPU stand-ins (zero-stride views): a recipe may derive
    its example inputs' device from the model's parameters, and these must be real CPU tensors.
    """
    model = skeleton(recipe, cfg, walks)
    model.load_state_dict({k: torch.zeros((), dtype=t.dtype).expand(t.shape)
                           for k, t in model.state_dict().items()}, assign=True)
    node = recipe.walks(model, cfg).node(name)
    with safe_open(str(weights), framework="pt") as st:
        subset = {k: st.get_tensor(k) for k in node.module.state_dict()}
    node.module.load_state_dict(subset, strict=True, assign=True)
    return node


def build(job: Job) -> dict[str, int]:
    """The `cpu` target runs the walk ONNX files directly on onnxruntime's CPU provider."""
    ort = require_onnxruntime()

    job.manifest["targets"] = {"cpu": {
        "backend": "onnxruntime", "provider": "CPUExecutionProvider",
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "opset": OPSET},
        "walks": {name: w["onnx"] for name, w in job.manifest["walks"].items()},
    }}
    return {"targets": 1}


def kv_cache(job: Job) -> dict[str, int]:
    """--kv-dtype fp8: K/V scales per layer from the fp32 cpu engines, then an fp8 page pool in
    every walk (compiler/kv_cache.py). Runs whatever the precision: fp32 weights may keep an fp8 KV."""
    from walkforge.compiler.calibrate import calibration_samples
    from walkforge.compiler.kv_cache import calibrate_kv

    req = job.request
    if req.kv_dtype == "fp32":
        return {}
    bundle = Bundle(job.stage_dir, job.manifest)
    count = 1 if req.reuse_calibration else req.calib_samples  # reused: one sample, for the check
    samples = calibration_samples(bundle, req.calib_data, count, req.seed)
    entry, counts = calibrate_kv(bundle, samples, job.runtime, job.progress.bar, req.reuse_calibration)
    job.manifest["precision"]["kv"] = "fp8_e4m3"
    job.progress.say(f"fp8 KV cache: actions vs fp32 pool cosine {entry['vs_fp32']['cosine']:.6f}")
    return counts


def calibrate(job: Job) -> dict[str, int]:
    """fp8/int8: calibrate on the fp32 cpu engines (or reuse scales), quantise, gate end to end."""
    from walkforge.compiler.calibrate import calibration_samples
    from walkforge.compiler.quantize import QdqOptions, quantize_bundle

    req = job.request
    if req.precision == "fp32":
        return {}
    bundle = Bundle(job.stage_dir, job.manifest)
    if req.precision == "bf16":
        return _bf16(job, bundle)
    samples = [] if req.reuse_calibration else calibration_samples(
        bundle, req.calib_data, req.calib_samples, req.seed)
    opts = QdqOptions(method=req.calib_method, percentile=req.calib_percentile, reuse=req.reuse_calibration,
                      min_cosine=req.fp8_min_cosine, exclude=req.fp8_exclude, dtype=req.precision,
                      int8_weight_bits=req.int8_weight_bits)
    entry, counts = quantize_bundle(bundle, samples, opts, job.runtime, job.progress.bar)
    job.manifest["precision"]["calibration"] = entry  # quantize_bundle set weights/activations
    e2e, excluded = entry["end_to_end"], entry["gate"]["excluded"]
    job.progress.say(f"{req.precision} vs fp32 end to end: cosine {e2e['cosine']:.6f}, "
                     f"rel err {e2e['rel']:.2e}"
                     + (f"; kept in fp32: {', '.join(excluded)}" if excluded else ""))
    if "weight_bits" in entry:  # int8, --int8-weight-bits auto
        auto = entry["weight_bits"]
        seven, floor = auto["cosine"]["7"], auto["min_cosine"]
        job.progress.say(f"int8 weights: 7 bits (end-to-end cosine {seven:.6f} ≥ {floor})"
                         if auto["bits"] == 7 else
                         f"int8 weights: 8 bits (7 bits gave end-to-end cosine {seven:.6f} < {floor})")
    return counts | {"excluded": len(excluded)}


def _bf16(job: Job, bundle: Bundle) -> dict[str, int]:
    """--precision bf16: no calibration; bf16 GEMM weights and math, checked end to end on CPU."""
    from walkforge.compiler.passes import bf16_bundle

    entry, counts = bf16_bundle(bundle, job.runtime)
    job.manifest["precision"] |= {"weights": "bf16", "activations": "bf16", "bf16_check": entry}
    e2e = entry["end_to_end"]
    job.progress.say(f"bf16 vs fp32 end to end (bf16 GEMMs emulated on CPU): cosine {e2e['cosine']:.6f}, "
                     f"rel err {e2e['rel']:.2e}")
    return counts


def kernels(job: Job) -> dict[str, int]:
    """AOT-compile the plugin kernels the walks use, for every requested GPU architecture."""
    ops = plugin_ops(job.manifest["walks"])
    if not ops or not job.request.gpu_archs:
        return {}
    pool = "float8_e4m3fn" if job.request.kv_dtype == "fp8" else "float32"
    if warning := fp8_warning(job.request.gpu_archs, job.request.kv_dtype, job.request.precision):
        job.progress.say(f"warning: {warning}")
        log.warning("%s", warning)
    records = build_kernels(job.stage_dir, job.request.gpu_archs,
                            {**job.recipe.kernel_shapes(job.cfg), "pool_dtype": pool})
    job.manifest["kernels"] = records
    for r in records:
        job.progress.say(f"{r['kernel']} {r['arch']}: PTX ISA {r['ptx_isa']}, Triton {r['triton_version']}")
    return {"kernels": len(records), "archs": len(job.request.gpu_archs)}


def trt_lint(job: Job) -> dict[str, int]:
    """TensorRT-readiness of every walk. Recorded, never fatal: onnxruntime is the default target."""
    from walkforge.graphs.trt_lint import errors, format_findings, lint_bundle, summary

    by_walk = lint_bundle(job.stage_dir, job.manifest)
    job.manifest["trt_lint"] = summary(by_walk)
    bad = {walk: errors(found) for walk, found in by_walk.items()}
    for line in format_findings(bad).splitlines():
        job.progress.say(f"warning: TensorRT lint: {line}")
        log.warning("TensorRT lint: %s", line)
    n_errors = sum(len(found) for found in bad.values())
    return {"trt_errors": n_errors, "trt_warnings": sum(len(f) for f in by_walk.values()) - n_errors}


def package(job: Job) -> dict[str, int]:
    """Write the manifest with its file table. `--no-reference-weights`: first drop the staged
    WEIGHTS_FILE, which the compile's own checks have used by now; the bundle then carries its
    weights once, in the engines' external data, and the torch backends refuse it."""
    if not job.request.reference_weights:
        drop_reference_weights(job.stage_dir, job.manifest)
    job.manifest = write_manifest(job.stage_dir, job.manifest)
    return {"files": len(job.manifest["files"]),
            "bytes": sum(f["size"] for f in job.manifest["files"].values())}


def drop_reference_weights(stage_dir: Path, manifest: dict[str, Any]) -> None:
    """Remove WEIGHTS_FILE (and its folder when empty) and record the bundle as a deployment one:
    `weights` keeps its fingerprint and counts, loses `file`, gains `reference: false`."""
    path = stage_dir / WEIGHTS_FILE
    path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()
    manifest["weights"] = {k: v for k, v in manifest["weights"].items() if k != "file"} | {"reference": False}


STAGES = (("load", load), ("trace", trace), ("passes", passes), ("check", check), ("build", build),
          ("kv_cache", kv_cache), ("calibrate", calibrate), ("kernels", kernels), ("trt_lint", trt_lint),
          ("package", package))


def compile_bundle(request: CompileRequest, progress: Progress | None = None, *,
                   runtime: Runtime) -> dict[str, Any]:
    """Compile `request` into a bundle at `request.out`, running the staged engines on `runtime`
    (`walkforge.compile_bundle` passes `walkforge.runtimes`); return the manifest."""
    require_onnxruntime()  # check, calibration and gates run on it: say so before minutes of tracing
    progress = progress or Progress(enabled=False)
    with staged_bundle(Path(request.out), force=request.force) as stage_dir:
        job = Job(request, stage_dir, progress, runtime)
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
                except Exception as exc:
                    if not is_disk_full(exc):
                        raise
                    raise CompileError(name, done, disk_full_reason(exc, stage_dir, request.out, job.need)
                                       ) from None
                log.info("%s: %s", name, counts)
                job.manifest.setdefault("stages", {})[name] = counts
                done.append(name)
                progress.end(name, counts)
        return job.manifest
