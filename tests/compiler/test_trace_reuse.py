"""A walk's weightless graph is traced once per structure and process: a second compile of the same
config (other weights) reuses it — and its check stage still compares it with that compile's torch
modules — while another config traces anew."""

from __future__ import annotations

import json
import logging

import onnx

from walkforge import CompileRequest, compile_bundle
from walkforge.compiler import export


def graph(bundle, walk: str) -> onnx.GraphProto:
    model = onnx.load(str(bundle / "walks" / f"{walk}.onnx"), load_external_data=False)
    return model.graph


def test_same_config_reuses_the_traced_graph_other_config_does_not(tmp_path, caplog):
    export._traced.clear()
    caplog.set_level(logging.INFO, logger="walkforge.compiler.export")
    compile_bundle(CompileRequest("vae", tmp_path / "a", variant="tiny", seed=1, gpu_archs=()))
    assert "graph reused" not in caplog.text
    compile_bundle(CompileRequest("vae", tmp_path / "b", variant="tiny", seed=2, gpu_archs=()))
    assert "walk 'decode': graph reused" in caplog.text
    assert [n.op_type for n in graph(tmp_path / "a", "decode").node] == \
        [n.op_type for n in graph(tmp_path / "b", "decode").node]
    a, b = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in "ab")
    assert a["weights"]["fingerprint"] != b["weights"]["fingerprint"]  # the weights are each compile's own
    caplog.clear()
    other = tmp_path / "c.json"
    other.write_text(json.dumps({"layers_per_block": 2}))
    compile_bundle(CompileRequest("vae", tmp_path / "c", variant="tiny", config_file=other, gpu_archs=()))
    assert "graph reused" not in caplog.text
    assert len(graph(tmp_path / "c", "decode").node) > len(graph(tmp_path / "a", "decode").node)
