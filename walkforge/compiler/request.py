"""What `walkforge compile` takes: `CompileRequest`, each option declared once.

Every field carries its CLI flag, help and check (`option(...)`, read back as a `Flag`); the
`compile` command's click parameters are made from these fields (cli.py), and the request
checks itself against them when built. Adding an option is adding a field here.

`recipe` and `out` may be given by position; every other field is keyword-only. Light on
purpose: the CLI imports this at startup, and a runtime-only install has no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from walkforge.compiler.kernels import DEFAULT_ARCHS, check_archs
from walkforge.errors import WalkforgeError
from walkforge.graphs.qdq import INT8_WEIGHT_BITS

PRECISIONS = ("fp32", "fp8", "int8", "bf16")
KV_DTYPES = ("fp32", "fp8")
WEIGHTS_VARIANTS = ("fp16", "bf16")
CALIB_METHODS = ("max", "percentile")  # compiler.calibrate.METHODS (tests/compiler/test_request.py)


@dataclass(frozen=True)
class Flag:
    """How one `CompileRequest` field appears on `walkforge compile`, and what it accepts.

    flags: its spellings; errors name the first long one. Empty: the command's argument.
    check: a predicate on a given (not None) value; false → "<flag> must be <rule>, got <value>".
    It may raise its own WalkforgeError to say more. Without one, `choices` are the check.
    path: the CLI value is a path; "file" / "dir": one that must exist as such.
    parse: the CLI's value → the field's; show: the inverse, for the CLI's default.
    """

    flags: tuple[str, ...]
    help: str = ""
    check: Callable[[Any], object] | None = None
    rule: str = ""
    choices: tuple[str, ...] = ()
    type: type | None = None
    path: str = ""  # "" | "any" | "file" | "dir"
    metavar: str | None = None
    show_default: bool = False
    parse: Callable[[Any], Any] | None = None
    show: Callable[[Any], Any] | None = None

    @property
    def name(self) -> str:
        return next((f for f in self.flags if f.startswith("--")), "")

    def refuse(self, value: Any) -> None:
        """A one-line WalkforgeError naming this flag, unless `value` (None always) is accepted."""
        if value is None:
            return
        ok = self.check(value) if self.check is not None else not self.choices or value in self.choices
        if not ok:
            rule = self.rule or f"one of {', '.join(self.choices)}"
            raise WalkforgeError(f"{self.name} must be {rule}, got {value!r}")


def option(*flags: str, default: Any = MISSING, **how: Any) -> Any:
    """A `CompileRequest` field with its CLI declaration (`Flag(flags, **how)`)."""
    return field(default=default, metadata={"cli": Flag(tuple(flags), **how)})


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated CLI list ("a,b", "" for none) → its entries."""
    return tuple(n for n in text.split(",") if n)


def _archs(archs: tuple[str, ...]) -> bool:
    check_archs(archs)  # raises, naming the entry that is not like sm_90
    return True


@dataclass
class CompileRequest:
    """What to compile. Without `checkpoint`, weights are seeded random (`seed`).

    Checked when built: a bad setting raises a one-line WalkforgeError naming its option (the
    field's CLI flag) and value, before any work.
    """

    recipe: str = option(help="Registered recipe (`walkforge config RECIPE` prints its config).")
    out: Path = option("-o", "--output", path="any", help="Bundle directory to write (atomically).")
    _: KW_ONLY
    variant: str | None = option(
        "--variant", default=None,
        help="Named config of the recipe (default: tiny). See `walkforge config`.")
    checkpoint: Path | None = option(
        "--checkpoint", default=None, path="any",
        help="Native checkpoint folder (diffusers AutoencoderKL / LeRobot pi0) instead of a variant.")
    config_file: Path | None = option(
        "--config", default=None, path="any",
        help="JSON file of config fields overriding the variant or checkpoint config.")
    seed: int = option("--seed", default=0, show_default=True, help="Seed for random weights and examples.")
    force: bool = option("--force", default=False, help="Replace an existing bundle at OUTPUT.")
    precision: str = option(
        "--precision", default="fp32", choices=PRECISIONS, show_default=True,
        help="fp8: E4M3 Q/DQ on GEMM/conv inputs and weights (TensorRT fuses them; the CPU "
             "target emulates FP8 accuracy, it is not faster). int8: INT8 Q/DQ, static "
             "per-tensor activation scales, per-channel weights (onnxruntime's CPU integer "
             "kernels; TensorRT INT8), see --int8-weight-bits. The --calib-*, --reuse-calibration, "
             "--min-cosine and --fp8-exclude options serve both. bf16: bf16 weights and "
             "GEMM/conv math, fp32 norms/softmax/Euler update (for TensorRT and cuda; the cpu "
             "backend refuses it, the compile checks it on CPU by emulation).")
    # None: auto (graphs.qdq.SEVEN_BIT_MIN_COSINE)
    int8_weight_bits: int | None = option(
        "--int8-weight-bits", default=None, choices=("auto", *map(str, INT8_WEIGHT_BITS)),
        check=lambda bits: bits in INT8_WEIGHT_BITS, rule="7, 8 or None (auto)", show_default=True,
        parse=lambda text: None if text == "auto" else int(text),
        show=lambda bits: "auto" if bits is None else str(bits),
        help="int8: weights at ±127 (8) or ±63 (7). On CPUs without VNNI (AVX2, AVX-512 "
             "without VNNI) 8-bit weights run on onnxruntime's slower exact kernels; 7-bit ones "
             "run exactly on the fast kernels of every x86 CPU (faster there) at a cost in "
             "accuracy (docs/benchmarks.md). "
             "auto: 7 where the end-to-end cosine stays ≥ 0.999 (and --min-cosine), else 8; "
             "the compile says which. VNNI/AMX CPUs and TensorRT run both at one speed.")
    calib_samples: int = option(
        "--calib-samples", default=8, check=lambda n: n >= 1, rule="at least 1", show_default=True,
        help="fp8: seeded synthetic example batches to calibrate on (the recipe's fake_inputs).")
    calib_data: Path | None = option(
        "--calib-data", default=None, path="file",
        help="fp8: npz of recorded front-API inputs (`walkforge inputs` format) to calibrate on.")
    calib_method: str = option(
        "--calib-method", default="max", choices=CALIB_METHODS, show_default=True,
        help="fp8: activation amax = max |x|, or a percentile of |x|.")
    calib_percentile: float = option(
        "--calib-percentile", default=99.99, check=lambda p: 0 < p <= 100, rule="in (0, 100]",
        show_default=True, help="fp8, percentile method: which percentile of |x|.")
    reuse_calibration: Path | None = option(
        "--reuse-calibration", default=None, path="dir",
        help="fp8: take the FP8 scales from this earlier bundle (refused unless its weights "
             "fingerprint matches).")
    # the gate of both Q/DQ dtypes; the field keeps its first name (a public API)
    fp8_min_cosine: float | None = option(
        "--min-cosine", "--fp8-min-cosine", default=None, type=float, check=lambda c: 0 < c <= 1,
        rule="in (0, 1]",
        help="fp8/int8: end-to-end cosine vs fp32 the bundle must reach; the most sensitive "
             "layers are kept in fp32 until it does (they are reported). --fp8-min-cosine is "
             "its old name.")
    fp8_exclude: tuple[str, ...] = option(
        "--fp8-exclude", default=(), parse=_names, show=",".join,
        help="fp8/int8: comma-separated node names or torch module paths to keep in fp32 (besides "
             "the defaults: embeddings, first conv, last projection).")
    kv_dtype: str = option(
        "--kv-dtype", default="fp32", choices=KV_DTYPES, show_default=True,
        help="KV page pool dtype. fp8: E4M3 pages (1 byte per value) with per-layer K/V scales "
             "calibrated on the fp32 engines (uses --calib-samples/--calib-data); works with "
             "either --precision.")
    walks: tuple[str, ...] = option(
        "--walks", default=(), parse=_names, show=",".join,
        help="Comma-separated walks to compile where the recipe offers a choice (vae: decode, or "
             "decode,encode to add the encoder; default: the recipe's own set).")
    weights_variant: str | None = option(
        "--weights-variant", default=None, choices=WEIGHTS_VARIANTS,
        help="Read the checkpoint's <name>.<variant>.safetensors weights (diffusers' variant=); "
             "without it only the plain file is read.")
    gpu_archs: tuple[str, ...] = option(
        "--gpu-archs", default=DEFAULT_ARCHS, check=_archs, parse=_names, show=",".join,
        show_default=True,
        help="GPU architectures to AOT-compile the plugin kernels for (comma-separated; "
             "empty for none). Needs no GPU.")
    tokenizer: Path | None = option(
        "--tokenizer", default=None, path="any",
        help="pi0/pi05: local tokenizer folder (tokenizer.model and/or tokenizer.json) copied "
             "into the bundle, so text prompts work offline.")
    # False: no reference weights file in the bundle (pipeline.WEIGHTS_FILE)
    reference_weights: bool = option(
        "--no-reference-weights", default=True, parse=lambda flag: not flag,
        show=lambda keep: not keep,
        help="Write a deployment bundle: the engines' weights only, without the torch reference "
             "copy (about half the size; the torch backends and `verify` then refuse it).")
    lerobot_version: str | None = option(
        "--lerobot-version", default=None, metavar="X.Y",
        check=lambda v: isinstance(v, str) and re.fullmatch(r"\d+\.\d+(\.\d+)?", v),
        rule="a LeRobot release like 0.5 (X.Y; X.Y.Z reads as X.Y)",
        help="pi0/pi05 LeRobot folders: apply this LeRobot release's processing semantics "
             "(e.g. 0.4, 0.5, 0.6) instead of the one read from the folder.")
    processors: Path | None = option(
        "--processors", default=None, path="any", metavar="DIR",
        help="pi0/pi05: a folder holding policy_preprocessor.json and policy_postprocessor.json "
             "and their stats files, for a checkpoint folder that has none (a model-only folder).")

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["cli"].refuse(getattr(self, f.name))
        if self.variant is not None and self.checkpoint is not None:
            raise WalkforgeError("give either --variant or --checkpoint, not both")
        for name, what in (("weights_variant", "picks a checkpoint's weights file"),
                           ("lerobot_version", "says how to read a LeRobot folder"),
                           ("processors", "completes a LeRobot folder")):
            if getattr(self, name) is not None and self.checkpoint is None:
                raise WalkforgeError(f"--{name.replace('_', '-')} {what}: give --checkpoint")

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> CompileRequest:
        """The request from `walkforge compile`'s values, keyed by field name (each `Flag.parse`d)."""
        names = [f.name for f in fields(cls)]
        if set(values) != set(names):
            raise TypeError(f"compile values {sorted(values)} are not the fields {sorted(names)}")
        parsed = {}
        for f in fields(cls):
            flag, value = f.metadata["cli"], values[f.name]
            parsed[f.name] = flag.parse(value) if flag.parse is not None and value is not None else value
        return cls(**parsed)
