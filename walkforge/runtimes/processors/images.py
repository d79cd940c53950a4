"""Camera frames → the vision walk's images: float in [0, 1], CHW, resized with padding.

What LeRobot's preprocessor and policy do to a frame (docs/model_facts.md, "LeRobot policy
folders and processing"), with the fixed padding (black, as openpi and LeRobot ≥ 0.5 pad). The
[0, 1] → [−1, 1] map is NOT applied here: the vision walk applies it (recipes/pi0 `embed_images`),
so a padded or absent pixel is 0 here and −1 inside the walk.
"""

from __future__ import annotations

import numpy as np

from walkforge.errors import WalkforgeError

CHANNELS = 3


def to_unit_float(image: np.ndarray, name: str) -> np.ndarray:
    """uint8 → float32 /255; a float image as is (float32), refused outside [0, 1] or non-finite."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(image.dtype, np.floating):
        raise WalkforgeError(f"{name}: dtype {image.dtype}; give uint8 (0..255) or float in [0, 1]")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise WalkforgeError(f"{name}: has NaN or inf values")
    if image.size and (image.min() < 0.0 or image.max() > 1.0):
        raise WalkforgeError(f"{name}: float images must lie in [0, 1], got [{image.min():.4g}, "
                             f"{image.max():.4g}] (uint8 frames are divided by 255 here)")
    return image


def to_chw(image: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) or (3, H, W) → (3, H, W), told apart by which axis has 3 channels; a leading
    batch dim is kept. Both or neither axis of size 3 → one-line error."""
    if image.ndim != 3:
        raise WalkforgeError(f"{name}: shape {list(image.shape)}; want (H, W, 3) or (3, H, W)")
    first, last = image.shape[0] == CHANNELS, image.shape[-1] == CHANNELS
    if first and last:
        raise WalkforgeError(f"{name}: shape {list(image.shape)} is ambiguous (3 on both the first and "
                             "last axis): cannot tell HWC from CHW")
    if not (first or last):
        raise WalkforgeError(f"{name}: shape {list(image.shape)} has no axis of {CHANNELS} channels "
                             "(want RGB as (H, W, 3) or (3, H, W))")
    return image if first else np.moveaxis(image, -1, 0)


def padded_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size a (height, width) frame is resized to before padding to `target` (H, W): the
    aspect ratio kept, ratio = max(W_in/W, H_in/H), each side truncated (int)."""
    ratio = max(width / target[1], height / target[0])
    return int(height / ratio), int(width / ratio)


def _axis_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling along one axis, align_corners=False, no antialias (torch's rule): source
    coordinate (i + 0.5)·in/out − 0.5 clamped at 0; its two neighbours and the weight of the upper.
    As torch's CPU kernel computes it: the scale in float32, the coordinate fused (one rounding to
    float32), so the two agree to one fp32 ulp (an unfused or float64 one drifts by 1e-6 … 1e-5)."""
    scale = np.float64(np.float32(size_in) / np.float32(size_out))
    src = ((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    low = np.minimum(src.astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (src - low.astype(np.float32)).astype(np.float64)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H_in, W_in) → (C, height, width), as torch's interpolate(mode="bilinear",
    align_corners=False, antialias=False): separable, rows then columns, the lerps in float64."""
    x = image.astype(np.float64)
    low, high, w = _axis_weights(x.shape[1], height)
    x = x[:, low, :] * (1.0 - w)[None, :, None] + x[:, high, :] * w[None, :, None]
    low, high, w = _axis_weights(x.shape[2], width)
    x = x[:, :, low] * (1.0 - w)[None, None, :] + x[:, :, high] * w[None, None, :]
    return x.astype(np.float32)


PADS = ("center", "left_top")  # where the black bars go: around the frame (pi0), or left and top (SmolVLA)


def resize_with_pad(image: np.ndarray, target: tuple[int, int], pad: str = "center") -> np.ndarray:
    """(3, H_in, W_in) in [0, 1] → (3, H, W): resized to `padded_size` (unless already the
    target size), then padded with black (0): "center" puts floor(d/2) rows/columns before and
    the rest after, "left_top" all of them on the left and the top."""
    height, width = int(target[0]), int(target[1])
    if image.shape[1:] == (height, width):
        return image.astype(np.float32, copy=False)
    new_h, new_w = padded_size(image.shape[1], image.shape[2], (height, width))
    resized = resize_bilinear(image, new_h, new_w)
    if pad not in PADS:
        raise WalkforgeError(f"image padding '{pad}' unknown; one of {', '.join(PADS)}")
    top, left = (height - new_h, width - new_w) if pad == "left_top" else ((height - new_h) // 2,
                                                                          (width - new_w) // 2)
    widths = ((0, 0), (top, height - new_h - top), (left, width - new_w - left))
    return np.pad(resized, widths, constant_values=0.0)


def camera_image(frame: np.ndarray, target: tuple[int, int], name: str, pad: str = "center") -> np.ndarray:
    """One raw frame (uint8 or float, HWC or CHW, any size) → (3, H, W) float32 in [0, 1]."""
    return resize_with_pad(to_chw(to_unit_float(frame, name), name), target, pad)
