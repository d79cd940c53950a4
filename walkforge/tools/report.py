"""Benchmark reports: `bench.md` plus PNG plots, from `walkforge bench` results.

`write_bench_report` is a pure writer over `bench()` reports (and, optionally, `verify()`
results of fp8 bundles). `add_bench_report` is what `walkforge bench --report DIR` calls: it
keeps each bundle's report as `DIR/bench-<bundle>.json`, so successive `bench` runs (one per
bundle, as `make bench` does) build up one report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from walkforge.errors import WalkforgeError

log = logging.getLogger(__name__)

REPORT_MD = "bench.md"
FP8_PLOT = "fp8-accuracy.png"
REFERENCE = "torch"
END_TO_END = "end to end"


def add_bench_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Save `report` as `out_dir/bench-<bundle>.json`, then rewrite the report from every saved one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench-{label(report)}.json").write_text(json.dumps(report, indent=1) + "\n")
    return _rewrite(out)


def add_verify_report(result: dict[str, Any], bundle: Path, out_dir: Path) -> list[Path]:
    """Save an fp8 bundle's `verify()` result as `out_dir/verify-<bundle>.json` and rewrite the
    report, whose FP8 accuracy section and plot cover every saved one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"verify-{Path(bundle).name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return _rewrite(out)


def _rewrite(out: Path) -> list[Path]:
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("bench-*.json"))]
    fp8 = {p.stem.removeprefix("verify-"): json.loads(p.read_text())
           for p in sorted(out.glob("verify-*.json"))}
    return write_bench_report(reports, out, fp8 or None)


def write_bench_report(reports: Sequence[dict[str, Any]], out_dir: Path,
                       fp8_verify: Mapping[str, dict[str, Any]] | None = None) -> list[Path]:
    """Write `out_dir/bench.md` and a latency plot per bundle (`bench-<bundle>.png`).

    `fp8_verify` maps a label to the `verify()` result of an fp8 bundle; with it, an accuracy
    per walk plot (`fp8-accuracy.png`) and table are added. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# walkforge benchmarks", ""]
    written = []
    for report in reports:
        png = out / f"bench-{label(report)}.png"
        plot_latency(report, png)
        written.append(png)
        lines += _bench_section(report, png.name)
    if fp8_verify:
        png = out / FP8_PLOT
        plot_accuracy(fp8_verify, png)
        written.append(png)
        lines += _fp8_section(fp8_verify, png.name)
    md = out / REPORT_MD
    md.write_text("\n".join(lines) + "\n")
    log.info("bench report: %d bundles, %d plots", len(reports), len(written))
    return [md, *written]


def label(report: Mapping[str, Any]) -> str:
    return Path(report["bundle"]).name


def rows(report: Mapping[str, Any]) -> list[tuple[str, str, dict[str, float], float | None]]:
    """(walk, backend, stats, ratio vs torch) for every walk then end to end, every backend."""
    ratios = report.get("ratio_vs_torch", {})
    out = []
    for backend, r in report["results"].items():
        for walk, s in [*r["walks"].items(), (END_TO_END, r["end_to_end"])]:
            key = "end_to_end" if walk == END_TO_END else walk
            out.append((walk, backend, s, ratios.get(backend, {}).get(key)))
    return out


def _bench_section(report: Mapping[str, Any], png: str) -> list[str]:
    lines = [f"## {label(report)}", "",
             f"Bundle `{report['bundle']}` · machine: {report['machine']} · batch {report['batch']}", "",
             "| walk | backend | median ms | p10 ms | p90 ms | runs | × torch |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for walk, backend, s, ratio in sorted(rows(report), key=lambda r: (r[0] == END_TO_END, r[0])):
        shown = "ref" if backend == REFERENCE else (f"{ratio:.2f}" if ratio is not None else "—")
        lines.append(f"| {walk} | {backend} | {s['median_ms']:.3f} | {_p10(s):.3f} | {s['p90_ms']:.3f} "
                     f"| {s['n']} | {shown} |")
    return [*lines, "", f"![{label(report)} latency per walk]({png})", ""]


def _fp8_section(results: Mapping[str, dict[str, Any]], png: str) -> list[str]:
    lines = ["## FP8 accuracy vs the fp32 torch reference", "",
             "| bundle | walk | cosine | rel err | max abs |", "|---|---|---:|---:|---:|"]
    for name, result in results.items():
        for walk, a in _accuracy_rows(result):
            lines.append(f"| {name} | {walk} | {a['cosine']:.7f} | {a['rel']:.2e} | {a['max_abs']:.2e} |")
    return [*lines, "", f"![FP8 accuracy per walk]({png})", ""]


def _accuracy_rows(result: Mapping[str, Any]) -> list[tuple[str, dict[str, float]]]:
    e2e = [(f"{END_TO_END}: {k}", a) for k, a in result["end_to_end"].items()]
    return [*result["walks"].items(), *e2e]


def _p10(s: Mapping[str, float]) -> float:
    return s.get("p10_ms", s["median_ms"])  # reports before p10 was recorded


def _figure(width: float, height: float, ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise WalkforgeError("bench reports need matplotlib: pip install -e '.[dev]'") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_latency(report: Mapping[str, Any], png: Path) -> None:
    """Grouped bars: per walk (and end to end) the median of each backend, p10–p90 error bars."""
    backends = sorted(report["results"], key=lambda b: (b != REFERENCE, b))
    walks = [*report["results"][backends[0]]["walks"], END_TO_END]
    table = {(w, b): (s, ratio) for w, b, s, ratio in rows(report)}
    fig, (ax,) = _figure(max(6.0, 1.6 + 1.2 * len(walks) * max(1, len(backends) / 2)), 4.5)
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(walks))]
        stats = [table[(w, backend)][0] for w in walks]
        med = [s["median_ms"] for s in stats]
        err = [[m - _p10(s) for m, s in zip(med, stats, strict=True)],
               [s["p90_ms"] - m for m, s in zip(med, stats, strict=True)]]
        name = f"{backend} (reference)" if backend == REFERENCE else backend
        bars = ax.bar(xs, med, width, yerr=err, capsize=3, label=name,
                      color="0.6" if backend == REFERENCE else None)
        if backend != REFERENCE:
            ratios = [table[(w, backend)][1] for w in walks]
            ax.bar_label(bars, [f"{r:.2f}×" if r is not None else "" for r in ratios], fontsize=8)
    ax.set_xticks(range(len(walks)), walks)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (median, p10–p90)")
    ax.set_title(f"{label(report)} · batch {report['batch']}\n{report['machine']}", fontsize=9)
    fig.legend(loc="outside lower center", ncols=len(backends), fontsize=8)
    fig.savefig(png, dpi=120)


def plot_accuracy(results: Mapping[str, dict[str, Any]], png: Path) -> None:
    """Per walk of each fp8 bundle: 1 − cosine and relative error vs torch, log scale."""
    fig, axes = _figure(10, 4, ncols=2)
    width = 0.8 / len(results)
    for i, (name, result) in enumerate(results.items()):
        walks = _accuracy_rows(result)
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(walks))]
        axes[0].bar(xs, [max(1 - a["cosine"], 1e-12) for _, a in walks], width, label=name)
        axes[1].bar(xs, [max(a["rel"], 1e-12) for _, a in walks], width, label=name)
        for ax in axes:
            ax.set_xticks(range(len(walks)), [w for w, _ in walks], rotation=20, fontsize=8)
    for ax, title in zip(axes, ("1 − cosine vs torch", "relative error vs torch"), strict=True):
        ax.set_yscale("log")
        ax.set_title(title)
    fig.suptitle("FP8 accuracy per walk vs the fp32 torch reference", fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(results), fontsize=8)
    fig.savefig(png, dpi=120)
