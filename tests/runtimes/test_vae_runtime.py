"""The VAE front on a compiled bundle: onnxruntime vs the torch reference backend, input
checking, verify() and bench.measure()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tolerances import rel_err, vae_decode_tol

import walkforge
from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError
from walkforge.recipes.inputs import example_inputs
from walkforge.runtimes.fronts.vae import VaeDecoder
from walkforge.tools.bench import bench, measure
from walkforge.tools.verify import verify

CPU_VS_TORCH_TOL = vae_decode_tol(64)  # rel_err of onnxruntime fp32 vs torch, tiny (measured 1.2e-6)
VERIFY_COSINE_MIN = 0.99999  # 1 - cosine ≈ rms rel err² / 2: fp32 gives 1 - 1e-12, fp8 0.993


@pytest.fixture(scope="module")
def decoders(tiny_bundle: Path) -> tuple[VaeDecoder, VaeDecoder]:
    return walkforge.load(tiny_bundle), walkforge.load(tiny_bundle, backend="torch")


@pytest.fixture(scope="module")
def upscale(tiny_bundle: Path) -> int:
    config = json.loads((tiny_bundle / "manifest.json").read_text())["config"]
    return 2 ** (len(config["block_out_channels"]) - 1)


def latents(*shape: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 4, 12, 10)])
def test_cpu_matches_torch(decoders: tuple[VaeDecoder, VaeDecoder], upscale: int,
                           shape: tuple[int, ...]) -> None:
    cpu, ref = decoders
    assert isinstance(cpu, VaeDecoder) and (cpu.backend, ref.backend) == ("cpu", "torch")
    x = latents(*shape)
    got, want = cpu.decode(x), ref.decode(x)
    b, _, h, w = shape
    assert got.shape == want.shape == (b, 3, h * upscale, w * upscale)
    assert isinstance(got, np.ndarray) and isinstance(want, np.ndarray)
    assert got.dtype == np.float32
    assert rel_err(got, want) <= CPU_VS_TORCH_TOL


def test_run_walk_equals_front(decoders: tuple[VaeDecoder, VaeDecoder]) -> None:
    cpu, _ = decoders
    x = latents(2, 4, 6, 6)
    np.testing.assert_array_equal(cpu.run_walk("decode", {"latents": x})["sample"], cpu.decode(x))


def bad_latents() -> list[tuple[str, np.ndarray, str]]:
    nan = latents(1, 4, 8, 8)
    nan[0, 0, 0, 0] = np.nan
    return [
        ("rank", latents(4, 8, 8), "rank 3"),
        ("channels", latents(1, 3, 8, 8), "axis 1 has size 3, expected 4"),
        ("float64", latents(1, 4, 8, 8).astype(np.float64), "dtype float64"),
        ("nan", nan, "NaN"),
    ]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(("case", "value", "expected"), bad_latents(), ids=[c[0] for c in bad_latents()])
def test_bad_latents_refused(decoders: tuple[VaeDecoder, VaeDecoder], backend: str, case: str,
                             value: np.ndarray, expected: str) -> None:
    decoder = decoders[0] if backend == "cpu" else decoders[1]
    with pytest.raises(WalkforgeError) as info:
        decoder.decode(value)
    message = str(info.value)
    assert message.startswith("latents:") and expected in message
    assert "\n" not in message


def test_missing_input_key(decoders: tuple[VaeDecoder, VaeDecoder]) -> None:
    with pytest.raises(WalkforgeError, match=r"missing input 'latents' \[batch, 4, height, width\]"):
        decoders[0].run({"latent": latents(1, 4, 8, 8)})


def test_unknown_walk_and_backend(tiny_bundle: Path, decoders: tuple[VaeDecoder, VaeDecoder]) -> None:
    with pytest.raises(WalkforgeError, match="no walk 'encode'"):
        decoders[0].run_walk("encode", {"latents": latents(1, 4, 8, 8)})
    with pytest.raises(WalkforgeError, match="unknown backend 'tensorrt'"):
        walkforge.load(tiny_bundle, backend="tensorrt")


def test_load_refuses_tampered_bundle(tiny_bundle_copy: Path) -> None:
    weights = tiny_bundle_copy / "weights" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WalkforgeError, match="weights/model.safetensors fails its sha256"):
        walkforge.load(tiny_bundle_copy, backend="torch")


def test_example_inputs_fit_the_contract(tiny_bundle: Path) -> None:
    feeds = example_inputs(Bundle.open(tiny_bundle), batch=3, seed=5, height=6, width=10)
    assert list(feeds) == ["latents"]
    assert feeds["latents"].shape == (3, 4, 6, 10) and feeds["latents"].dtype == np.float32
    again = example_inputs(Bundle.open(tiny_bundle), batch=3, seed=5, height=6, width=10)
    np.testing.assert_array_equal(feeds["latents"], again["latents"])


def test_verify(tiny_bundle: Path) -> None:
    result = verify(Bundle.open(tiny_bundle), "cpu", batch=2)
    assert (result["backend"], result["batch"]) == ("cpu", 2)
    assert set(result["walks"]) == {"decode"}
    assert set(result["end_to_end"]) == {"sample"}
    for numbers in (result["walks"]["decode"], result["end_to_end"]["sample"]):
        assert numbers["cosine"] > VERIFY_COSINE_MIN
        assert 0 <= numbers["rel"] <= CPU_VS_TORCH_TOL
    json.dumps(result)  # the CLI prints it as JSON: must be plain types


def test_bench_measure_structure(tiny_bundle: Path) -> None:
    report = measure(tiny_bundle, "cpu", warmup=1, iters=3, batch=1, threads=1)
    assert report["backend"] == "cpu"
    assert set(report["walks"]) == {"decode"}
    for stats in (report["end_to_end"], report["walks"]["decode"]):
        assert stats["n"] == 3
        assert stats["median_ms"] > 0
        assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]


def test_bench_backends_take_turns_in_their_own_processes(tiny_bundle: Path) -> None:
    """Each backend runs in its own process, and the processes take turns run by run (a drifting
    host then slows both alike): every cpu run starts before the torch run of its round, which
    starts before the next cpu run."""
    report = bench(tiny_bundle, ("cpu", "torch"), warmup=1, iters=3, threads=1)
    cpu, torch_ = (report["results"][b]["run_starts"] for b in ("cpu", "torch"))
    assert len(cpu) == len(torch_) == 3
    assert all(a < b < c for a, b, c in zip(cpu, torch_, [*cpu[1:], float("inf")], strict=True))
    assert report["ratio_vs_torch"]["cpu"]["end_to_end"] > 0
    assert {r["end_to_end"]["n"] for r in report["results"].values()} == {3}


def test_bench_backend_that_cannot_load_is_one_line(tiny_bundle: Path) -> None:
    with pytest.raises(WalkforgeError, match=r"^bench on backend 'tpu' failed: error: .*tpu"):
        bench(tiny_bundle, ("cpu", "tpu"), warmup=0, iters=1, threads=1)


def test_bench_times_the_inputs_file_it_is_given(tiny_bundle: Path, tmp_path: Path) -> None:
    """`walkforge bench --inputs FILE`: every backend's process times the file's arrays (here a
    batch of 3 at 6×10 latents, sizes no example input has) and the report names the file."""
    path = tmp_path / "in.npz"
    np.savez(path, latents=latents(3, 4, 6, 10))
    report = bench(tiny_bundle, ("cpu", "torch"), warmup=0, iters=1, threads=1, inputs=path)
    assert (report["batch"], report["inputs"]) == (3, str(path))
    assert {r["walks"]["decode"]["n"] for r in report["results"].values()} == {1}
    np.savez(path, latents=latents(3, 4, 6, 10), sample=np.zeros((2, 3)))
    mixed = r"^--inputs .*in\.npz: arrays of one batch expected, got leading sizes \[2, 3\]$"
    with pytest.raises(WalkforgeError, match=mixed):
        bench(tiny_bundle, ("cpu",), warmup=0, iters=1, inputs=path)
    with pytest.raises(WalkforgeError, match=r"^bench --inputs takes no --batch or --dim"):
        bench(tiny_bundle, ("cpu",), warmup=0, iters=1, dims={"height": 8}, inputs=path)
    with pytest.raises(WalkforgeError, match=r"^--inputs not found: .*missing\.npz$"):
        bench(tiny_bundle, ("cpu",), warmup=0, iters=1, inputs=tmp_path / "missing.npz")


def test_bench_on_inputs_the_bundle_refuses_is_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.npz"
    np.savez(path, latent=latents(1, 4, 8, 8))
    with pytest.raises(WalkforgeError, match=r"^bench on backend 'cpu' failed: error: .*latent"):
        bench(tiny_bundle, ("cpu",), warmup=0, iters=1, threads=1, inputs=path)


def test_bench_setting_tiles_the_decode(tiny_bundle: Path, decoders: tuple[VaeDecoder, VaeDecoder]) -> None:
    """`walkforge bench --setting tiled=1 --setting tile_size=8`: the front's run tiles the decode."""
    report = measure(tiny_bundle, "cpu", warmup=0, iters=1, batch=1, threads=1,
                     dims={"height": 8, "width": 8}, settings={"tiled": 1, "tile_size": 8})
    assert report["walks"]["decode"]["n"] == 9  # 8x8 latents, 4-latent tiles every 3: 3 x 3 engine calls
    x = latents(1, 4, 8, 8)
    np.testing.assert_array_equal(decoders[0].run({"latents": x}, tiled=1, tile_size=8)["sample"],
                                  decoders[0].decode(x, tiled=True, tile_size=8))
