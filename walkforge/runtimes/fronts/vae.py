"""VAE front: latents to pixels with a bundle of the `vae` recipe, as diffusers pipelines do it.

`decode` is the raw walk (no scaling: the [−1, 1] sample); `decode(..., tiled=True)` is diffusers'
`enable_tiling()` decode, one tile through the engine at a time; `to_image` un-scales latents as
the pipelines do for this VAE, decodes, and post-processes as `VaeImageProcessor` (uint8 NHWC);
`encode` (bundles compiled with `--walks decode,encode`) is `AutoencoderKL.encode(x).latent_dist`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.runner import Runner
from walkforge.runtimes.values import to_numpy

# diffusers' AutoencoderKL defaults: the scaling of a bundle compiled without a checkpoint (the
# manifest's "vae" entry holds a checkpoint's own, see recipes/vae/checkpoint.py).
DEFAULT_SCALING = {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
                   "latents_std": None, "force_upcast": True, "sample_size": 32}
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor


class VaeDecoder(Runner):
    """AutoencoderKL decoder: latents [B, C, h, w] → sample [B, 3, f·h, f·w]."""

    @property
    def scaling(self) -> dict[str, Any]:
        """scaling_factor, shift_factor, latents_mean/std, force_upcast, sample_size (config.json's)."""
        return {**DEFAULT_SCALING, **(self.manifest.get("vae") or {})}

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.manifest["config"]["block_out_channels"]) - 1)

    def decode(self, latents: np.ndarray, tiled: bool = False, tile_size: int | None = None) -> np.ndarray:
        """Unscaled latents → sample in [−1, 1]-ish, as `AutoencoderKL.decode(latents).sample`.

        `tiled`: as after `enable_tiling()`: latents larger than one tile are decoded in tiles of
        `tile_size` pixels (default: config.json's sample_size) overlapping by a quarter, blended
        linearly; peak memory is that of one tile's decode.
        """
        if not tiled:
            return self.run({"latents": latents})["sample"]
        self.check_inputs(self.specs("decode"), {"latents": latents})
        sample = tile_size or self.scaling["sample_size"]
        sample = int(sample[0] if isinstance(sample, list | tuple) else sample)
        latent = int(sample / self.upscale)
        if max(latents.shape[2:]) <= latent:
            return self.run({"latents": latents})["sample"]
        return tiled_decode(lambda z: self.run({"latents": z})["sample"], latents, latent, sample)

    def unscale(self, latents: np.ndarray) -> np.ndarray:
        """Pipeline latents → what the decoder takes: `latents · std / scaling + mean` where the
        config has latents_mean/std (SDXL-style), else `latents / scaling (+ shift)`."""
        s, x = self.scaling, np.asarray(latents, dtype=np.float32)
        factor = np.float32(s["scaling_factor"])
        if s["latents_mean"] is not None and s["latents_std"] is not None:
            mean, std = (np.asarray(s[k], np.float32).reshape(1, -1, 1, 1)
                         for k in ("latents_mean", "latents_std"))
            return x * std / factor + mean
        x = x / factor
        return x if s["shift_factor"] is None else x + np.float32(s["shift_factor"])

    def to_image(self, latents: np.ndarray, tiled: bool = False, tile_size: int | None = None) -> np.ndarray:
        """Pipeline latents → uint8 images [B, H, W, 3]: un-scale, decode, then VaeImageProcessor's
        post-processing (x/2 + 1/2 clamped to [0, 1], ×255, rounded)."""
        sample = self.decode(self.unscale(latents), tiled, tile_size)
        return to_uint8(sample)

    def scale(self, latents: np.ndarray) -> np.ndarray:
        """The inverse of `unscale`: encoder latents → what img2img pipelines hand the denoiser."""
        s, x = self.scaling, np.asarray(latents, dtype=np.float32)
        factor = np.float32(s["scaling_factor"])
        if s["latents_mean"] is not None and s["latents_std"] is not None:
            mean, std = (np.asarray(s[k], np.float32).reshape(1, -1, 1, 1)
                         for k in ("latents_mean", "latents_std"))
            return (x - mean) * factor / std
        x = x if s["shift_factor"] is None else x - np.float32(s["shift_factor"])
        return x * factor

    def encode(self, images: np.ndarray, scaled: bool = False,
               sample: int | np.ndarray | None = None) -> np.ndarray:
        """Images → latents, as `AutoencoderKL.encode(images).latent_dist`: its mean, or with
        `sample` a draw mean + std·noise (an int seeds numpy's standard normal noise; an array is the
        noise). Images are float32 [B, 3, H, W] in [−1, 1], or uint8 [B, H, W, 3] (normalised as
        VaeImageProcessor does). `scaled`: then `scale` them as img2img pipelines do."""
        if "encode" not in self.engines:
            raise WalkforgeError("this bundle has no encode walk: compile it with --walks decode,encode")
        if isinstance(images, np.ndarray) and images.dtype == np.uint8:
            images = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 255 * 2 - 1
        out = self.run_walk("encode", {"images": images})
        latents = out["latent_mean"]
        if sample is not None:
            noise = (np.random.default_rng(sample).standard_normal(latents.shape, dtype=np.float32)
                     if isinstance(sample, int) else np.asarray(sample, np.float32))
            latents = latents + out["latent_std"] * noise
        return self.scale(latents) if scaled else latents

    def run(self, feeds: Mapping[str, np.ndarray], tiled: int = 0, tile_size: int = 0,
            **settings: Any) -> dict[str, np.ndarray]:
        """The plan (decode) on `feeds`; `tiled` (and `tile_size`) as in `decode`."""
        self.check_inputs(self.specs("decode"), feeds)
        if tiled:
            return {"sample": self.decode(feeds["latents"], tiled=True, tile_size=tile_size or None)}
        env = self.chain.run(dict(feeds), settings)
        return {"sample": to_numpy(env["sample"])}


def to_uint8(sample: np.ndarray) -> np.ndarray:
    """[B, C, H, W] in [−1, 1] → uint8 [B, H, W, C], as VaeImageProcessor.postprocess(output_type="pil")."""
    images = np.clip(sample.astype(np.float32) * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)


def tiled_decode(decode: Callable[[np.ndarray], np.ndarray], z: np.ndarray, tile: int,
                 tile_sample: int) -> np.ndarray:
    """diffusers' `AutoencoderKL.tiled_decode`, streamed: `tile`-latent tiles every 3/4 tile, each
    blended into the (already blended) tile above and to its left over a quarter tile, then
    cropped to 3/4. Holds one row of decoded tiles besides the one in the engine."""
    step = int(tile * (1 - TILE_OVERLAP))
    extent = int(tile_sample * TILE_OVERLAP)
    limit = tile_sample - extent
    rows, above = [], None
    for i in range(0, z.shape[2], step):
        row: list[np.ndarray] = []
        for j in range(0, z.shape[3], step):
            t = np.array(decode(np.ascontiguousarray(z[:, :, i:i + tile, j:j + tile])), np.float32)
            if above is not None:
                blend(above[len(row)], t, extent, axis=2)
            if row:
                blend(row[-1], t, extent, axis=3)
            row.append(t)
        rows.append(np.concatenate([t[:, :, :limit, :limit] for t in row], axis=3))
        above = row
    return np.concatenate(rows, axis=2)


def blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """Cross-fade the first `extent` rows (axis 2) or columns (axis 3) of `b` in place from `a`'s
    last ones: weight y/extent on b, 1 − y/extent on a (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w = (np.arange(extent, dtype=np.float32) / np.float32(extent)).reshape(shape)
    head = [slice(None)] * 4
    tail = list(head)
    head[axis], tail[axis] = slice(0, extent), slice(a.shape[axis] - extent, None)
    b[tuple(head)] = a[tuple(tail)] * (1 - w) + b[tuple(head)] * w


def save_png(images: np.ndarray, path: Path) -> list[Path]:
    """Write uint8 [B, H, W, 3] images as PNGs: `path` itself for one image, `<stem>-<i>.png`
    (i from 0) for a batch of several. Returns the paths written."""
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise WalkforgeError(f"PNG output takes uint8 [B, H, W, 3] images, got {images.dtype} "
                             f"{list(images.shape)}")
    path = Path(path)
    paths = [path] if len(images) == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}")
                                             for i in range(len(images))]
    for image, target in zip(images, paths, strict=True):
        target.write_bytes(png_bytes(image))
    return paths


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 [H, W, 3] image as an 8-bit RGB PNG (stdlib zlib, no imaging library needed)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) \
        + chunk(b"IEND", b"")
