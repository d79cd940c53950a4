"""Recipe regression (`walkforge regress`) and the bench report writer.

test_regress_passes_against_stored_goldens runs the real regression against the stored goldens,
one recipe × precision per test (what CI relies on: `.ci/run` runs no second `walkforge regress`);
the other tests measure nothing (their records are the goldens themselves) or only the tiny VAE.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from walkforge.cli import cli
from walkforge.errors import WalkforgeError
from walkforge.recipes import RECIPES, get_recipe
from walkforge.tools import regress as rg

GOLDENS = rg.GOLDENS  # shipped as package data
CASES = [(k, p) for k in RECIPES for p in get_recipe(k).precisions]  # what `walkforge regress` judges


def golden_measure(recipe: str, precision: str, out: Path, progress: object = None) -> dict:
    """A stand-in for `rg.measure` that compiles nothing: the stored golden is the fresh record."""
    return rg.read_golden(GOLDENS / f"{recipe}-{rg.VARIANT}-{precision}.json")


@pytest.fixture
def session_compiles(compiled, monkeypatch: pytest.MonkeyPatch) -> None:
    """regress's compiles taken from the session's bundle cache (tests/bundles.py): the very request
    `rg.measure` makes, compiled once per session (regress's bagel-tiny-fp32 is also
    test_bagel_runtime's bundle) and copied to where regress keeps its bundle."""

    def compile_bundle(request, progress=None) -> dict:
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)
                  if f.name not in ("recipe", "out", "force")}
        shutil.copytree(compiled(request.recipe, **fields), request.out)
        return json.loads((request.out / "manifest.json").read_text())

    monkeypatch.setattr(rg, "compile_bundle", compile_bundle)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "precision"), CASES, ids=[f"{k}-tiny-{p}" for k, p in CASES])
def test_regress_passes_against_stored_goldens(recipe: str, precision: str, tmp_path: Path,
                                               session_compiles: None) -> None:
    report = rg.regress([recipe], GOLDENS, workdir=tmp_path, precisions=[precision])
    assert [r.name for r in report.results] == [f"{recipe}-tiny-{precision}"]
    failed = {r.name: r.problem or [(c.metric, c.golden, c.now) for c in r.failed] for r in report.results}
    assert report.ok, failed
    assert all(len(r.checks) > 20 for r in report.results)


def test_regress_cli_judges_every_recipe_and_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """`walkforge regress` (no --recipes) covers exactly CASES, passes and exits 0; the compiles and
    measurements themselves are test_regress_passes_against_stored_goldens's, one case each."""
    monkeypatch.setattr(rg, "measure", golden_measure)
    report = rg.regress(None, GOLDENS)
    assert [r.name for r in report.results] == [f"{k}-tiny-{p}" for k, p in CASES]
    assert report.ok and all(len(r.checks) > 20 for r in report.results)
    run = CliRunner().invoke(cli, ["regress"])
    assert run.exit_code == 0, run.output
    assert f"regress ok ({len(CASES)} of {len(CASES)} passed)" in run.output


@pytest.mark.slow
def test_regress_flags_changed_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    import walkforge.recipes.vae as vae_package

    recipe = get_recipe("vae")

    def nudged(cfg: object) -> torch.nn.Module:
        model = recipe.build(cfg)
        with torch.no_grad():
            model.decoder.conv_out.bias.add_(0.05)
        return model

    monkeypatch.setattr(vae_package, "RECIPE", dataclasses.replace(recipe, build=nudged))
    [result] = rg.regress(["vae"], GOLDENS, precisions=["fp32"]).results
    assert result.name == "vae-tiny-fp32"
    failed = {c.metric for c in result.failed}
    assert not result.ok
    assert "weights_fingerprint" in failed
    assert {"outputs.sample.mean", "outputs.sample.min"} <= failed
    assert not any(m.startswith(("ops.", "accuracy.")) for m in failed), failed


def test_update_goldens_writes_then_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = {(k, p): golden_measure(k, p, tmp_path) for k, p in CASES if k == "vae"}
    monkeypatch.setattr(rg, "measure", lambda recipe, precision, out, progress=None:
                        copy.deepcopy(cached[(recipe, precision)]))
    written = rg.regress(["vae"], tmp_path, update=True)
    path = tmp_path / "vae-tiny-fp32.json"
    assert written.ok and written.results[0].updated and path.exists()
    assert json.loads(path.read_text()) == cached[("vae", "fp32")]
    assert rg.regress(["vae"], tmp_path).ok

    golden = json.loads(path.read_text())
    golden["outputs"]["sample"]["mean"] += 1.0
    rg.write_golden(path, golden)
    assert not rg.regress(["vae"], tmp_path).ok
    update = rg.regress(["vae"], tmp_path, update=True).results[0]
    assert [(c.metric, c.now) for c in update.checks] == [
        ("outputs.sample.mean", cached[("vae", "fp32")]["outputs"]["sample"]["mean"])]


def test_missing_golden_fails_with_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rg, "measure", lambda *a, **k: pytest.fail("measured without a golden"))
    results = rg.regress(["vae"], tmp_path).results
    assert [r.name for r in results] == [f"vae-tiny-{p}" for p in get_recipe("vae").precisions]
    assert all(not r.ok and "--update-goldens" in r.problem for r in results)
    run = CliRunner().invoke(cli, ["regress", "--recipes", "vae", "--goldens", str(tmp_path)])
    assert run.exit_code == 1, run.output
    assert "--update-goldens" in run.output and "Traceback" not in run.output


def test_unknown_recipe_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(WalkforgeError, match="unknown recipe"):
        rg.regress(["vea"], tmp_path)


TOLERANCE_CASES = [  # (field, how it changes, still within tolerance)
    ("outputs.sample.std", lambda v: v * (1 + 2e-5), True),
    ("outputs.sample.std", lambda v: v * (1 + 1e-3), False),
    ("outputs.sample.samples.512", lambda v: v + 1e-3, False),
    ("ops.decode.Conv", lambda v: v + 1, False),
    ("ops.decode.Gemm", lambda v: 1, False),  # an op the golden does not have
    ("bundle_bytes", lambda v: int(v * 1.005), True),
    ("bundle_bytes", lambda v: int(v * 1.02), False),
    ("accuracy.walks.decode.cosine", lambda v: v - 1e-5, False),
    ("accuracy.walks.decode.rel", lambda v: 9e-6, True),
    ("accuracy.walks.decode.rel", lambda v: 3e-5, False),
    ("weights_fingerprint", lambda v: v[:-1] + "0", False),
    ("versions.torch", lambda v: "9.9", True),
]


@pytest.mark.parametrize(("metric", "change", "ok"), TOLERANCE_CASES)
def test_compare_tolerances(metric: str, change, ok: bool) -> None:
    golden = rg.read_golden(GOLDENS / "vae-tiny-fp32.json")
    now = copy.deepcopy(golden)
    *parents, leaf = metric.split(".")
    node = now
    for key in parents:
        node = node[key]
    node[leaf] = change(node.get(leaf))
    checks = {c.metric: c for c in rg.compare(golden, now)}
    assert [c.metric for c in checks.values() if c.moved] == [metric]
    assert checks[metric].ok is ok


@pytest.mark.parametrize(("metric", "fraction", "ok"), [
    ("mean", 1.8e-3, True), ("mean", 1e-2, False), ("max", 1e-2, False),
    ("samples", 5e-2, True),  # one flipped E4M3 rounding can move a single sample this far
])
def test_fp8_outputs_allow_a_few_flipped_e4m3_roundings_not_more(metric: str, fraction: float,
                                                                 ok: bool) -> None:
    """An fp8 golden's output statistics may move by STAT_ATOL["fp8"] of the output's scale: 1.8e-3
    is what another CPU's fp32 kernels moved them by (AMD EPYC vs Intel Xeon, measured); 1e-2,
    what a wrong scale or a dropped Q/DQ pair moves, is a regression. Single samples are shown."""
    golden = rg.read_golden(GOLDENS / "pi0-tiny-fp8.json")
    now = copy.deepcopy(golden)
    out = now["outputs"]["actions"]
    scale = max(abs(out["min"]), abs(out["max"]))
    if metric == "samples":
        first = next(iter(out["samples"]))
        out["samples"][first] += fraction * scale
        metric = f"samples.{first}"
    else:
        out[metric] += fraction * scale
    checks = {c.metric: c for c in rg.compare(golden, now)}
    assert checks[f"outputs.actions.{metric}"].ok is ok


@pytest.mark.parametrize(("growth", "ok"), [(1.004, True), (3.0, True), (5.0, False)])
def test_quantized_cosine_distance_may_grow_as_rel_may(growth: float, ok: bool) -> None:
    """A quantized golden's cosine distance vs torch may grow REL_GROWTH² = 4× (rel may grow 2×);
    an fp32 golden's by COSINE_DROP only (the fp32 cases of test_compare_tolerances)."""
    golden = rg.read_golden(GOLDENS / "vae-tiny-fp8.json")
    now = copy.deepcopy(golden)
    walk = now["accuracy"]["walks"]["decode"]
    walk["cosine"] = 1.0 - growth * (1.0 - walk["cosine"])
    checks = {c.metric: c for c in rg.compare(golden, now)}
    assert checks["accuracy.walks.decode.cosine"].ok is ok


# --- bench report ---------------------------------------------------------------------------


def bench_report(bundle: str, scale: float) -> dict:
    def stats(ms: float) -> dict:
        return {"median_ms": ms, "p10_ms": 0.9 * ms, "p90_ms": 1.2 * ms, "n": 10}

    results = {b: {"backend": b, "end_to_end": stats(10 * f * scale),
                   "walks": {"vision": stats(2 * f * scale), "denoise": stats(f * scale)}}
               for b, f in (("cpu", 0.5), ("torch", 1.0))}
    return {"bundle": bundle, "machine": "Linux x86_64, 2 cores", "batch": 1, "results": results,
            "ratio_vs_torch": {"cpu": {"end_to_end": 0.5, "vision": 0.5, "denoise": 0.5}}}


def test_bench_report_writes_markdown_and_plots(tmp_path: Path) -> None:
    from walkforge.tools.report import add_bench_report, write_bench_report

    fp8 = {"pi0-fp8": {"walks": {"vision": {"cosine": 0.9995, "rel": 2e-2, "max_abs": 0.1}},
                       "end_to_end": {"actions": {"cosine": 0.999, "rel": 3e-2, "max_abs": 0.2}}}}
    written = write_bench_report([bench_report("build/pi0-small", 1.0)], tmp_path, fp8_verify=fp8)
    assert [p.name for p in written] == ["bench.md", "bench-pi0-small.png", "fp8-accuracy.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written[1:])
    md = (tmp_path / "bench.md").read_text()
    assert "| vision | cpu | 1.000 | 0.900 | 1.200 | 10 | 0.50 |" in md
    assert "| end to end | torch | 10.000 |" in md and "| pi0-fp8 | vision | 0.9995000 |" in md

    again = tmp_path / "again"
    add_bench_report(bench_report("build/vae-sd", 2.0), again)
    written = add_bench_report(bench_report("build/pi0-small", 1.0), again)
    assert {p.name for p in written} == {"bench.md", "bench-pi0-small.png", "bench-vae-sd.png"}
    assert "## vae-sd" in (again / "bench.md").read_text() and "FP8" not in (again / "bench.md").read_text()


def test_verify_report_adds_fp8_accuracy_section(tmp_path: Path) -> None:
    from walkforge.tools.report import add_verify_report

    result = {"backend": "cpu", "batch": 2, "seed": 1,
              "walks": {"vision": {"cosine": 0.9999, "rel": 0.01, "max_abs": 0.02}},
              "end_to_end": {"actions": {"cosine": 0.9995, "rel": 0.02, "max_abs": 0.05}}}
    written = add_verify_report(result, Path("build/pi0-small-fp8"), tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "| pi0-small-fp8 | vision | 0.9999000 |" in md and "fp8-accuracy.png" in md
    assert (tmp_path / "fp8-accuracy.png").stat().st_size > 1000 and len(written) == 2
