"""Recipe regression: compile each recipe's tiny variant, run fixed inputs, compare with goldens.

A golden, `walkforge/tools/goldens/<recipe>-<variant>-<precision>.json`, records what compiling the
seeded tiny variant produces: statistics and a few sampled values of each output on fixed
inputs, agreement with the fp32 torch reference (per walk and end to end), ONNX op counts
per walk, bundle size and the weights fingerprint. `regress` compiles again, measures the
same record and judges every metric against its golden with the named tolerances below.
`update=True` rewrites the goldens instead (an explicit act) and reports what changed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError
from walkforge.progress import Progress
from walkforge.recipes import RECIPES, get_recipe
from walkforge.recipes.inputs import example_inputs
from walkforge.runtimes import load
from walkforge.runtimes.values import to_numpy
from walkforge.tools.verify import verify

log = logging.getLogger(__name__)

# What is compiled: each registered recipe's tiny variant at its `precisions`, with its
# fake_inputs' default sizes (vae: latents [B, C, 8, 8]).
VARIANT = "tiny"
COMPILE_SEED = 0  # seeded random weights
INPUT_SEED = 0  # the inputs whose outputs are summarised
VERIFY_SEED = 1234  # the held-out inputs of the torch comparison
BATCH = 2  # pi0: request 0 has a masked camera and a longer prompt than request 1
N_SAMPLES = 8  # output values recorded at fixed, evenly spaced flat indices
GOLDENS = Path(__file__).with_name("goldens")  # package data: works from an installed walkforge

# Tolerances, one per kind of metric.
STAT_RTOL = 1e-4  # mean/std/min/max/samples: |now - golden| <= STAT_RTOL·|golden| + STAT_ATOL·scale,
STAT_ATOL = {"fp32": 1e-5, "fp8": 4e-3}  # scale = the golden output's max |value| (a mean near 0 is
# not judged relatively). fp32: CPUs' kernels differ by ~1e-6 of scale. fp8: such a difference can
# push an activation across an E4M3 rounding midpoint; one flip moved tiny pi0's actions by 1.1e-4
# of scale (Intel Xeon vs AMD EPYC inputs), and goldens written on an AMD EPYC (AVX2) read back on
# an Intel Xeon (AVX-512/AMX) or the other way moved tiny pi0's fp8 and int8 actions by up to
# 1.8e-3 of scale (measured). 4e-3 stays below what a wrong scale or a dropped Q/DQ pair moves (≥ 1e-2).
STAT_ATOL["int8"] = STAT_ATOL["fp8"]  # int8 GEMMs are exact integer sums on every CPU (graphs.ort:
# int8_pairs_saturate); one flipped activation rounding (1/127 of its amax) moves tiny outputs as
# much as an E4M3 flip does
COSINE_DROP = 1e-6  # cosine distance (1 - cosine) vs torch may grow by this much, or (quantized
# goldens) by REL_GROWTH² times: the distance goes as rel²/2, so that is rel's own allowance. Another
# CPU's fp32 kernels moved tiny vae fp8's distance 1.004× (AMD EPYC vs Intel Xeon, measured); a scale
# off by 2× quadruples it.
QUANTIZED = ("fp8", "int8")  # their output samples are shown, not judged: one flipped rounding in a
# stack of convolutions moved single tiny vae fp8 pixels by 4e-2 of scale between those two CPUs
# (their mean/std/min/max moved < 1e-3); the accuracy vs torch is what judges a quantized golden
REL_GROWTH = 2.0  # relative error vs torch may grow up to REL_GROWTH × golden …
REL_FLOOR = 1e-5  # … or up to REL_FLOOR, whichever is larger; max_abs is shown, rel is the gate
SIZE_RTOL = 0.01  # bundle bytes
# Everything else (shapes, op counts per walk, fingerprint, inputs) must match exactly.
STATS = ("mean", "std", "min", "max")
INFO = ("versions",)  # recorded to explain a failure, never judged


@dataclass(frozen=True)
class Check:
    """One metric judged against its golden; `golden`/`now` is None where the metric is absent."""

    metric: str
    golden: Any
    now: Any
    tolerance: str
    ok: bool

    @property
    def moved(self) -> bool:
        return self.golden != self.now


@dataclass
class Result:
    """One recipe × precision: its golden, the fresh record, and the checks (or the diff)."""

    name: str
    golden_path: Path
    record: dict[str, Any] | None = None
    checks: list[Check] = field(default_factory=list)
    problem: str | None = None  # why no checks were made (a missing golden)
    updated: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None and all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@dataclass
class Report:
    results: list[Result]
    update: bool = False

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def regress(recipes: Sequence[str] | None = None, goldens_dir: Path = GOLDENS, update: bool = False,
            workdir: Path | None = None, progress: Progress | None = None, *,
            precisions: Sequence[str] | None = None) -> Report:
    """Compile and measure each recipe's tiny variant per precision; judge it against its golden.

    `update=True` writes the goldens instead and records the old → new diff as the checks.
    Bundles go to `workdir/<recipe>-tiny-<precision>` (kept) or to a temporary directory.
    `precisions` keeps only those of each recipe's precisions (default: all of them).
    """
    names = [name.strip() for name in recipes or RECIPES]
    wanted = {name: get_recipe(name).precisions for name in names}
    if precisions is not None:
        wanted = {name: tuple(p for p in declared if p in precisions) for name, declared in wanted.items()}
    with tempfile.TemporaryDirectory(prefix="walkforge-regress-") as tmp:
        base = Path(workdir) if workdir is not None else Path(tmp)
        results = [_one(name, precision, Path(goldens_dir), update, base, progress)
                   for name in names for precision in wanted[name]]
    return Report(results, update)


def _one(recipe: str, precision: str, goldens_dir: Path, update: bool, base: Path,
         progress: Progress | None) -> Result:
    name = f"{recipe}-{VARIANT}-{precision}"
    result = Result(name, goldens_dir / f"{name}.json")
    golden = read_golden(result.golden_path)
    if golden is None and not update:
        result.problem = (f"no golden at {result.golden_path}; record one with "
                          f"`walkforge regress --recipes {recipe} --update-goldens`")
        return result
    result.record = measure(recipe, precision, base / name, progress)
    if update:
        write_golden(result.golden_path, result.record)
        result.checks = [c for c in diff(golden or {}, result.record) if c.moved]
        result.updated = True
    else:
        result.checks = compare(golden, result.record)
    log.info("%s: %d metrics, %d moved, %d failed", name, len(result.checks),
             sum(c.moved for c in result.checks), len(result.failed))
    return result


# --- measuring ----------------------------------------------------------------------------


def measure(recipe: str, precision: str, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Compile `recipe`'s tiny variant at `precision` into `out` and return its golden record."""
    compile_bundle(_request(recipe, precision, out), progress)
    bundle = Bundle.open(out)
    manifest = bundle.typed
    dims = get_recipe(recipe).input_dims
    torch.manual_seed(INPUT_SEED)
    np.random.seed(INPUT_SEED)
    feeds = example_inputs(bundle, batch=BATCH, seed=INPUT_SEED, **dims)
    outputs = load(bundle, "cpu", spinning=False).run(feeds)
    accuracy = verify(bundle, "cpu", BATCH, VERIFY_SEED, **dims)
    return {
        "recipe": recipe, "variant": VARIANT, "precision": precision,
        "inputs": {"compile_seed": COMPILE_SEED, "input_seed": INPUT_SEED, "verify_seed": VERIFY_SEED,
                   "batch": BATCH, "dims": dims},
        "outputs": {k: output_stats(to_numpy(v)) for k, v in sorted(outputs.items())},
        "accuracy": {part: {k: _agreement(a) for k, a in accuracy[part].items()}
                     for part in ("walks", "end_to_end")},
        "ops": {walk: dict(sorted(w.ops.items())) for walk, w in manifest.walks.items()},
        "bundle_bytes": sum(f.size for f in manifest.files.values()),
        "weights_fingerprint": manifest.weights.fingerprint,
        "versions": _versions(),
    }


def _request(recipe: str, precision: str, out: Path) -> CompileRequest:
    # No AOT kernels: their bytes follow the Triton version, not the recipe's numerics.
    return CompileRequest(recipe, out, variant=VARIANT, seed=COMPILE_SEED, force=True,
                          precision=precision, gpu_archs=())


def output_stats(x: np.ndarray) -> dict[str, Any]:
    """Shape, dtype, mean/std/min/max and N_SAMPLES values at fixed interior flat indices."""
    flat = np.asarray(x, dtype=np.float64).ravel()
    idx = np.unique(np.linspace(0, flat.size - 1, N_SAMPLES + 2)[1:-1].round().astype(int))
    return {"shape": list(x.shape), "dtype": str(x.dtype),
            "mean": _sig(flat.mean()), "std": _sig(flat.std()), "min": _sig(flat.min()),
            "max": _sig(flat.max()), "samples": {str(i): _sig(flat[i]) for i in idx}}


def _agreement(a: dict[str, float]) -> dict[str, float]:
    return {"cosine": round(a["cosine"], 10), "rel": _sig(a["rel"], 3), "max_abs": _sig(a["max_abs"], 3)}


def _sig(x: float, digits: int = 7) -> float:
    """Round to `digits` significant digits (7 ≈ float32), so goldens are short and stable."""
    return float(f"{float(x):.{digits}g}")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# --- goldens ------------------------------------------------------------------------------


def read_golden(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise WalkforgeError(f"golden {path} is not valid JSON ({exc})") from None


def write_golden(path: Path, record: dict[str, Any]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dumps(record) + "\n")
    except OSError as exc:
        raise WalkforgeError(f"cannot write golden {path}: {exc.strerror}") from None


def _dumps(value: Any, indent: int = 0) -> str:
    """JSON with one line per non-empty object member; lists (shapes) stay on one line."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value)
    pad = " " * (indent + 2)
    members = ",\n".join(f"{pad}{json.dumps(k)}: {_dumps(v, indent + 2)}" for k, v in value.items())
    return "{\n" + members + "\n" + " " * indent + "}"


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists (shapes) are leaves."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[Check]:
    """Every field of `old` and `new` as a Check with tolerance 'updated' (all ok)."""
    a, b = flatten(old), flatten(new)
    return [Check(k, a.get(k), b.get(k), "updated", True) for k in dict.fromkeys([*a, *b])]


def compare(golden: dict[str, Any], now: dict[str, Any]) -> list[Check]:
    """Judge every metric of `now` against `golden`; a metric only one side has fails."""
    g, n = flatten(golden), flatten(now)
    scales = {name: max(abs(o["min"]), abs(o["max"])) for name, o in golden.get("outputs", {}).items()}
    precision = golden.get("precision", "fp32")
    atol, quantized = STAT_ATOL[precision], precision in QUANTIZED
    checks = []
    for metric in dict.fromkeys([*g, *n]):
        tolerance, ok = _judge(metric, g.get(metric), n.get(metric), scales, atol, quantized)
        checks.append(Check(metric, g.get(metric), n.get(metric), tolerance, ok))
    return checks


def _judge(metric: str, g: Any, n: Any, scales: dict[str, float], atol: float,
           quantized: bool = False) -> tuple[str, bool]:
    parts = metric.split(".")
    if parts[0] in INFO:
        return "info", True
    if g is None or n is None:
        return "in both", False
    if parts[0] == "outputs" and parts[2] == "samples" and quantized:
        return "info", True
    if parts[0] == "outputs" and parts[2] in (*STATS, "samples"):
        allowed = STAT_RTOL * abs(g) + atol * scales.get(parts[1], 0.0)
        return f"±{allowed:.1e}", abs(n - g) <= allowed
    if parts[0] == "accuracy" and parts[-1] == "cosine":
        distance = 1.0 - g
        limit = max(distance + COSINE_DROP, REL_GROWTH**2 * distance if quantized else 0.0)
        return f"1-cos ≤ {limit:.1e}", 1.0 - n <= limit
    if parts[0] == "accuracy" and parts[-1] == "rel":
        limit = max(REL_GROWTH * g, REL_FLOOR)
        return f"≤ {limit:.1e}", n <= limit
    if parts[0] == "accuracy":
        return "info", True
    if metric == "bundle_bytes":
        return f"±{SIZE_RTOL:.0%}", abs(n - g) <= SIZE_RTOL * g
    return "exact", n == g


# --- rendering ----------------------------------------------------------------------------


def show_report(console: Console, report: Report) -> None:
    """One block per recipe × precision: what moved (or what an update changed), then a verdict."""
    for result in report.results:
        if result.problem:
            console.print(f"[red]FAIL[/red] {result.name}: {escape(result.problem)}", soft_wrap=True)
        elif result.updated:
            _show_update(console, result)
        else:
            _show_checks(console, result)
    if not report.update:
        failed = [r.name for r in report.results if not r.ok]
        verdict = f"[red]regress failed[/red]: {', '.join(failed)}" if failed else "[green]regress ok[/green]"
        console.print(f"{verdict} ({len(report.results) - len(failed)} of {len(report.results)} passed)")


def _show_checks(console: Console, result: Result) -> None:
    moved = [c for c in result.checks if c.moved or not c.ok]
    status = "[green]ok[/green]" if result.ok else "[red]FAIL[/red]"
    console.print(f"{status} {result.name}: {len(result.checks)} metrics vs {result.golden_path.name}, "
                  f"{len(moved)} moved, {len(result.failed)} beyond tolerance")
    if moved:
        table = Table("metric", "golden", "now", "tolerance", "status", title=result.name)
        for c in moved:
            table.add_row(escape(c.metric), _fmt(c.golden), _fmt(c.now), c.tolerance,
                          "ok" if c.ok else "[red]FAIL[/red]")
        console.print(table)
    if not result.ok:
        console.print(f"  if the change is intended: `walkforge regress --recipes "
                      f"{result.name.split('-')[0]} --update-goldens`", soft_wrap=True)


def _show_update(console: Console, result: Result) -> None:
    if not result.checks:
        console.print(f"unchanged: {result.golden_path}", soft_wrap=True)
        return
    if all(c.golden is None for c in result.checks):
        console.print(f"[green]wrote[/green] new golden {result.golden_path} ({len(result.checks)} fields)",
                      soft_wrap=True)
        return
    console.print(f"[green]wrote[/green] {result.golden_path} ({len(result.checks)} fields changed)",
                  soft_wrap=True)
    if result.checks:
        table = Table("field", "old", "new", title=result.name)
        for c in result.checks:
            table.add_row(escape(c.metric), _fmt(c.golden), _fmt(c.now))
        console.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.7g}"
    return escape(str(value))
