"""The manifest's schema: every entry of `manifest.json`, what it means and the release that added it.

Read a manifest through these types rather than by its raw keys. A bundle's reader calls
`Manifest.from_json`, which first brings an older format to the current one (`upgrade`, the one
place old bundles are handled) and then gives typed sections; `to_json` gives the same JSON back,
key for key and in the same order, so a bundle the compiler writes round-trips exactly
(tests/artifacts/test_manifest.py). The compiler builds the manifest as a dict and writes it
with `write_manifest`.

Sections the runtime reads are frozen dataclasses, fields in the order the compiler writes them.
An optional field is None when its key is absent; where absent and null mean different things the
field is `ABSENT` when absent. A key this walkforge does not know is kept in the section's `extra`
and written after the known ones. Records written for people and tools (stages, check, TensorRT
lint, calibration details, kernel records, the recipe's config) stay JSON (`Json`): their shape
belongs to the code that writes them.

Format versions (docs/bundle.md "Format versions"):
  1  walkforge 0.1 – 0.3.4; fields were added in 0.2, 0.3, 0.3.2 and 0.3.3 without a bump.
  2  walkforge 0.4.0: the policy entry's `lerobot`, `processors`, `relative_actions` and
     `prompt_state_dims`. A 0.3 runtime would ignore them and return other actions, so it must
     refuse these bundles, which the bump makes it do.
  3  walkforge 0.5.0: the policy entry's `steps`, LeRobot's processing as a list of named steps
     (runtimes/processors/steps.py runs them), which now decides the processing instead of the
     model kind; older bundles get the steps their kind ran (`_from_2`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from walkforge.artifacts.schema import Malformed

FORMAT = "walkforge-bundle"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
Json = Any  # a JSON value kept as parsed: its shape is documented where it is written


class _Absent:
    """The value of a field whose key is not in the manifest (where null means something else)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


# -- how a section maps to JSON ---------------------------------------------------------------

def _key(*, key: str | None = None, codec: tuple[Callable, Callable] | None = None,
         default: Any = dataclasses.MISSING) -> Any:
    """A section field: its JSON `key` (default: the field's name), `codec` (decode, encode) for
    a nested section, and `default` when the key is absent (none: required)."""
    return field(default=default, metadata={"key": key, "codec": codec})


@dataclass(frozen=True, kw_only=True)
class Section:
    """One JSON object of the manifest (module doc)."""

    extra: Mapping[str, Json] = field(default_factory=dict)
    """Keys this walkforge does not know, in file order."""

    @classmethod
    def from_json(cls, data: Any, entry: str) -> Self:
        if not isinstance(data, Mapping):
            raise Malformed(f"{entry or 'the manifest'} is not an object")
        values, known = {}, set()
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            key, codec = f.metadata["key"] or f.name, f.metadata["codec"]
            known.add(key)
            if key in data:
                value = data[key]
                at = f"{entry}.{key}" if entry else key
                values[f.name] = codec[0](value, at) if codec and value is not None else value
            elif f.default is dataclasses.MISSING:
                raise Malformed(f"{entry or 'the manifest'} lacks {key!r}")
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Json]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is ABSENT or (value is None and f.default is None):
                continue
            codec = f.metadata["codec"]
            out[f.metadata["key"] or f.name] = codec[1](value) if codec and value is not None else value
        return out | dict(self.extra)


def _one(cls: type[Section]) -> tuple[Callable, Callable]:
    return cls.from_json, cls.to_json


def _each(cls: type[Section]) -> tuple[Callable, Callable]:
    """A JSON object of sections, by name."""
    def decode(data: Any, entry: str) -> dict[str, Section]:
        if not isinstance(data, Mapping):
            raise Malformed(f"{entry} is not an object")
        return {k: cls.from_json(v, f"{entry}.{k}") for k, v in data.items()}
    return decode, lambda table: {k: v.to_json() for k, v in table.items()}


def _rows(cls: type[Section]) -> tuple[Callable, Callable]:
    """A JSON list of sections."""
    def decode(data: Any, entry: str) -> tuple[Section, ...]:
        if not isinstance(data, list):
            raise Malformed(f"{entry} is not a list")
        return tuple(cls.from_json(v, f"{entry}[{i}]") for i, v in enumerate(data))
    return decode, lambda rows: [r.to_json() for r in rows]


# -- sections -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Precision(Section):
    weights: str = _key()
    """Number format of the GEMM weights: fp32, fp8, int8 or bf16. Since 0.1 (int8, bf16: 0.3)."""
    activations: str = _key()
    """Number format of the GEMM activations, as `weights`. Since 0.1."""
    kv: str = _key()
    """The KV page pool's format: fp32 or fp8_e4m3. Since 0.1."""
    calibration: Json = _key()
    """fp8/int8: how the Q/DQ scales were found (compiler/quantize.py: dtype, method, samples,
    scales file, end-to-end accuracy, gate, int8 `weight_max` since 0.3.2, `weight_bits` since
    0.3.3); null otherwise. Since 0.1."""
    int8_weight_max: int | None = _key(default=None)
    """int8: the weights' range, 63 (7 bits) or 127 (8 bits). Since 0.3.2 (older int8: 127)."""
    bf16_check: Json = _key(default=None)
    """bf16: the emulated end-to-end check against fp32 (compiler/passes.py). Since 0.3."""


@dataclass(frozen=True, kw_only=True)
class Feature(Section):
    key: str = _key()
    """The LeRobot feature name (`observation.state`, `action`)."""
    dim: int = _key()
    """Its length in the robot's units, before padding to the model's max dim."""


@dataclass(frozen=True, kw_only=True)
class Camera(Section):
    key: str = _key()
    """The LeRobot feature name of a compiled view, in the model's view order."""
    empty: bool = _key()
    """An empty camera (LeRobot's `empty_cameras`): always masked, never read from an observation."""


@dataclass(frozen=True, kw_only=True)
class LerobotRelease(Section):
    release: str = _key()
    """The LeRobot release whose processing the bundle reproduces (recipes/lerobot_release.py)."""
    how: str = _key()
    """How it was decided: `--lerobot-version`, a marker in the folder, or the newest by default."""
    certain: bool = _key()
    """False when nothing in the folder said which release wrote it."""


@dataclass(frozen=True, kw_only=True)
class Processors(Section):
    files: list[str] = _key()
    """The processor JSONs read: policy_preprocessor.json and policy_postprocessor.json."""
    from_: str = _key(key="from")
    """Where they were: `folder` (the checkpoint's) or `--processors`."""


@dataclass(frozen=True, kw_only=True)
class RelativeActions(Section):
    mask: list[float] = _key()
    """Per action dim, 1 where the observation's raw state is added back to the action."""
    exclude_joints: list[Json] | _Absent = _key(default=ABSENT)
    """LeRobot's relative_actions_processor setting the mask came from."""
    action_names: list[str] | None | _Absent = _key(default=ABSENT)
    """The action names that setting refers to (null: dims by position)."""


@dataclass(frozen=True, kw_only=True)
class PolicySteps(Section):
    pre: list[Json] = _key()
    """Observation → walk inputs: named steps in order, each {"name": …, its settings}
    (runtimes/processors/steps.py lists them)."""
    post: list[Json] = _key()
    """Model-space chunk → robot actions, the same way."""


@dataclass(frozen=True, kw_only=True)
class Policy(Section):
    """pi0 / pi05: what LeRobot's processors need, read at compile time (recipes/lerobot.py);
    runtimes/processors/policy.py runs them. Since 0.3 unless said."""

    type: str = _key()
    """pi0 or pi05."""
    cameras: tuple[Camera, ...] = _key(codec=_rows(Camera))
    """The compiled views in order."""
    image_resolution: list[int] = _key()
    """[height, width] every camera image is resized (with padding) to."""
    state: Feature = _key(codec=_one(Feature))
    """The robot state's feature name and dim."""
    action: Feature = _key(codec=_one(Feature))
    """The action's feature name and dim."""
    max_state_dim: int = _key()
    """The state padded to this many dims (the model's)."""
    max_action_dim: int = _key()
    """The model's action width; the chunk is cut to `action.dim`."""
    chunk_size: int = _key()
    """Actions per chunk (the model's horizon)."""
    n_action_steps: int = _key()
    """Actions `select_action` hands out from one chunk before computing the next."""
    tokenizer_max_length: int = _key()
    """Prompt tokens, padded or cut to this."""
    normalization: dict[str, str] = _key()
    """LeRobot's mode per feature type (VISUAL, STATE, ACTION): IDENTITY, MEAN_STD, MIN_MAX, QUANTILES."""
    stats: str | None = _key()
    """Bundle path of the normalisation stats (safetensors); null: none (all IDENTITY)."""
    tokenizer: Json = _key()
    """{dir, files} of the bundled tokenizer (`--tokenizer`); null: none bundled."""
    hub_tokenizer: str | None = _key()
    """The hub tokenizer the processor names (for the error that asks for `--tokenizer`)."""
    source: str = _key()
    """`lerobot` (read from a LeRobot folder) or `variant` (random weights, IDENTITY modes)."""
    lerobot: LerobotRelease | None = _key(codec=_one(LerobotRelease), default=None)
    """The LeRobot release whose semantics apply. Since 0.4.0; absent: not recorded (a variant
    bundle, or one from before 0.4.0)."""
    processors: Processors | None | _Absent = _key(codec=_one(Processors), default=ABSENT)
    """Where the processor JSONs came from; null: a model-only folder (no LeRobot processing,
    `infer` only). Since 0.4.0; absent: present (a variant bundle, or one from before 0.4.0)."""
    relative_actions: RelativeActions | None | _Absent = _key(codec=_one(RelativeActions), default=ABSENT)
    """LeRobot's absolute_actions_processor: the state added back to the actions; null or absent:
    none. Since 0.4.0 (`upgrade` writes null into older LeRobot bundles)."""
    prompt_state_dims: int | None = _key(default=None)
    """pi05: how many state dims are written into the prompt. Since 0.4.0; absent: max_state_dim."""
    steps: PolicySteps | None = _key(codec=_one(PolicySteps), default=None)
    """LeRobot's processing as named steps, what the runtime runs; null: none (a model-only
    folder). Since 0.5.0 (`upgrade` writes those of the bundle's kind into older ones)."""

    @property
    def has_processors(self) -> bool:
        """Whether the bundle carries LeRobot's processing (False: compiled from a model-only folder)."""
        return self.processors is not None

    @property
    def state_dims_in_prompt(self) -> int:
        """pi05: the state dims its prompt holds."""
        return self.max_state_dim if self.prompt_state_dims is None else self.prompt_state_dims


@dataclass(frozen=True, kw_only=True)
class BundledTokenizer(Section):
    file: str = _key()
    """Bundle path of BAGEL's tokenizer.json."""


@dataclass(frozen=True, kw_only=True)
class Weights(Section):
    fingerprint: str = _key()
    """sha256 of the weights as compiled (`--reuse-calibration` checks it). Since 0.1."""
    file: str | None = _key(default=None)
    """Bundle path of the fp32 reference weights (the torch backends); absent: a deployment
    bundle (`--no-reference-weights`). Since 0.1."""
    source: str = _key()
    """`checkpoint` or `random`. Since 0.1."""
    path: str | None = _key(default=None)
    """The checkpoint compiled (source checkpoint)."""
    seed: int | None = _key(default=None)
    """The random model's seed (source random)."""
    parameters: int | None = _key(default=None)
    """Parameter count. Further counts of the checkpoint's tensors follow in `extra`."""
    reference: bool | None = _key(default=None)
    """false on a deployment bundle. Since 0.3."""


@dataclass(frozen=True, kw_only=True)
class Walk(Section):
    """One engine's graph and tensor contract. Since 0.1."""

    onnx: str = _key()
    """Bundle path of the walk's ONNX graph (weights in `<onnx>.data`)."""
    inputs: list[Json] = _key()
    """Input tensors in order, each {name, dtype, shape} (graphs.walk.TensorSpec; a named dim is dynamic)."""
    outputs: list[Json] = _key()
    """Output tensors, as `inputs`."""
    aliases: dict[str, str] = _key(default=None)
    """Output → input whose buffer it updates in place (the KV page pool)."""
    ops: dict[str, int] = _key(default=None)
    """Node count per op type."""


@dataclass(frozen=True, kw_only=True)
class Paging(Section):
    """The KV page pool's size rule (runtimes/chain.py). Since 0.2; absent: the walks keep no KV."""

    max_tokens: int = _key()
    """KV tokens one request may need (its longest prefix)."""
    page_size: int = _key()
    """Tokens per page (plugins/constants.py)."""


@dataclass(frozen=True, kw_only=True)
class Target(Section):
    """Engines built into the bundle. Since 0.1; `cpu` is always there, `trt-<sm>-<ver>` after
    `walkforge build`."""

    backend: str = _key()
    """onnxruntime or tensorrt."""
    provider: str | None = _key(default=None)
    """onnxruntime's execution provider."""
    gpu: str | None = _key(default=None)
    """TensorRT: the GPU model it was built on."""
    compute_capability: str | None = _key(default=None)
    """TensorRT: that GPU's compute capability ("9.0")."""
    versions: dict[str, Json] = _key()
    """The toolchain's versions (onnxruntime, onnx, opset; tensorrt, cuda)."""
    profile: Json = _key(default=None)
    """TensorRT: the optimisation profile {name, max_batch}."""
    walks: dict[str, str] = _key()
    """Walk → bundle path of its engine (ONNX graph or TensorRT plan)."""
    timing_cache: str | None = _key(default=None)
    """TensorRT: bundle path of the timing cache."""
    build_log: str | None = _key(default=None)
    """TensorRT: bundle path of the build log."""
    plugins: Json = _key(default=None)
    """TensorRT: the plugins registered for the build."""

    @property
    def tensorrt_version(self) -> str | None:
        """TensorRT: the version its engines were built with (`versions.tensorrt`, since 0.1);
        None for an onnxruntime target."""
        return self.versions.get("tensorrt")


@dataclass(frozen=True, kw_only=True)
class KvCache(Section):
    """`--kv-dtype fp8`: the pool's format and per-layer scales (compiler/kv_cache.py). Since 0.1."""

    dtype: str = _key()
    """The pool's element type in the kernels (float8_e4m3fn)."""
    scales: list[list[float]] | None = _key(default=None)
    """[K, V] scale per layer: stored = E4M3(x / scale)."""
    amax: list[list[float]] | None = _key(default=None)
    """[K, V] calibrated absolute maximum per layer."""
    scales_file: str | None = _key(default=None)
    """Bundle path of the amax and scales (safetensors)."""
    samples: int | None = _key(default=None)
    """Calibration samples."""
    method: str | None = _key(default=None)
    """Calibration method."""
    vs_fp32: Json = _key(default=None)
    """Actions with the fp8 pool against the fp32 pool: max_abs, rel, cosine."""


@dataclass(frozen=True, kw_only=True)
class FileEntry(Section):
    sha256: str = _key()
    """The file's sha256 (hex)."""
    size: int = _key()
    """Its size in bytes."""


@dataclass(frozen=True, kw_only=True)
class Manifest(Section):
    """A whole manifest in the current format. Top-level entries in the order the compiler writes them."""

    walkforge_version: str = _key()
    """The walkforge that compiled the bundle. Since 0.1."""
    created: str = _key()
    """When, ISO 8601 UTC. Since 0.1."""
    precision: Precision = _key(codec=_one(Precision))
    """Number formats and calibration. Since 0.1."""
    policy: Policy | None = _key(codec=_one(Policy), default=None)
    """pi0/pi05: the LeRobot processing. Since 0.3; absent before (the policy API refuses)."""
    vae: Json = _key(default=None)
    """VAE from diffusers: scaling_factor, shift_factor, latents_mean/std, force_upcast,
    sample_size (recipes/vae/checkpoint.py SCALING_DEFAULTS where absent). Since 0.3."""
    tokenizer: BundledTokenizer | None = _key(codec=_one(BundledTokenizer), default=None)
    """BAGEL: the bundled tokenizer. Since 0.3."""
    recipe: str = _key()
    """The recipe's name (pi0, pi05, vae, bagel). Since 0.1."""
    variant: str | None = _key()
    """The named variant compiled; null for a checkpoint. Since 0.1."""
    config: Json = _key()
    """The recipe's full config (recipes.configs.to_dict / from_dict). Since 0.1."""
    weights: Weights = _key(codec=_one(Weights))
    """Where the weights came from. Since 0.1."""
    front: str = _key()
    """The runtime front to load (runtimes/fronts). Since 0.2; older: the recipe's name."""
    dim_ranges: dict[str, list[int]] = _key()
    """Per symbolic dim, [min, opt, max] for TensorRT profiles. Since 0.2; older: none."""
    stages: Json = _key(default=None)
    """Counts per compile stage. Since 0.1."""
    walks: dict[str, Walk] = _key(codec=_each(Walk))
    """Each walk's graph and tensor contract. Since 0.1."""
    plan: list[Json] = _key()
    """The request's path: walk names, and loops {loop, count, carry, schedule}. Since 0.1."""
    edges: list[Json] = _key(default=None)
    """The walk graph's edges (graphs.walk.GraphEdge). Since 0.1."""
    paging: Paging | None = _key(codec=_one(Paging), default=None)
    """The KV page pool's size. Since 0.2; a KV bundle from before must be recompiled."""
    check: Json = _key(default=None)
    """Each walk's ONNX output against its torch module: max_abs, rel, cosine. Since 0.1."""
    targets: dict[str, Target] = _key(codec=_each(Target))
    """Engines built, by target name. Since 0.1."""
    kv_cache: KvCache | None = _key(codec=_one(KvCache), default=None)
    """The fp8 KV pool. Since 0.1; absent: fp32 pool."""
    kernels: list[Json] | None = _key(default=None)
    """AOT Triton kernel records, one per kernel and architecture (plugins/aot.py; `ptx_target`
    and `ptx_min_driver` since 0.3). Since 0.1."""
    trt_lint: Json = _key(default=None)
    """TensorRT readiness per walk (graphs/trt_lint.py summary). Since 0.1."""
    format: str = _key()
    """Always `walkforge-bundle`."""
    format_version: int = _key()
    """FORMAT_VERSION when written (module doc)."""
    files: dict[str, FileEntry] = _key(codec=_each(FileEntry))
    """sha256 and size of every other file, by bundle path. Since 0.1."""

    @classmethod
    def from_json(cls, data: Any, entry: str = "") -> Self:
        """The typed manifest of `data` in any readable format version (`upgrade`)."""
        return super().from_json(upgrade(data), entry)

    @property
    def has_reference_weights(self) -> bool:
        """Whether the bundle carries the torch reference copy of its weights."""
        return bool(self.weights.file)

    @property
    def kind(self) -> str:
        """"full" (engines and the torch reference weights) or "deployment" (engines only)."""
        return "full" if self.has_reference_weights else "deployment"

    @property
    def pool_dtype(self) -> str:
        """The KV page pool's element type in the kernels, which picks their variant:
        `kv_cache.dtype` (float8_e4m3fn, since 0.1), float32 without `kv_cache`."""
        return "float32" if self.kv_cache is None else self.kv_cache.dtype


# -- old formats --------------------------------------------------------------------------------

def upgrade(data: Mapping[str, Json]) -> dict[str, Json]:
    """`data` in the current format: a copy with what later releases added filled in as those
    bundles ran then; a current manifest is returned as it is. The only place old bundles are read."""
    if not isinstance(data, Mapping):
        raise Malformed("the manifest is not an object")
    if data.get("format_version") == FORMAT_VERSION:
        return dict(data)
    if data.get("format_version") not in (1, 2):
        raise Malformed(f"format_version is {data.get('format_version')!r}, not one of "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    m = copy.deepcopy(dict(data))
    return _from_2(_from_1(m) if m["format_version"] == 1 else m)


def _from_1(m: dict[str, Json]) -> dict[str, Json]:
    """Format 1 (walkforge 0.1 – 0.3.4) → 2. Each step is a field a release added, as the
    runtime of that time read its absence."""
    m.setdefault("front", m.get("recipe"))  # 0.2: the front was the recipe's
    m.setdefault("dim_ranges", {})  # 0.2: TensorRT profiles had no recipe ranges
    precision = m.get("precision")
    if isinstance(precision, dict) and precision.get("weights") == "int8":
        precision.setdefault("int8_weight_max", 127)  # 0.3.2: full-range int8 weights before
    policy = m.get("policy")
    if isinstance(policy, dict) and policy.get("source") == "lerobot":  # as 0.4.0 writes them
        policy.setdefault("relative_actions", None)  # 0.4.0: no relative actions before
        if policy.get("type") == "pi05":
            policy.setdefault("prompt_state_dims", policy.get("max_state_dim"))  # 0.4.0: all of them
    # 0.2's `paging` cannot be filled in: a KV bundle without it must be recompiled (runtimes/chain.py)
    m["format_version"] = 2
    return m


def _from_2(m: dict[str, Json]) -> dict[str, Json]:
    """Format 2 (walkforge 0.4.0) → 3: a policy entry gets the steps its kind ran then."""
    policy = m.get("policy")
    if isinstance(policy, dict) and "steps" not in policy:
        policy["steps"] = None if policy.get("processors", {}) is None else legacy_steps(policy)
    m["format_version"] = 3
    return m


def legacy_steps(policy: Mapping[str, Json]) -> dict[str, list[Json]]:
    """The processing walkforge 0.3 – 0.4 ran for a pi0 / pi05 policy entry, as steps: cameras
    padded in the centre, BOS-first prompts padded to the compiled length; pi0: new line, the
    state normalised and padded; pi05: the state normalised, padded and written into the prompt;
    the chunk cropped, unnormalised and, with relative actions, the state added back."""
    try:
        cams = policy["cameras"]
        pre: list[Json] = [{"name": "cameras", "keys": [c["key"] for c in cams],
                            "empty": [c["key"] for c in cams if c["empty"]],
                            "resolution": list(policy["image_resolution"]), "pad": "center"}]
        norm = policy["normalization"]
        state = [{"name": "normalize", "key": policy["state"]["key"], "mode": norm.get("STATE", "IDENTITY")},
                 {"name": "pad_state", "dim": policy["max_state_dim"]}]
        tokenize = {"name": "tokenize", "max_length": policy["tokenizer_max_length"], "padding": "max_length",
                    "bos": True}
        if policy["type"] == "pi05":
            dims = policy.get("prompt_state_dims") or policy["max_state_dim"]
            pre += [*state, {"name": "state_to_prompt", "dims": dims}, tokenize]
        else:
            pre += [{"name": "newline"}, tokenize, *state]
        post: list[Json] = [{"name": "crop_actions", "dim": policy["action"]["dim"]},
                            {"name": "unnormalize", "key": policy["action"]["key"],
                             "mode": norm.get("ACTION", "IDENTITY")}]
        relative = policy.get("relative_actions")
        if relative:
            post.append({"name": "absolute_actions", "mask": relative["mask"]})
    except (KeyError, TypeError, AttributeError) as exc:
        raise Malformed(f"policy: cannot read the entry of a format-2 bundle ({type(exc).__name__}: {exc})"
                        ) from None
    return {"pre": pre, "post": post}


def as_manifest(manifest: Manifest | Mapping[str, Json]) -> Manifest:
    """`manifest` typed. A dict without format fields is one the compiler is still filling in
    (a staged bundle the compile runs): typed as it will be written, less its file table."""
    if isinstance(manifest, Manifest):
        return manifest
    staged = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": {}}
    return Manifest.from_json(staged | dict(manifest))


# -- on a manifest still being built (the compiler's dict) -------------------------------------

def has_reference_weights(manifest: Mapping[str, Json]) -> bool:
    """Whether the bundle carries the torch reference copy of its weights (`weights.file`); a
    `--no-reference-weights` bundle has its weights once, in the engines' files."""
    weights = manifest.get("weights")
    return isinstance(weights, dict) and bool(weights.get("file"))


def bundle_kind(manifest: Mapping[str, Json]) -> str:
    """"full" (engines and the torch reference weights) or "deployment" (engines only)."""
    return "full" if has_reference_weights(manifest) else "deployment"



# -- reading and writing manifest.json ----------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Json]]:
    """sha256 and size of every file under `root` except the manifest, by relative path."""
    table = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size).to_json()
    return table


def write_manifest(root: Path, manifest: Mapping[str, Json]) -> dict[str, Json]:
    """Fill the format fields and the file table, then write `manifest.json` (itself atomically).
    Written as given, unchecked (tests write damaged ones); the compiler's round-trips through
    `Manifest` exactly (tests/artifacts/test_manifest.py): a new field must be declared above."""
    written = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION}
    written["files"] = file_table(root)
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(written, indent=2, sort_keys=False))
    os.replace(tmp, Path(root) / MANIFEST)
    return written
