"""`walkforge` command line: thin click commands, one library call each.

A `WalkforgeError` prints as one line on stderr with exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click
import numpy as np
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape

from walkforge.artifacts.bundle import MANIFEST, enclosing_bundle, manifest_digest
from walkforge.artifacts.manifest import Manifest
from walkforge.artifacts.npz import NPZ_MAX_BYTES, read_npz
from walkforge.artifacts.schema import MAX_STEPS
from walkforge.compiler.request import CompileRequest, Flag
from walkforge.errors import WalkforgeError
from walkforge.runtimes.backends import CHOICES as BACKENDS
from walkforge.tools import render

stdout = Console()
err = Console(stderr=True)


MAX_THREADS = 4 * (os.cpu_count() or 1)
"""--threads: at most 4 × this machine's CPUs (onnxruntime crashes on 100000)."""
MAX_BATCH = 4096
"""--batch of the example inputs (`inputs`, `verify`, `bench`)."""
MAX_INPUT_DIM = 4096
"""--dim NAME=INT: a recipe input size (VAE latents of 4096² decode to 32768² pixels)."""
INPUTS_MAX_BYTES = NPZ_MAX_BYTES
"""`inputs` writes at most what `run --inputs` reads (artifacts/npz.py NPZ_MAX_BYTES)."""


def _settings(values: tuple[str, ...], flag: str = "--dim", least: int = 1,
              most: int = MAX_INPUT_DIM) -> dict[str, int]:
    """NAME=INT pairs of a repeated `flag`, each INT in least..most (a one-line error otherwise)."""
    parsed = {}
    for item in values:
        key, sep, val = item.partition("=")
        if not sep or not val.lstrip("-").isdigit():
            raise WalkforgeError(f"{flag} expects NAME=INT, got '{item}'")
        if not least <= int(val) <= most:
            raise WalkforgeError(f"{flag} {item}: {key} must be in {least}..{most}")
        parsed[key] = int(val)
    return parsed


def _int_range(flag: str, least: int, most: int | None = None) -> Callable:
    """A click callback refusing, in one line before any work, a value of `flag` outside least..most."""
    def check(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
        if value is not None and not (least <= value and (most is None or value <= most)):
            bound = f"≥ {least}" if most is None else f"in {least}..{most}"
            raise WalkforgeError(f"{flag} must be {bound}, got {value}")
        return value
    return check


DIGEST = click.option("--digest", help="Refuse BUNDLE unless its digest (sha256 of manifest.json, as "
                      "`walkforge inspect` prints it) is this one: pin the bundle you tested.")
THREADS = click.option("--threads", type=int, callback=_int_range("--threads", 1, MAX_THREADS),
                       help=f"Intra-op threads of every backend, 1..{MAX_THREADS} (4 × the CPUs; "
                            "default: all physical cores).")


def _not_in_bundle(path: Path, flag: str) -> None:
    """Refuse writing `path` inside a bundle: its files table would no longer match, and every later
    load would refuse it."""
    bundle = enclosing_bundle(path)
    if bundle is not None:
        raise WalkforgeError(f"{flag} {path} is inside bundle {bundle}, which must hold only the files its "
                             "manifest lists (writing there breaks every later load): write it elsewhere")


def _output_file(path: Path, flag: str = "-o") -> Path:
    """`path`, refused in one line before any work where writing it at the end would fail or break
    a bundle: a folder, a path inside a bundle, or one that cannot be written (tried: opened to
    append, or created and removed again)."""
    if path.is_dir():
        raise WalkforgeError(f"{flag} {path} is a folder, not a file to write")
    _not_in_bundle(path, flag)
    existed = os.path.lexists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise WalkforgeError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None
    if not existed:
        with suppress(OSError):
            path.unlink()
    return path


def _replaceable(out: Path, force: bool) -> None:
    """Refuse `--force` onto anything but a bundle (or an empty folder): it replaces the whole
    folder, so a mistyped -o must not take a folder of other files with it."""
    if not force or not os.path.lexists(out):
        return
    if out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir())):
        return
    what = "a folder that is not one" if out.is_dir() else "not a folder"
    raise WalkforgeError(f"--force replaces a bundle, and {out} is {what}; refused (remove it yourself, "
                         "or write elsewhere)")


def _npz_output(path: Path, flag: str = "-o") -> Path:
    """The file numpy's savez writes for `path` (it adds .npz to a name without it), checked as
    `_output_file`: the name every message uses."""
    return _output_file(path if str(path).endswith(".npz") else Path(f"{path}.npz"), flag)


def _checked_arrays(arrays: dict[str, np.ndarray], what: str,
                    text: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """`arrays` read from `what`, refused unless each (but the `text` keys) holds numbers and is not
    empty: a string array or a 0×0 frame is a one-line error here, not a traceback in a front."""
    for key, value in arrays.items():
        if key in text:
            continue
        if value.dtype.kind not in "biuf":
            raise WalkforgeError(f"{what}: '{key}' is {value.dtype} {list(value.shape)}, not numbers")
        if value.size == 0:
            raise WalkforgeError(f"{what}: '{key}' has shape {list(value.shape)}: an empty array")
    return arrays


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage changed.")
@click.version_option(package_name="walkforge")
def cli(verbose: bool) -> None:
    """walkforge: compile robot and generative models into engine bundles and run them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(name)s: %(message)s")


def _compile_params(command: Callable) -> Callable:
    """`compile`'s parameters: one per CompileRequest field, as the field declares it
    (compiler/request.py), in field order."""
    for f in reversed(fields(CompileRequest)):
        command = _param(f.name, f.default, f.metadata["cli"])(command)
    return command


def _param(name: str, default: Any, flag: Flag) -> Callable:
    """The click argument (no flags) or option of one CompileRequest field."""
    if not flag.flags:
        return click.argument(name)
    how: dict[str, Any] = {"help": flag.help, "show_default": flag.show_default, "metavar": flag.metavar}
    if default is MISSING:
        how["required"] = True
    else:
        how["default"] = flag.show(default) if flag.show is not None else default
        how["is_flag"] = isinstance(default, bool)
    if flag.choices:
        how["type"] = click.Choice(list(flag.choices))
    elif flag.path:
        how["type"] = click.Path(path_type=Path, exists=flag.path != "any", file_okay=flag.path != "dir",
                                 dir_okay=flag.path != "file")
    elif flag.type is not None:
        how["type"] = flag.type
    return click.option(*flag.flags, name, **how)


@cli.command("compile")
@_compile_params
def compile_cmd(**values: Any) -> None:
    """Trace RECIPE's walks to ONNX, check them against torch, build targets, write a bundle."""
    from walkforge import compile_bundle
    from walkforge.progress import Progress

    req = CompileRequest.from_cli(values)
    _not_in_bundle(Path(req.out), "-o")
    _replaceable(Path(req.out), req.force)
    manifest = Manifest.from_json(compile_bundle(req, Progress(console=err)))
    size = sum(f.size for f in manifest.files.values())
    err.print(f"[green]wrote[/green] {req.out} ({render.mb(size)}, walks: {', '.join(manifest.walks)})")
    err.print(f"digest {manifest_digest(req.out)}")


@cli.command("config")
@click.argument("recipe")
@click.option("--variant", default="tiny", show_default=True, help="Named config to print.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="JSON file of overrides to apply before printing.")
def config_cmd(recipe: str, variant: str, config_file: Path | None) -> None:
    """Print RECIPE's config for VARIANT as JSON (the format --config accepts)."""
    from walkforge.recipes import get_recipe
    from walkforge.recipes.configs import from_dict, load_overrides, to_dict

    spec = get_recipe(recipe)
    cfg = spec.variant(variant)
    if config_file:
        cfg = from_dict(spec.config, load_overrides(config_file), cfg)
    click.echo(json.dumps(to_dict(cfg), indent=2))


@cli.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--trt-lint", "trt_lint", is_flag=True,
              help="Check each walk for TensorRT readiness (needs no TensorRT); exit 2 on errors.")
def inspect_cmd(bundle: Path, as_json: bool, trt_lint: bool) -> None:
    """Show a bundle's digest, walks (tensor contracts), targets, files and weights fingerprint."""
    from walkforge.artifacts.bundle import Bundle

    opened = Bundle.open(bundle)
    manifest = opened.stored  # as the file holds it, whatever its format version
    if trt_lint:
        from walkforge.graphs.trt_lint import errors, format_findings, lint_bundle

        found = lint_bundle(bundle, manifest)
        click.echo(format_findings(found) or "no TensorRT-readiness findings")
        n_errors = sum(len(errors(f)) for f in found.values())
        if n_errors:
            raise WalkforgeError(f"{n_errors} TensorRT-readiness error(s) in {bundle}")
        return
    if as_json:
        click.echo(json.dumps({**manifest, "digest": opened.digest, "kind": opened.kind}, indent=2))
        return
    stdout.print(f"digest {opened.digest}")
    stdout.print(f"kind {opened.kind}: " + ("engines and the torch reference weights" if opened.kind == "full"
                                            else "engines only (no torch reference weights)"))
    render.show_manifest(stdout, manifest)


@cli.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", required=True, type=click.Choice(["trt"]),
              help="Engines to build on this machine and add to BUNDLE.")
@click.option("--profile", default="default", show_default=True,
              help="TensorRT optimisation profile: single (batch 1), default (batch ≤ 8), large (≤ 32).")
def build_cmd(bundle: Path, target: str, profile: str) -> None:
    """Build BUNDLE's engines for this machine's GPU (TensorRT) and record them in the bundle."""
    from walkforge.progress import Progress
    from walkforge.runtimes.backends.trt.build import build_trt

    entry = build_trt(bundle, profile, Progress(console=err))
    err.print(f"[green]built[/green] {len(entry['walks'])} TensorRT engine(s) for {entry['gpu']} "
              f"(TensorRT {entry['versions']['tensorrt']}) in {bundle}")


@cli.command("inputs")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="npz to write (.npz is added to a name without it).")
@click.option("--batch", default=1, show_default=True, callback=_int_range("--batch", 1, MAX_BATCH),
              help=f"Batch size, 1..{MAX_BATCH}.")
@click.option("--seed", default=0, show_default=True, callback=_int_range("--seed", 0),
              help="Seed of the random inputs (≥ 0).")
@click.option("--dim", "dims", multiple=True,
              help=f"Recipe input size, e.g. height=32 (VAE latents), 1..{MAX_INPUT_DIM}.")
def inputs_cmd(bundle: Path, output: Path, batch: int, seed: int, dims: tuple[str, ...]) -> None:
    """Write example inputs for BUNDLE (valid for `walkforge run`) to an npz."""
    from walkforge.artifacts.bundle import Bundle
    from walkforge.recipes.inputs import example_inputs

    sizes = _settings(dims)
    output = _npz_output(output)
    opened = Bundle.open(bundle)
    one = example_inputs(opened, batch=1, seed=seed, **sizes)
    need = batch * sum(v.nbytes for v in one.values())
    if need > INPUTS_MAX_BYTES:
        raise WalkforgeError(f"--batch {batch}: the inputs would take {need} bytes, over the "
                             f"{INPUTS_MAX_BYTES >> 20} MiB `run --inputs` reads; use a smaller batch")
    feeds = one if batch == 1 else example_inputs(opened, batch=batch, seed=seed, **sizes)
    np.savez(output, **feeds)
    err.print(f"wrote {output}: " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items()))


RUN_MODES = {  # mode → (what chooses it, the flags only it takes); -o's suffix splits --inputs
    "observation": ("--observation", ("--task", "--num-steps")),
    "generate": ("--prompt-ids / --prompt", ("--height", "--width", "--seed", "--num-steps")),
    "arrays": ("--inputs with an npz -o", ("--walk", "--num-steps")),
    "images": ("--inputs with a .png -o", ("--tiled",)),
}
RUN_CHOOSERS = {"--observation": "observation", "--prompt-ids": "generate", "--prompt": "generate",
                "--inputs": "arrays"}


def run_mode(given: Sequence[str], output: Path) -> str:
    """Which of `run`'s modes (RUN_MODES) the `given` long flags choose; a WalkforgeError naming
    the flag when they mix two modes, or choose none."""
    chosen = [RUN_CHOOSERS[f] for f in RUN_CHOOSERS if f in given]
    if not chosen:
        raise WalkforgeError("run needs --inputs NPZ, --observation NPZ (pi0/pi05) or --prompt-ids / "
                             "--prompt (bagel)")
    mode = chosen[0]
    if any(m != mode for m in chosen):
        mine = [f for f in RUN_CHOOSERS if f in given and RUN_CHOOSERS[f] == mode]
        other = [f for f in RUN_CHOOSERS if f in given and RUN_CHOOSERS[f] != mode]
        raise WalkforgeError(f"{' / '.join(mine)} takes no {' / '.join(other)}: run does one thing at a time")
    if mode == "arrays" and output.suffix.lower() == ".png":
        mode = "images"
    for flag in given:
        takers = [m for m, (_, takes) in RUN_MODES.items() if flag in takes]
        if takers and mode not in takers:
            raise WalkforgeError(f"{flag} goes with {' or '.join(RUN_MODES[m][0] for m in takers)}")
    return mode


def _given(ctx: click.Context) -> list[str]:
    """The long flags of the options set on the command line (or the environment), in order."""
    options = [p for p in ctx.command.params if isinstance(p, click.Option)]
    return [next(o for o in p.opts if o.startswith("--")) for p in options
            if ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)]


@cli.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
              help="npz whose keys are the input names `inspect` shows: the plan's outputs (or one "
                   "--walk's) go to an npz -o; vae: a .png -o gets the decoded images.")
@click.option("--observation", "observation_path", type=click.Path(path_type=Path),
              help="pi0/pi05: npz of one raw robot observation keyed by LeRobot feature names (camera "
                   "frames uint8 or float, HWC or CHW; the state; optionally 'noise'); writes the action "
                   "chunk in robot units to -o as 'actions'.")
@click.option("--task", help="pi0/pi05 with --observation: the task text (or a 'task' string in the npz).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="npz to write; a .png path (VAE bundles) writes the images of `to_image` instead: "
                   "that path for batch 1, <stem>-<i>.png per item of a larger batch.")
@click.option("--prompt-ids", help="bagel: the prompt's token ids, comma-separated; writes the generated "
                                   "image to -o (PNG).")
@click.option("--prompt", help="bagel: the prompt as text (bundles with a tokenizer).")
@click.option("--height", default=1024, show_default=True, callback=_int_range("--height", 1, 1 << 16),
              help="bagel: image height (multiple of 16).")
@click.option("--width", default=1024, show_default=True, callback=_int_range("--width", 1, 1 << 16),
              help="bagel: image width (multiple of 16).")
@click.option("--seed", default=0, show_default=True, callback=_int_range("--seed", 0),
              help="bagel: seed of the start noise (≥ 0).")
@click.option("--walk", help="--inputs, npz -o: run one walk only (default: the whole plan through the "
                             "front API).")
@click.option("--backend", default="cpu", show_default=True, type=click.Choice(list(BACKENDS)),
              help="Engine backend; auto picks trt → cuda → torch-cuda → cpu and says why.")
@click.option("--num-steps", type=int, callback=_int_range("--num-steps", 1, MAX_STEPS),
              help=f"Denoising steps, 1..{MAX_STEPS} (pi0, pi05, bagel; default: the compiled config's).")
@click.option("--tiled", is_flag=True, help="PNG output: decode in tiles as diffusers' enable_tiling().")
@THREADS
@DIGEST
def run_cmd(bundle: Path, inputs_path: Path | None, observation_path: Path | None, task: str | None,
            output: Path, prompt_ids: str | None, prompt: str | None,
            height: int, width: int, seed: int, walk: str | None, backend: str,
            num_steps: int | None, tiled: bool, threads: int | None, digest: str | None) -> None:
    """Run BUNDLE one of four ways, chosen by the flags given (a flag of another way is refused):

    \b
      --inputs NPZ -o OUT.npz          the plan (or one --walk) on NPZ's arrays
      --inputs NPZ -o OUT.png          vae: NPZ's latents decoded to images (--tiled)
      --observation NPZ -o OUT.npz     pi0/pi05: one raw robot observation (--task) to actions
      --prompt-ids IDS | --prompt TEXT -o OUT.png
                                       bagel: a generated image (--height, --width, --seed)
    """
    from walkforge.runtimes import load

    mode = run_mode(_given(click.get_current_context()), output)
    output = _npz_output(output) if mode in ("arrays", "observation") else _output_file(output)
    feeds = (_checked_arrays(read_npz(inputs_path, "--inputs"), f"--inputs {inputs_path}")
             if inputs_path is not None else {})
    observation = (_checked_arrays(read_npz(observation_path, "--observation"),
                                   f"--observation {observation_path}", text=("task",))
                   if mode == "observation" else {})
    runner = load(bundle, backend, threads=threads, digest=digest)
    if backend == "auto":
        err.print(f"backend: {runner.backend} ({runner.backend_reason})")
    if mode == "observation":
        _write_actions(runner, observation, task, output, num_steps)
    elif mode == "generate":
        _write_generated(runner, output, prompt_ids, prompt, height, width, seed, num_steps)
    elif mode == "images":
        _write_images(runner, feeds, output, tiled)
    else:
        settings = {"num_steps": num_steps} if num_steps is not None else {}
        result = runner.run_walk(walk, feeds) if walk else runner.run(feeds, **settings)
        np.savez(output, **result)
        err.print(f"wrote {output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in result.items()))


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", default="cpu", show_default=True, help="Backend to compare with torch.")
@click.option("--batch", default=2, show_default=True, callback=_int_range("--batch", 1, MAX_BATCH),
              help=f"Batch of the held-out inputs, 1..{MAX_BATCH}.")
@click.option("--seed", default=1234, show_default=True, callback=_int_range("--seed", 0),
              help="Seed of the held-out inputs (≥ 0).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path),
              help="Also add this result to DIR/bench.md's FP8 accuracy section and plot.")
@click.option("--integrity", is_flag=True,
              help="Only re-hash every file against the manifest (loads trust per-file stamps instead).")
@THREADS
@DIGEST
def verify_cmd(bundle: Path, backend: str, batch: int, seed: int, as_json: bool,
               report_dir: Path | None, integrity: bool, threads: int | None, digest: str | None) -> None:
    """Compare BUNDLE's engines with the fp32 torch reference, per walk and end to end."""
    from walkforge.artifacts.bundle import Bundle
    from walkforge.tools.verify import integrity as check_integrity
    from walkforge.tools.verify import verify

    if report_dir is not None:
        _not_in_bundle(report_dir / "bench.md", "--report")
    if integrity:
        checked = check_integrity(bundle, digest)
        if as_json:
            click.echo(json.dumps(checked, indent=2))
        else:
            stdout.print(f"{bundle}: {checked['files']} files ({render.mb(checked['bytes'])}) re-hashed, "
                         "all match the manifest")
        return
    result = verify(Bundle.open(bundle, digest=digest), backend, batch, seed, threads=threads)
    if report_dir is not None:
        from walkforge.tools.report import add_verify_report

        add_verify_report(result, bundle, report_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render.show_verify(stdout, result)


@cli.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backends", default="cpu,torch,torch-bf16", show_default=True,
              help="Comma-separated backends; each runs in its own process. torch (fp32) and "
                   "torch-bf16 (CPU bf16 autocast) are the references the ratios are to.")
@click.option("--warmup", default=2, show_default=True, callback=_int_range("--warmup", 0),
              help="Untimed runs first.")
@click.option("--iters", default=10, show_default=True, callback=_int_range("--iters", 1),
              help="Timed runs.")
@click.option("--batch", default=1, show_default=True, callback=_int_range("--batch", 1, MAX_BATCH),
              help=f"Batch size of the example inputs, 1..{MAX_BATCH}.")
@THREADS
@click.option("--dim", "dims", multiple=True, help="Recipe input size, e.g. height=32 (VAE latents).")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
              help="npz of the inputs to time (keys as `inspect` shows; `walkforge inputs` writes one) "
                   "instead of the recipe's seeded example inputs; not with --batch / --dim.")
@click.option("--setting", "run_settings", multiple=True,
              help="Front run setting NAME=INT, e.g. num_steps=5 (pi0), tiled=1 or tile_size=512 (VAE).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Also add this bundle to DIR/bench.md and its PNG plots (keeps other bundles' results).")
@DIGEST
def bench_cmd(bundle: Path, backends: str, warmup: int, iters: int, batch: int, threads: int | None,
              dims: tuple[str, ...], inputs_path: Path | None, run_settings: tuple[str, ...], as_json: bool,
              report_dir: Path | None, digest: str | None) -> None:
    """Per-walk and end-to-end latency (median, p90) of each backend vs the torch references."""
    from walkforge.tools.bench import bench

    if report_dir is not None:
        _not_in_bundle(report_dir / "bench.md", "--report")
    report = bench(bundle, tuple(backends.split(",")), warmup, iters, batch, threads, _settings(dims),
                   digest=digest, settings=_settings(run_settings, "--setting", 0, MAX_INPUT_DIM),
                   inputs=inputs_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render.show_bench(stdout, report)
    if report_dir is not None:
        from walkforge.tools.report import add_bench_report

        written = add_bench_report(report, report_dir)
        err.print(f"wrote {', '.join(map(str, written))}")


@cli.command("regress")
@click.option("--recipes", default=None,
              help="Comma-separated recipes (default: every registered recipe); each compiles its tiny "
                   "variant at every precision it declares.")
@click.option("--goldens", "goldens_dir", type=click.Path(path_type=Path),
              help="Folder of <recipe>-tiny-<precision>.json goldens (default: the ones shipped in "
                   "walkforge/tools/goldens).")
@click.option("--update-goldens", is_flag=True,
              help="Write the goldens from this run and print what changed, instead of checking.")
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Keep the compiled bundles here (default: a temporary folder, removed after).")
def regress_cmd(recipes: str | None, goldens_dir: Path | None, update_goldens: bool,
                workdir: Path | None) -> None:
    """Compile each recipe's tiny variant, run fixed inputs and compare with the goldens.

    Exits 1 when a metric (output statistics, accuracy vs torch, op counts, bundle size,
    weights fingerprint) moved beyond its tolerance or a golden is missing.
    """
    from walkforge.progress import Progress
    from walkforge.tools.regress import GOLDENS, regress, show_report

    report = regress(recipes.split(",") if recipes else None, goldens_dir or GOLDENS, update_goldens, workdir,
                     Progress(console=err))
    show_report(stdout, report)
    if not report.ok:
        click.get_current_context().exit(1)


@cli.command("demo")
@click.option("-o", "--output", "out", default=Path("build/pi0-tiny"), show_default=True,
              type=click.Path(path_type=Path), help="Where to write the demo bundle.")
def demo_cmd(out: Path) -> None:
    """Compile the tiny pi0 recipe, run it, and print actions, parity and latency."""
    from walkforge.tools.demo import demo

    _not_in_bundle(out, "-o")
    demo(out, stdout)


@cli.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, help="Port of the websocket and GET /healthz.")
@click.option("--backend", default="cpu", show_default=True, type=click.Choice(list(BACKENDS)),
              help="Backend the engines run on.")
@click.option("--obs-map", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="JSON {client key: bundle key}, e.g. openpi's 'observation/image' → a camera key.")
@click.option("--max-batch", default=8, show_default=True, help="Most requests run as one batch.")
@click.option("--batch-wait-ms", default=2.0, show_default=True,
              help="How long a first request waits for others to join its batch.")
@click.option("--max-queue", default=64, show_default=True, help="Waiting requests beyond this are refused.")
@click.option("--pool-wait-ms", default=5000.0, show_default=True,
              help="How long a request waits for free KV pages before it is refused.")
@click.option("--kv-pages", type=int, help="Page pool size (default: 8 full-length requests).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run the policy as a Ray Serve deployment (walkforge[ray]).")
@click.option("--replicas", default=1, show_default=True, help="--ray: policy replicas.")
@click.option("--address",
              help="--ray: the Ray cluster to join (auto, or HEAD:6379); default: a local one.")
@click.option("--max-frame-mb", default=64.0, show_default=True,
              help="Largest observation frame; a bigger one closes its connection (1009).")
@click.option("--max-inflight-mb", default=256.0, show_default=True,
              help="Bytes of frames being decoded, checked or answered, all connections together; "
                   "more wait unread (backpressure). At least --max-frame-mb.")
@click.option("--max-connections", default=32, show_default=True,
              help="Open websockets; more are refused with HTTP 503.")
@click.option("--max-image-side", default=4096, show_default=True,
              help="Largest camera frame height or width (frames are resized to the model's size).")
@click.option("--decode-threads", default=2, show_default=True,
              help="Threads decoding and checking frames off the event loop.")
@THREADS
@DIGEST
def serve_cmd(bundle: Path, host: str, port: int, backend: str, obs_map: Path | None, max_batch: int,
              batch_wait_ms: float, max_queue: int, pool_wait_ms: float, kv_pages: int | None,
              use_ray: bool, replicas: int, address: str | None, max_frame_mb: float,
              max_inflight_mb: float, max_connections: int, max_image_side: int, decode_threads: int,
              threads: int | None, digest: str | None) -> None:
    """Serve BUNDLE's policy over openpi's websocket protocol until SIGTERM."""
    from walkforge.serving.app import ServeOptions, serve_bundle

    serve_bundle(bundle, ServeOptions(
        host=host, port=port, backend=backend, obs_map=obs_map, max_batch=max_batch,
        batch_wait_ms=batch_wait_ms, max_queue=max_queue, pool_wait_ms=pool_wait_ms, kv_pages=kv_pages,
        threads=threads, ray=use_ray, replicas=replicas, address=address, digest=digest,
        max_frame_mb=max_frame_mb, max_inflight_mb=max_inflight_mb, max_connections=max_connections,
        max_image_side=max_image_side, decode_threads=decode_threads))


@cli.command("client")
@click.argument("address")
@click.option("--observation", "observation", required=True, type=click.Path(path_type=Path),
              help="npz of one observation (camera keys, state, a 0-d string 'task', optional 'noise').")
@click.option("--repeat", default=1, show_default=True, help="Send it this many times (timing).")
@click.option("--timeout", default=30.0, show_default=True,
              help="Seconds to wait for the connection, the metadata and each answer.")
@click.option("--max-answer-mb", default=16.0, show_default=True, help="Largest answer (or metadata) taken.")
def client_cmd(address: str, observation: Path, repeat: int, timeout: float, max_answer_mb: float) -> None:
    """Send one observation to a policy server at HOST:PORT; print the chunk and round-trip time."""
    from walkforge.serving.client import as_observation, describe, round_trip

    obs = as_observation(read_npz(observation, "--observation"))
    meta, answer, times = round_trip(address, obs, repeat, timeout=timeout,
                                     max_answer_bytes=int(max_answer_mb * (1 << 20)))
    stdout.print(escape(describe(meta, answer, times)), highlight=False)


def _write_images(runner, feeds: dict[str, np.ndarray], output: Path, tiled: bool) -> None:
    from walkforge.runtimes.fronts.vae import save_png

    if not hasattr(runner, "to_image") or "latents" not in feeds:
        raise WalkforgeError(f"{output}: PNG output needs a vae bundle and an npz with 'latents'")
    paths = save_png(runner.to_image(feeds["latents"], tiled=tiled), output)
    err.print(f"wrote {', '.join(map(str, paths))}")


def _write_generated(runner, output: Path, prompt_ids: str | None, prompt: str | None, height: int,
                     width: int, seed: int, num_steps: int | None) -> None:
    from walkforge.runtimes.fronts.bagel import to_uint8
    from walkforge.runtimes.fronts.vae import save_png

    if not hasattr(runner, "generate"):
        raise WalkforgeError("--prompt-ids / --prompt: this bundle does not generate images "
                             "(bagel bundles do)")
    try:
        ids = None if prompt_ids is None else [int(x) for x in prompt_ids.split(",") if x.strip()]
    except ValueError:
        raise WalkforgeError(f"--prompt-ids: expected comma-separated integers, got '{prompt_ids}'") from None
    steps = {} if num_steps is None else {"num_timesteps": num_steps + 1}  # N timesteps = N − 1 steps
    image = runner.generate(ids, height, width, seed=seed, prompt=prompt, **steps)
    err.print(f"wrote {', '.join(map(str, save_png(to_uint8(image)[None], output)))}")


def _write_actions(policy: Any, observation: dict[str, Any], task: str | None, output: Path,
                   num_steps: int | None) -> None:
    """pi0/pi05: one raw observation (the npz's arrays keyed by feature names, optional 'noise') →
    the action chunk (chunk_size, action_dim) in robot units, written to `output` as 'actions'."""
    if not hasattr(policy, "predict_action_chunk"):
        raise WalkforgeError(f"--observation: this {policy.bundle.recipe} bundle is not a robot policy")
    observation = dict(observation)
    noise = observation.pop("noise", None)
    if task is not None:
        observation["task"] = task
    elif "task" in observation:
        observation["task"] = str(observation["task"])
    actions = policy.predict_action_chunk(observation, noise=noise, num_steps=num_steps)
    np.savez(output, actions=actions)
    err.print(f"wrote {output}: actions {list(actions.shape)}")


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="walkforge", standalone_mode=False)
    except WalkforgeError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
