"""`trt` target: TensorRT engines built on the GPU that will run them (`walkforge build --target trt`).

One strongly typed engine per walk (TensorRT >= 10.9; no FP16/INT8 builder flags: precision comes
from the ONNX's tensor types and FP8 Q/DQ), walkforge plugins registered before parsing, one
optimisation profile per walk derived from its TensorSpecs and the manifest (the recipe's
`dim_ranges`, the KV `paging`; no recipe is imported, none is recognised by its config). Files go under
`engines/trt-<sm>-<tensorrt>/`: `<walk>.plan`, `timing.cache` (reused by later builds on the
same GPU) and `build.log`. The manifest gains one target entry and is rewritten atomically.

Nothing here touches TensorRT before `probe()` passes: a TensorRT object made on a machine with
no GPU is dead, and deserialising with it segfaults (docs/toolchain.md). The build itself is thin
Polygraphy loaders.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from walkforge.artifacts.bundle import Bundle, staged_bundle, write_manifest
from walkforge.artifacts.manifest import Manifest, Target, Walk, as_manifest
from walkforge.errors import WalkforgeError
from walkforge.plugins.constants import kv_pages
from walkforge.progress import Progress
from walkforge.runtimes.backends.trt import INSTALL_HINT, gpu_info, probe, require
from walkforge.runtimes.kv_pool import DEFAULT_POOL_REQUESTS

log = logging.getLogger(__name__)

PROFILES: dict[str, int] = {"single": 1, "default": 8, "large": 32}
"""Profile name -> largest batch the engines accept (batch min/opt/max = 1/1/max)."""
KV_DIMS = ("num_pages", "max_pages")
"""KV page dims: pool pages and block-table width (see `kv_ranges`)."""
MAX_POOL_REQUESTS = 32
"""The largest pool a profile accepts, in full-length requests (opt: the runtime's default)."""


# ---------------------------------------------------------------- pure helpers


def plan_dir(sm: str | int, trt_version: str) -> str:
    """Bundle-relative folder of one GPU architecture's engines, e.g. 'engines/trt-sm90-10.9.0.34'.

    `sm` is a compute capability ('9.0'), an arch ('sm_90') or its number (90).
    """
    text = str(sm)
    match = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?a?", text)
    if match is None or not re.fullmatch(r"\d+(\.\d+)*", trt_version):
        raise ValueError(f"bad compute capability {sm!r} or TensorRT version {trt_version!r}")
    return f"engines/trt-sm{match.group(1)}{match.group(2) or ''}-{trt_version}"


def max_batch(profile: str) -> int:
    if profile not in PROFILES:
        raise WalkforgeError(f"unknown TensorRT profile '{profile}'; choose one of "
                             + ", ".join(f"{k} (batch ≤ {v})" for k, v in PROFILES.items()))
    return PROFILES[profile]


def derive_profiles(walk_contract: Walk | Mapping[str, Any], manifest: Manifest | Mapping[str, Any],
                    profile: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Optimisation profile of one walk: input name -> (min, opt, max) shapes.

    Static dims are fixed; `batch` spans 1/1/max_batch(profile); the recipe's `dim_ranges` (in
    the manifest) give theirs; `num_pages`/`max_pages` come from `kv_ranges`. Any other symbolic
    dim is a WalkforgeError naming it (an engine built for a guessed range would fail later).
    """
    manifest = as_manifest(manifest)
    dim_ranges = {k: tuple(v) for k, v in manifest.dim_ranges.items()}
    ranges = {"batch": (1, 1, max_batch(profile)), **dim_ranges, **kv_ranges(manifest)}
    inputs = walk_contract.inputs if isinstance(walk_contract, Walk) else walk_contract["inputs"]
    shapes = {}
    for spec in inputs:
        dims = []
        for dim in spec["shape"]:
            if isinstance(dim, int):
                dims.append((dim, dim, dim))
            elif dim in ranges:
                dims.append(ranges[dim])
            else:
                raise WalkforgeError(f"input '{spec['name']}' has symbolic dim '{dim}' with no TensorRT "
                                     f"range; known: {', '.join(sorted(ranges))}")
        shapes[spec["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return shapes


def kv_ranges(manifest: Manifest | Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the KV page dims from the manifest's `paging`: a request's block table
    holds up to kv_pages(max_tokens) pages; the pool DEFAULT_POOL_REQUESTS (opt) to
    MAX_POOL_REQUESTS (max) full-length requests. None without paging."""
    paging = as_manifest(manifest).paging
    if paging is None:
        return {}
    pages = kv_pages(paging.max_tokens, paging.page_size)
    return {"max_pages": (1, pages, pages),
            "num_pages": (1, DEFAULT_POOL_REQUESTS * pages, MAX_POOL_REQUESTS * pages)}


def target_entry(gpu: str, cc: str, versions: Mapping[str, str | None], walks: Mapping[str, str],
                 profile: str, folder: str, plugins: Mapping[str, str] | None = None) -> Target:
    """The manifest's description of one TensorRT target (`plugins`: what `register_plugins` registered)."""
    return Target(backend="tensorrt", gpu=gpu, compute_capability=cc, versions=dict(versions),
                  profile={"name": profile, "max_batch": PROFILES[profile]}, walks=dict(walks),
                  timing_cache=f"{folder}/timing.cache", build_log=f"{folder}/build.log",
                  plugins=None if plugins is None else dict(plugins))


# ---------------------------------------------------------------- availability

# `probe` (re-exported here) never constructs TensorRT objects; see runtimes/backends/trt.


def _cuda_version() -> str | None:
    import torch

    return torch.version.cuda


# ---------------------------------------------------------------- build


def build_trt(bundle_root: Path | str, profile: str = "default",
              progress: Progress | None = None) -> dict[str, Any]:
    """Build one TensorRT engine per walk of the bundle for this machine's GPU; return the target entry.

    Raises WalkforgeError (never ImportError) when TensorRT or a GPU is missing, when the
    profile is unknown, or when the TensorRT-readiness lint finds errors.
    """
    from walkforge.graphs.trt_lint import errors, format_findings, lint_bundle

    progress = progress or Progress(enabled=False)
    max_batch(profile)
    require()
    bundle = Bundle.open(bundle_root)
    manifest = bundle.typed
    shapes = {name: derive_profiles(walk, manifest, profile) for name, walk in manifest.walks.items()}
    bad = {walk: errors(found) for walk, found in lint_bundle(bundle.root, manifest).items()}
    if any(bad.values()):
        count = sum(len(found) for found in bad.values())
        first = format_findings(bad).splitlines()[0]
        raise WalkforgeError(f"{count} TensorRT-readiness error(s) (see `walkforge inspect --trt-lint`); "
                             f"first: {first}")
    import tensorrt as trt

    from walkforge.plugins.trt_plugins import register_plugins

    gpu, cc = gpu_info()
    folder = plan_dir(cc, trt.__version__)
    registered = register_plugins(bundle.root, manifest, arch=f"sm_{cc.replace('.', '')}")
    log.info("TensorRT %s on %s (compute capability %s); plugins: %s", trt.__version__, gpu, cc, registered)
    walks = _build_engines(bundle, folder, shapes, progress)
    target = target_entry(gpu, cc, {"tensorrt": trt.__version__, "cuda": _cuda_version()}, walks,
                          profile, folder, registered)
    built = dataclasses.replace(manifest, targets={**manifest.targets, Path(folder).name: target})
    write_manifest(bundle.root, _without_format_fields(built.to_json()))
    log.info("built %d TensorRT engine(s) into %s", len(walks), folder)
    return target.to_json()


def _build_engines(bundle: Bundle, folder: str, shapes: Mapping[str, Mapping[str, tuple]],
                   progress: Progress) -> dict[str, str]:
    """Build every walk into a staging folder that replaces `folder` only when all are built
    (artifacts' staged writer: a killed build leaves nothing half-written)."""
    final = bundle.root / folder
    with staged_bundle(final, force=True) as stage:
        cache = stage / "timing.cache"
        if (final / "timing.cache").is_file():
            shutil.copyfile(final / "timing.cache", cache)
        walks = {}
        walks_to_build = bundle.typed.walks
        with _build_log(stage / "build.log"), progress.stages(len(walks_to_build)):
            for name, walk in walks_to_build.items():
                progress.begin(name)
                plan = _build_engine(bundle.root / walk.onnx, shapes[name], cache)
                (stage / f"{name}.plan").write_bytes(plan)
                walks[name] = f"{folder}/{name}.plan"
                progress.end(name, {"plan_bytes": len(plan)})
    return walks


def _build_engine(onnx_path: Path, shapes: Mapping[str, tuple], cache: Path) -> bytes:
    """One strongly typed engine through Polygraphy's loaders (serialised plan bytes)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(profiles=[profile], load_timing_cache=str(cache) if cache.is_file() else None)
    try:
        return bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache))())
    except Exception as exc:  # Polygraphy raises PolygraphyException for parser/builder failures
        raise WalkforgeError(f"TensorRT could not build {onnx_path.name}: {str(exc).splitlines()[0]} "
                             "(details in the build log)") from None


@contextmanager
def _build_log(path: Path):
    """Send Polygraphy's log (TensorRT's builder messages included) to `path` as well."""
    from polygraphy.logger import G_LOGGER

    previous = G_LOGGER.log_file
    G_LOGGER.log_file = str(path)
    try:
        yield
    finally:
        G_LOGGER.log_file = previous


def _without_format_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """write_manifest adds format fields and the file table itself."""
    return {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}


__all__ = ["INSTALL_HINT", "PROFILES", "build_trt", "derive_profiles", "gpu_info", "plan_dir", "probe",
           "require", "target_entry"]
