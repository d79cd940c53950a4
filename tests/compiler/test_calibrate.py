"""Calibration on a tiny hand-built graph: Conv → Flatten → MatMul → Relu → Gemm(transB)."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from rich.console import Console
from rich.progress import Progress
from tolerances import fp32_tol

from walkforge import runtimes
from walkforge.compiler.calibrate import (
    activation_inputs,
    collect_amax,
    weight_amax,
)
from walkforge.errors import WalkforgeError
from walkforge.graphs.fp8 import FP8_MAX, fp8_scales

RNG = np.random.default_rng(0)
WC = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)  # Conv [O, I, kh, kw]
W1 = RNG.standard_normal((48, 8)).astype(np.float32)  # MatMul [K, N]
W2 = RNG.standard_normal((5, 8)).astype(np.float32)  # Gemm transB=1: [N, K]
# amax from onnxruntime's activations vs from torch/numpy's, relative: the longest path sums the
# conv's 2·3·3 terms then the MatMul's 48 (7.7e-6); a max over the wrong tensor or one sample is 1e-1 off
AMAX_RTOL = fp32_tol(2 * 3 * 3 + 48)
FP8_COSINE_MIN = 0.98  # ungated fp8 tiny VAE vs fp32 (measured ≈ 0.993); scale-free, so any CPU
GATE_COSINE = 0.999  # what the gate test asks for: above the ungated 0.993, so the gate must act
INT8_COSINE_MIN = 0.99  # ungated int8 tiny VAE vs fp32 (measured ≈ 0.998); scale-free


def tiny_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w1"], ["h"], name="matmul"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(w, name) for w, name in ((WC, "wc"), (W1, "w1"), (W2, "w2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def intermediates(x: np.ndarray) -> dict[str, np.ndarray]:
    """The GEMM inputs, computed independently of onnxruntime."""
    c = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(WC), padding=1).numpy()
    f = c.reshape(len(x), -1)
    return {"x": x, "f": f, "r": np.maximum(f @ W1, 0)}


def feeds(n: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((3, 2, 4, 4)).astype(np.float32) * (k + 1)} for k in range(n)]


def test_activation_inputs_are_the_non_weight_gemm_inputs() -> None:
    assert activation_inputs(tiny_model()) == ["x", "f", "r"]


def test_max_amax_is_max_abs_over_all_samples() -> None:
    samples = feeds()
    amax = collect_amax(tiny_model(), samples)
    for name in ("x", "f", "r"):
        want = max(np.abs(intermediates(s["x"])[name]).max() for s in samples)
        assert amax[name] == pytest.approx(want, rel=AMAX_RTOL, abs=0)


def test_percentile_is_at_most_max_and_close_to_exact() -> None:
    samples = feeds()
    amax = collect_amax(tiny_model(), samples)
    for pct in (50.0, 99.0, 99.99):
        got = collect_amax(tiny_model(), samples, method="percentile", percentile=pct)
        for name in ("x", "f", "r"):
            values = np.concatenate([np.abs(intermediates(s["x"])[name]).ravel() for s in samples])
            exact = np.percentile(values, pct, method="higher")
            assert got[name] <= amax[name]
            bin_ratio = 2 ** (1 / 64)  # 64 bins per octave: at most one bin above the exact value
            assert exact * (1 - AMAX_RTOL) <= got[name] <= exact * bin_ratio * (1 + AMAX_RTOL)


def test_weight_amax_is_per_output_channel() -> None:
    amax = weight_amax(tiny_model())
    np.testing.assert_array_equal(amax["wc"], np.abs(WC).max(axis=(1, 2, 3)))  # per O
    np.testing.assert_array_equal(amax["w1"], np.abs(W1).max(axis=0))  # per N column
    np.testing.assert_array_equal(amax["w2"], np.abs(W2).max(axis=1))  # transB: per row
    assert {k: v.dtype for k, v in amax.items()} == dict.fromkeys(amax, np.float32)


def test_fp8_scales_are_amax_over_448_in_float32() -> None:
    scales = fp8_scales({"a": 2.0, "w": np.array([448.0, 0.0], np.float32)})
    assert scales["a"] == np.float32(2.0) / np.float32(FP8_MAX)
    assert scales["w"][0] == 1.0 and scales["w"][1] > 0  # zero amax keeps a usable scale


def test_progress_bar_counts_samples() -> None:
    bar = Progress(console=Console(file=io.StringIO()))
    seen = []
    bar.remove_task = lambda task: seen.append(bar.tasks[task].completed)  # before it is gone
    with bar:
        collect_amax(tiny_model(), feeds(4), progress=bar)
    assert seen == [4]


def test_bad_method_is_a_user_error() -> None:
    with pytest.raises(WalkforgeError, match="method"):
        collect_amax(tiny_model(), feeds(1), method="entropy")
    with pytest.raises(WalkforgeError, match="no samples"):
        collect_amax(tiny_model(), [])


@pytest.fixture(scope="module")
def vae_fp32(tiny_bundle):
    return tiny_bundle  # `compile vae`: the tiny variant, seed 0


def staged_copy(src, dst):
    import shutil

    from walkforge.artifacts.bundle import Bundle, read_manifest

    shutil.copytree(src, dst)
    return Bundle(dst, read_manifest(dst))


@pytest.mark.slow
def test_quantize_bundle_quantizes_every_walk_of_a_compiled_bundle(tmp_path, vae_fp32, monkeypatch) -> None:
    """… with memory-lean sessions only (no prepacked weight copies), leaving nothing aside."""
    import walkforge.compiler.calibrate as calibrate
    import walkforge.runtimes.backends.cpu.engine as engine
    from walkforge.compiler.quantize import SCALES_FILE, Fp8Options, load_scales, quantize_bundle
    from walkforge.recipes.inputs import example_inputs

    prepacked = []
    for module in (calibrate, engine):
        def spy(*args, _made=module.session_options, **kwargs):
            prepacked.append(kwargs.get("prepack", True))
            return _made(*args, **kwargs)
        monkeypatch.setattr(module, "session_options", spy)
    bundle = staged_copy(vae_fp32, tmp_path / "vae")
    samples = [example_inputs(bundle, batch=2, seed=100 + k) for k in range(2)]
    entry, counts = quantize_bundle(bundle, samples, Fp8Options("percentile", 99.9), runtimes)
    assert prepacked and not any(prepacked)  # engines, collectors and the gate's sessions alike
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # the fp32 walks set aside are gone
    assert sorted(p.name for p in bundle.path("walks").iterdir()) == ["decode.onnx", "decode.onnx.data"]
    assert counts["quantized_conv"] > 0 and counts["qdq_pairs"] > 0
    assert entry["samples"] == 2 and entry["calls"] == {"decode": 2}
    assert FP8_COSINE_MIN < entry["end_to_end"]["cosine"] < 1.0  # every conv but first/last is fp8
    assert entry["scales"] == SCALES_FILE and entry["gate"]["excluded"] == []
    scales, meta = load_scales(bundle.path(SCALES_FILE))
    act, weights = scales["decode"]
    assert meta["method"] == "percentile" and meta["percentile"] == 99.9 and act and weights
    walk = bundle.manifest["walks"]["decode"]
    assert walk["ops"]["DequantizeLinear"] == counts["qdq_pairs"] + counts["weights_fp8"]
    model = onnx.load(str(bundle.path(walk["onnx"])), load_external_data=False)
    fp8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8) > counts["weights_fp8"]  # weights plus zero points


@pytest.mark.slow
def test_gate_keeps_sensitive_layers_in_fp32_until_it_holds(tmp_path, vae_fp32) -> None:
    from walkforge.compiler.quantize import Fp8Options, quantize_bundle
    from walkforge.recipes.inputs import example_inputs

    bundle = staged_copy(vae_fp32, tmp_path / "vae")
    samples = [example_inputs(bundle, batch=2, seed=100)]
    entry, counts = quantize_bundle(bundle, samples, Fp8Options(min_cosine=GATE_COSINE), runtimes)
    assert entry["end_to_end"]["cosine"] >= GATE_COSINE  # ungated it is ≈ 0.993 on these random weights
    assert entry["gate"]["excluded"] and all(e.startswith("decode:") for e in entry["gate"]["excluded"])
    assert counts["skipped_excluded"] == len(entry["gate"]["excluded"])


def test_reuse_calibration_needs_the_same_weights(tmp_path, vae_fp32, compiled) -> None:
    from walkforge import CompileRequest, compile_bundle
    from walkforge.compiler.quantize import SCALES_FILE
    from walkforge.compiler.quantize import load_scales as load_bundle_scales

    a = compiled("vae", precision="fp8", calib_samples=1)
    first = json.loads((a / "manifest.json").read_text())
    again = compile_bundle(CompileRequest("vae", tmp_path / "b", precision="fp8", reuse_calibration=a))
    calib = again["precision"]["calibration"]
    assert calib["reused_from"] == str(a)
    (old, _), (new, meta) = (load_bundle_scales(d / SCALES_FILE) for d in (a, tmp_path / "b"))
    assert meta["reused_from"] == str(a)
    assert old["decode"][0] == new["decode"][0]  # activation scales taken over unchanged
    assert all(np.array_equal(old["decode"][1][k], v) for k, v in new["decode"][1].items())
    assert first["walks"]["decode"]["ops"] == again["walks"]["decode"]["ops"]
    with pytest.raises(WalkforgeError, match="weights fingerprint .* differs"):
        compile_bundle(CompileRequest("vae", tmp_path / "c", precision="fp8", seed=5, reuse_calibration=a))
    with pytest.raises(WalkforgeError, match="has no FP8/INT8 calibration"):
        compile_bundle(CompileRequest("vae", tmp_path / "d", precision="fp8", reuse_calibration=vae_fp32))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_int8_bundle_reuses_fp8_calibration_and_runs_integer_kernels(tmp_path, compiled) -> None:
    """One calibration for both dtypes and both int8 weight widths: an int8 compile reusing an
    fp8 bundle's scales gets the same amax (activation scales × 448/127, weight scales × 448/63:
    7-bit weights asked for), and an 8-bit compile reusing that one weight scales × 63/127. Its
    cpu engines fuse the int8 Q/DQ; 7-bit weights never need the exact u8×u8 kernels, full-range
    ones do where pairs saturate (graphs.ort.int8_pairs_saturate)."""
    from walkforge import CompileRequest, compile_bundle
    from walkforge.artifacts.bundle import Bundle
    from walkforge.compiler.quantize import SCALES_FILE
    from walkforge.compiler.quantize import load_scales as load_bundle_scales
    from walkforge.graphs.fp8 import INT8_MAX, read_tensor
    from walkforge.graphs.ort import int8_pairs_saturate

    fp8 = compiled("vae", precision="fp8", calib_samples=1)
    manifest = compile_bundle(CompileRequest("vae", tmp_path / "int8", precision="int8", int8_weight_bits=7,
                                             reuse_calibration=fp8))
    wide = compile_bundle(CompileRequest("vae", tmp_path / "int8w8", precision="int8", int8_weight_bits=8,
                                         reuse_calibration=tmp_path / "int8"))
    assert manifest["precision"]["weights"] == manifest["precision"]["activations"] == "int8"
    assert (manifest["precision"]["int8_weight_max"], wide["precision"]["int8_weight_max"]) == (63, 127)
    for m in (manifest, wide):
        assert m["precision"]["calibration"]["end_to_end"]["cosine"] >= INT8_COSINE_MIN
    (old, _), (new, meta), (new8, meta8) = (load_bundle_scales(d / SCALES_FILE)
                                            for d in (fp8, tmp_path / "int8", tmp_path / "int8w8"))
    assert (meta["dtype"], meta["weight_max"], meta8["weight_max"]) == ("int8", 63, 127)
    ratio = np.float32(FP8_MAX / INT8_MAX)
    assert all(new["decode"][0][k] == float(np.float32(v) * ratio) for k, v in old["decode"][0].items())
    assert new8["decode"][0] == new["decode"][0]
    for k, v in old["decode"][1].items():
        np.testing.assert_array_equal(new["decode"][1][k], v * np.float32(FP8_MAX / 63))
        np.testing.assert_array_equal(new8["decode"][1][k], new["decode"][1][k] * np.float32(63 / 127))
    tops = {}
    for name in ("int8", "int8w8"):
        path = tmp_path / name / manifest["walks"]["decode"]["onnx"]
        model = onnx.load(str(path), load_external_data=False)
        weights = [t for t in model.graph.initializer if t.name.endswith("_int8")]
        assert {t.data_type for t in weights} == {onnx.TensorProto.INT8}
        tops[name] = max(int(np.abs(read_tensor(t, path.parent).astype(np.int32)).max()) for t in weights)
    assert tops == {"int8": 63, "int8w8": 127}  # each channel's largest weight is the scale's top
    runner = runtimes.load(Bundle.open(tmp_path / "int8"), "cpu")
    options = runner.engines["decode"].session.get_session_options()
    assert options.get_session_config_entry("session.disable_quant_qdq") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry("session.x64quantprecision")
    manifest_path = tmp_path / "int8w8" / "manifest.json"
    for older in (False, True):  # 0.3.1 bundles have no int8_weight_max: full-range weights
        if older:
            m = json.loads(manifest_path.read_text())
            del m["precision"]["int8_weight_max"]
            manifest_path.write_text(json.dumps(m))
        engine = runtimes.load(Bundle.open(tmp_path / "int8w8"), "cpu").engines["decode"]
        if int8_pairs_saturate():
            assert engine.session.get_session_options().get_session_config_entry(
                "session.x64quantprecision") == "1"


@pytest.mark.parametrize("floor, bits", [(0.0, 7), (1.0, 8)])
def test_int8_weight_bits_auto_keeps_seven_bits_only_where_accurate(tmp_path, monkeypatch, compiled,
                                                                    floor, bits) -> None:
    """The default (`int8_weight_bits=None`, --int8-weight-bits auto) quantises 7-bit weights, keeps
    them where the end-to-end cosine reaches SEVEN_BIT_MIN_COSINE (here forced to 0: always; 1:
    never, as no quantised bundle is exact), else requantises at 8 bits from the same amax: weight
    scales × 63/127, activations unchanged. The manifest records both cosines it measured."""
    from walkforge import CompileRequest, compile_bundle
    from walkforge.compiler import quantize
    from walkforge.compiler.quantize import SCALES_FILE
    from walkforge.compiler.quantize import load_scales as load_bundle_scales

    seven_bits = compiled("vae", precision="int8", int8_weight_bits=7, calib_samples=1)
    monkeypatch.setattr(quantize, "SEVEN_BIT_MIN_COSINE", floor)
    auto = compile_bundle(CompileRequest("vae", tmp_path / "auto", precision="int8",
                                         reuse_calibration=seven_bits))
    calib = auto["precision"]["calibration"]
    assert auto["precision"]["int8_weight_max"] == calib["weight_max"] == {7: 63, 8: 127}[bits]
    assert (calib["weight_bits"]["bits"], calib["weight_bits"]["min_cosine"]) == (bits, floor)
    tried = calib["weight_bits"]["cosine"]
    assert sorted(tried) == (["7"] if bits == 7 else ["7", "8"])
    assert calib["end_to_end"]["cosine"] == tried[str(bits)]
    (seven, _), (chosen, meta) = (load_bundle_scales(d / SCALES_FILE)
                                  for d in (seven_bits, tmp_path / "auto"))
    assert meta["weight_max"] == calib["weight_max"]
    assert chosen["decode"][0] == seven["decode"][0]
    ratio = np.float32(63 / calib["weight_max"])
    for k, v in seven["decode"][1].items():
        np.testing.assert_array_equal(chosen["decode"][1][k], v * ratio if bits == 8 else v)
    from rich.console import Console

    from walkforge.tools.render import show_manifest

    console = Console(record=True, width=200)
    show_manifest(console, auto)
    assert f"precision: weights int8 ({bits}-bit, auto), activations int8" in console.export_text()


def test_calib_data_is_one_run_of_the_users_arrays(tmp_path) -> None:
    """`--calib-data FILE`: the npz's arrays are the one calibration run, read without pickle;
    an unreadable file is a one-line error naming the flag."""
    from walkforge.compiler.calibrate import calibration_samples

    path = tmp_path / "calib.npz"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(path, latents=x)
    [run] = calibration_samples(None, path, count=8, seed=0)
    np.testing.assert_array_equal(run["latents"], x)
    np.savez(path, objects=np.array([{"a": 1}], dtype=object))  # would need unpickling
    with pytest.raises(WalkforgeError, match=r"^--calib-data .*calib\.npz: member 'objects' holds Python "
                       r"objects \(pickled\), which are not read"):
        calibration_samples(None, path, count=8, seed=0)
    np.save(tmp_path / "lone.npy", x)
    (tmp_path / "lone.npy").rename(path)
    with pytest.raises(WalkforgeError, match=r"^--calib-data .*calib\.npz: not a readable npz \(one \.npy"):
        calibration_samples(None, path, count=8, seed=0)
