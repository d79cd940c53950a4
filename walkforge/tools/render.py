"""Rich tables for manifests, verify results and bench reports (CLI and demo)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def shape(spec: dict[str, Any]) -> str:
    return escape(f"{spec['name']} [{', '.join(map(str, spec['shape']))}] {spec['dtype']}")


def show_policy(console: Console, policy: dict[str, Any]) -> None:
    """The robot side: where the processing came from and which LeRobot release it follows."""
    cams = ", ".join(c["key"] + (" (empty)" if c["empty"] else "") for c in policy["cameras"])
    console.print(escape(f"policy: {policy['type']}, cameras {cams}; state {policy['state']['dim']}, "
                         f"action {policy['action']['dim']}, chunk {policy['chunk_size']}"))
    if release := policy.get("lerobot"):
        console.print(escape(f"  LeRobot {release['release']} semantics ({release['how']})"))
    if "processors" in policy and policy["processors"] is None:
        console.print("  [yellow]no processors[/yellow] (a model-only folder): infer() only; recompile "
                      "with --processors DIR for predict_action_chunk / select_action / serve")
    if relative := policy.get("relative_actions"):
        dims = [i for i, on in enumerate(relative["mask"]) if on]
        console.print(escape(f"  relative actions: the state is added back on action dims {dims}"))


def show_manifest(console: Console, m: dict[str, Any]) -> None:
    w = m["weights"]
    console.print(f"[bold]{m['recipe']}[/bold] variant={m.get('variant')}  format v{m['format_version']}  "
              f"walkforge {m['walkforge_version']}  created {m.get('created')}")
    console.print(f"weights: {w['fingerprint']}  ({w['parameters']:,} parameters, source {w['source']})")
    p = m["precision"]
    weights = p["weights"]
    if "int8_weight_max" in p:  # int8 since 0.3.2: 7-bit (±63) or 8-bit (±127) weights
        auto = "weight_bits" in p.get("calibration", {})
        weights += f" ({8 if p['int8_weight_max'] > 63 else 7}-bit{', auto' if auto else ''})"
    console.print(f"precision: weights {weights}, activations {p['activations']}, KV {p['kv']}")
    if calib := p.get("calibration"):
        e2e = calib["end_to_end"]
        source = f"reused from {calib['reused_from']}" if "reused_from" in calib else \
            f"{calib['method']}, {calib['samples']} samples"
        dtype = calib.get("dtype", "fp8")
        console.print(escape(f"  calibration: {source}; {dtype} vs fp32 end-to-end cosine "
                             f"{e2e['cosine']:.6f}; "
                             f"kept in fp32: {', '.join(calib['gate']['excluded']) or 'defaults only'}"))
    if "fp8" in p["weights"] or "fp8" in p["kv"]:
        console.print("  [yellow]note:[/yellow] on the cpu target FP8 is accuracy emulation "
                      "(dequantised, computed in fp32): smaller weights, not faster. TensorRT on "
                      "Hopper/Ada runs it natively.")
    if kernels := m.get("kernels"):
        archs = ", ".join(sorted({k["arch"] for k in kernels}))
        isas = ", ".join(sorted({k["ptx_isa"] for k in kernels}))
        console.print(f"AOT kernels: {len(kernels)} for {archs} (Triton {kernels[0]['triton_version']}, "
                      f"PTX ISA {isas})")
    if policy := m.get("policy"):
        show_policy(console, policy)
    console.print(escape(f"plan: {json.dumps(m['plan'])}"))
    table = Table("walk", "inputs", "outputs", "nodes", "size")
    for name, walk in m["walks"].items():
        size = sum(f["size"] for rel, f in m["files"].items() if rel.startswith(walk["onnx"]))
        table.add_row(name, "\n".join(map(shape, walk["inputs"])), "\n".join(map(shape, walk["outputs"])),
                      str(sum(walk["ops"].values())), mb(size))
    console.print(table)
    targets = Table("target", "backend", "versions")
    for name, t in m["targets"].items():
        targets.add_row(name, f"{t['backend']} ({t.get('provider', '')})", json.dumps(t["versions"]))
    console.print(targets)
    files = Table("file", "size", "sha256")
    for rel, f in m["files"].items():
        files.add_row(rel, mb(f["size"]), f["sha256"][:16] + "…")
    console.print(files)


def show_verify(console: Console, result: dict[str, Any]) -> None:
    table = Table(f"{result['backend']} vs torch", "cosine", "rel err", "max abs")
    for name, a in result["walks"].items():
        table.add_row(f"walk {name}", f"{a['cosine']:.7f}", f"{a['rel']:.2e}", f"{a['max_abs']:.2e}")
    for name, a in result["end_to_end"].items():
        table.add_row(f"end to end: {name}", f"{a['cosine']:.7f}", f"{a['rel']:.2e}", f"{a['max_abs']:.2e}")
    console.print(table)


def show_bench(console: Console, report: dict[str, Any]) -> None:
    source = f", inputs {report['inputs']}" if "inputs" in report else ""
    console.print(f"{report['machine']}, batch {report['batch']}{source}", markup=False)
    from walkforge.tools.bench import REFERENCES, ratio_key

    refs = [r for r in REFERENCES if ratio_key(r) in report]  # the references that ran
    table = Table("backend", "walk", "median ms", "p90 ms", "calls", *(f"× {r}" for r in refs))
    for backend, r in report["results"].items():
        rows = [*r["walks"].items(), ("end to end", r["end_to_end"])]
        for walk, s in rows:
            key = "end_to_end" if walk == "end to end" else walk
            ratios = [report.get(ratio_key(ref), {}).get(backend, {}).get(key) for ref in refs]
            table.add_row(backend, walk, f"{s['median_ms']:.2f}", f"{s['p90_ms']:.2f}", str(s["n"]),
                          *(f"{x:.2f}" if x is not None else "ref" for x in ratios))
    console.print(table)
