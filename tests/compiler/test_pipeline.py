"""The compile pipeline on the VAE recipe: manifest contents, stage failures, and parity of
bundles compiled from diffusers checkpoints with diffusers' own AutoencoderKL.decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import VAE_TINY_SEED, make_diffusers_vae
from safetensors.torch import load_file, save_file
from tolerances import rel_err, vae_decode_tol

import walkforge
from walkforge import compile_bundle
from walkforge.compiler import pipeline
from walkforge.compiler.pipeline import CompileRequest, Job
from walkforge.errors import CompileError, WalkforgeError
from walkforge.progress import Progress
from walkforge.recipes import get_recipe
from walkforge.recipes.configs import to_dict
from walkforge.recipes.weights import fingerprint

VAE = get_recipe("vae")

CHECK_COSINE_MIN = 0.99999  # 1 - cosine ≈ rms rel err² / 2: fp32 gives 1 - 1e-12, fp8 0.993
STAGE_NAMES = ["load", "trace", "passes", "check", "build", "calibrate", "kernels", "trt_lint", "package"]


def no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def load_stage(request: CompileRequest, stage_dir: Path) -> dict:
    """Run only the `load` stage into `stage_dir`; return the manifest it filled."""
    stage_dir.mkdir(parents=True)
    job = Job(request, stage_dir, Progress(enabled=False))
    pipeline.load(job)
    return job.manifest


def parity_with_diffusers(bundle: Path, reference: torch.nn.Module, shape: tuple[int, ...]) -> float:
    latents = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    got = walkforge.load(bundle).decode(latents.numpy())
    with torch.no_grad():
        want = reference.decode(latents).sample.numpy()
    assert got.shape == want.shape
    return rel_err(got, want)


# -- random-weight compile --------------------------------------------------------------


def test_tiny_manifest(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert (m["recipe"], m["variant"]) == ("vae", "tiny")
    assert m["config"] == to_dict(VAE.variant("tiny"))
    weights = m["weights"]
    assert weights["source"] == "random" and weights["seed"] == VAE_TINY_SEED
    state = load_file(str(tiny_bundle / weights["file"]))
    assert weights["fingerprint"] == fingerprint(state)
    assert weights["parameters"] == sum(t.numel() for t in state.values())

    decode = m["walks"]["decode"]
    assert decode["inputs"] == [{"name": "latents", "dtype": "float32",
                                 "shape": ["batch", 4, "height", "width"]}]
    assert [o["name"] for o in decode["outputs"]] == ["sample"]
    assert decode["outputs"][0]["shape"][:2] == ["batch", 3]
    assert decode["ops"]["Conv"] > 0
    assert not any("::" in op for op in decode["ops"])  # the VAE uses no custom op
    assert m["plan"] == ["decode"]

    cpu = m["targets"]["cpu"]
    assert cpu["backend"] == "onnxruntime" and cpu["walks"] == {"decode": "walks/decode.onnx"}
    assert cpu["versions"]["opset"] == pipeline.OPSET
    check = m["check"]["decode"]
    assert check["cosine"] > CHECK_COSINE_MIN
    assert check["rel"] <= pipeline.CHECK_REL_TOL
    # the manifest is written by `package`, so package's own counts are not in it
    assert list(m["stages"])[:5] == STAGE_NAMES[:5]
    assert set(m["files"]) == {"walks/decode.onnx", "walks/decode.onnx.data", "weights/model.safetensors"}


def test_load_stage_fingerprint_follows_seed(tmp_path: Path, tiny_bundle: Path) -> None:
    recorded = json.loads((tiny_bundle / "manifest.json").read_text())["weights"]["fingerprint"]
    same = load_stage(CompileRequest("vae", tmp_path / "o", seed=VAE_TINY_SEED), tmp_path / "a")
    other = load_stage(CompileRequest("vae", tmp_path / "o", seed=VAE_TINY_SEED + 1), tmp_path / "b")
    assert same["weights"]["fingerprint"] == recorded
    assert other["weights"]["fingerprint"] != recorded


# -- failures ---------------------------------------------------------------------------


def test_later_stage_failure_names_stage_and_leaves_nothing(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "CHECK_REL_TOL", -1.0)  # any agreement now counts as broken
    out = tmp_path / "bundle"
    with pytest.raises(CompileError) as info:
        compile_bundle(CompileRequest("vae", out))
    err = info.value
    assert err.stage == "check"
    assert err.done == ["load", "trace", "passes"]
    message = str(err)
    assert message.startswith("compile failed at stage 'check' (finished: load, trace, passes): ")
    assert "walk 'decode' ONNX disagrees with torch" in message
    assert "\n" not in message
    no_leftovers(out)


def test_load_failure_keeps_existing_output(tmp_path: Path) -> None:
    overrides = tmp_path / "cfg.json"
    overrides.write_text(json.dumps({"block_out_chanels": [32, 64]}))
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("previous bundle")
    with pytest.raises(CompileError) as info:
        compile_bundle(CompileRequest("vae", out, config_file=overrides, force=True))
    assert info.value.stage == "load" and info.value.done == []
    assert "(finished: nothing)" in str(info.value)
    assert "unknown config key 'block_out_chanels'" in str(info.value)
    assert "did you mean 'block_out_channels'" in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle.")] == []


def test_variant_and_checkpoint_together_refused(tmp_path: Path, tiny_checkpoint) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(WalkforgeError, match="^give either --variant or --checkpoint, not both$"):
        CompileRequest("vae", out, variant="tiny", checkpoint=tiny_checkpoint[1])
    no_leftovers(out)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("precision", "fp16", "--precision must be one of fp32, fp8, int8, bf16, got 'fp16'"),
    ("kv_dtype", "int8", "--kv-dtype must be one of fp32, fp8, got 'int8'"),
    ("gpu_archs", ("sm_90", "sm90"), "--gpu-archs: 'sm90' is not an architecture like sm_90"),
    ("gpu_archs", ("gfx90a",), "--gpu-archs: 'gfx90a' is not an architecture like sm_90"),
    ("calib_samples", 0, "--calib-samples must be at least 1, got 0"),
    ("int8_weight_bits", 4, "--int8-weight-bits must be 7, 8 or None (auto), got 4"),
    ("calib_method", "entropy", "--calib-method must be one of max, percentile, got 'entropy'"),
    ("calib_percentile", 0.0, "--calib-percentile must be in (0, 100], got 0.0"),
    ("calib_percentile", 100.5, "--calib-percentile must be in (0, 100], got 100.5"),
    ("calib_percentile", float("nan"), "--calib-percentile must be in (0, 100], got nan"),
    ("fp8_min_cosine", 0.0, "--min-cosine must be in (0, 1], got 0.0"),
    ("fp8_min_cosine", 1.01, "--min-cosine must be in (0, 1], got 1.01"),
])
def test_bad_request_refused_when_built(tmp_path: Path, field: str, value: object, message: str) -> None:
    """Refused by the request itself, before compile_bundle could make a staging folder."""
    with pytest.raises(WalkforgeError) as info:
        CompileRequest("vae", tmp_path / "bundle", **{field: value})
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("field", "value"), [
    ("calib_percentile", 100.0), ("fp8_min_cosine", 1.0), ("calib_samples", 1), ("gpu_archs", ()),
    ("gpu_archs", ("sm_90a",)), ("precision", "fp8"), ("kv_dtype", "fp8"), ("calib_method", "percentile"),
])
def test_edge_values_accepted(tmp_path: Path, field: str, value: object) -> None:
    assert getattr(CompileRequest("vae", tmp_path / "b", **{field: value}), field) == value


def test_internal_error_keeps_its_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(job: Job) -> dict[str, int]:
        (job.stage_dir / "junk").write_text("half-written")
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(pipeline, "STAGES", (("load", broken), *pipeline.STAGES[1:]))
    out = tmp_path / "bundle"
    with pytest.raises(ZeroDivisionError):
        compile_bundle(CompileRequest("vae", out))
    no_leftovers(out)


def test_config_override_applies(tmp_path: Path) -> None:
    overrides = tmp_path / "cfg.json"
    overrides.write_text(json.dumps({"mid_block_add_attention": False}))
    manifest = load_stage(CompileRequest("vae", tmp_path / "o", config_file=overrides), tmp_path / "s")
    assert manifest["config"]["mid_block_add_attention"] is False
    assert manifest["config"]["block_out_channels"] == [32, 64]


# -- diffusers checkpoints --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "vae-tiny-ckpt"
    compile_bundle(CompileRequest("vae", out, checkpoint=tiny_checkpoint[1]))
    return out


def test_checkpoint_source_recorded(tiny_checkpoint_bundle: Path, tiny_checkpoint) -> None:
    reference, folder = tiny_checkpoint
    m = walkforge.load(tiny_checkpoint_bundle).manifest
    assert m["weights"]["source"] == "checkpoint"
    assert m["weights"]["path"] == str(folder)
    assert m["weights"]["loaded"] == len(VAE.build(VAE.variant("tiny")).state_dict())
    encoder = [k for k in reference.state_dict() if k.startswith(("encoder.", "quant_conv."))]
    assert m["weights"]["ignored"] == len(encoder) > 0
    assert m["config"] == to_dict(VAE.variant("tiny"))


@pytest.mark.parametrize("shape", [(1, 4, 12, 10), (3, 4, 12, 10)])
def test_checkpoint_bundle_matches_diffusers(tiny_checkpoint_bundle: Path, tiny_checkpoint,
                                             shape: tuple[int, ...]) -> None:
    # the trace example is 2×4×8×8: these sizes exercise the dynamic axes
    assert parity_with_diffusers(tiny_checkpoint_bundle, tiny_checkpoint[0], shape) \
        <= vae_decode_tol(max(VAE.variant("tiny").block_out_channels))  # onnxruntime vs diffusers


def test_fingerprint_changes_with_one_weight(tmp_path: Path, tiny_checkpoint) -> None:
    _, folder = tiny_checkpoint
    changed = Path(shutil.copytree(folder, tmp_path / "changed"))
    st = changed / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(st))
    tensors["decoder.conv_in.bias"][0] += 1e-3
    save_file(tensors, str(st))
    a = load_stage(CompileRequest("vae", tmp_path / "o", checkpoint=folder), tmp_path / "a")
    b = load_stage(CompileRequest("vae", tmp_path / "o", checkpoint=changed), tmp_path / "b")
    again = load_stage(CompileRequest("vae", tmp_path / "o", checkpoint=folder), tmp_path / "c")
    assert a["weights"]["fingerprint"] == again["weights"]["fingerprint"]
    assert a["weights"]["fingerprint"] != b["weights"]["fingerprint"]


@pytest.mark.slow
def test_sd_shaped_checkpoint_matches_diffusers(tmp_path: Path) -> None:
    cfg = VAE.variant("sd")
    assert (cfg.block_out_channels, cfg.layers_per_block) == ((128, 256, 512, 512), 2)
    reference = make_diffusers_vae(cfg)
    folder = tmp_path / "sd-vae"
    reference.save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "bundle"
    manifest = compile_bundle(CompileRequest("vae", out, checkpoint=folder))
    assert manifest["config"] == to_dict(cfg)
    assert manifest["check"]["decode"]["cosine"] > CHECK_COSINE_MIN
    assert parity_with_diffusers(out, reference, (1, 4, 8, 8)) <= vae_decode_tol(max(cfg.block_out_channels))
