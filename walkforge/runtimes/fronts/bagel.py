"""BAGEL front: `BagelGenerator.generate` turns a prompt into an image with prefill → (N − 1) ×
denoise → decode.

Classifier-free guidance needs no second pass: each image has two cache rows in ONE batch of the
shared page pool, its prompt's context (written by prefill) and the text-dropped context, which is
empty (prefix length 0; the pool gives it no pages). Every denoise call evaluates both rows, and
its engine combines them (interval rule, renorm) and takes the Euler step. Without text guidance
(cfg_text_scale ≤ 1) the empty rows are not run at all. The shifted timestep schedule is the
chain's (`shifted_euler`). This front only wraps and checks the prompt, draws the noise and says
how many context tokens each cache row holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.runner import Runner
from walkforge.runtimes.values import to_numpy

RENORM_TYPES = ("global", "channel", "text_channel")  # the denoise walk's cfg_renorm_type codes
DEFAULTS = {
    "num_timesteps": 50,
    "timestep_shift": 3.0,
    "cfg_text_scale": 4.0,
    "cfg_img_scale": 1.0,
    "cfg_interval": (0.4, 1.0),
    "cfg_renorm_type": "global",
    "cfg_renorm_min": 0.0,
}
"""BAGEL's text-to-image settings (its inference notebook's)."""


class BagelGenerator(Runner):
    """A compiled BAGEL text-to-image model. Thread-safe: calls share the engines and the pool."""

    @property
    def cfg(self) -> Mapping[str, Any]:
        return self.manifest["config"]

    @property
    def pixels_per_token(self) -> int:
        return 2 * 2 ** (len(self.cfg["vae_channels"]) - 1)

    def generate(
        self,
        prompt_ids: Sequence[int] | np.ndarray | None = None,
        height: int = 1024,
        width: int = 1024,
        noise: np.ndarray | None = None,
        seed: int = 0,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        prompt: str | None = None,
    ) -> np.ndarray:
        """One image, float32 (height, width, 3) in [0, 1]. `prompt_ids`: the prompt's own token ids
        (the wrappers are added here), or `prompt` text with a bundled tokenizer. `noise`: BAGEL's
        token layout (h·w, 64) with h = height/16, w = width/16 (or (h, w, 64)); default: drawn from
        a generator seeded with `seed`."""
        ids = self._prompt_ids(prompt_ids, prompt)
        h, w = self._grid(height, width)
        if noise is None:
            noise = np.random.default_rng(seed).standard_normal((h * w, self.latent_dim)).astype(np.float32)
        grid = self._noise(np.asarray(noise), h, w)
        settings = dict(
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            cfg_text_scale=cfg_text_scale,
            cfg_img_scale=cfg_img_scale,
            cfg_interval=cfg_interval,
            cfg_renorm_type=cfg_renorm_type,
            cfg_renorm_min=cfg_renorm_min,
        )
        out = self.sample(ids[None], np.ones((1, len(ids)), bool), grid[None], **settings)
        self.last_latents = out["latents"][0]
        return out["image"][0]

    @property
    def latent_dim(self) -> int:
        return 4 * int(self.cfg["vae_latent_channels"])

    def sample(
        self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, noise: np.ndarray, **settings: Any
    ) -> dict[str, np.ndarray]:
        """A batch: prompts (B, P) right-padded (mask), noise grids (B, h, w, 64) → image (B, H, W, 3),
        latents (B, h, w, 64). Each image is guided by its own two cache rows."""
        s = self._settings(settings)
        lengths = np.asarray(prompt_mask).sum(1)
        if (lengths == 0).any():
            raise WalkforgeError("empty prompt: give at least one prompt token")
        if (lengths > int(self.cfg["max_prompt_len"])).any():
            raise WalkforgeError(
                f"prompt of {int(lengths.max())} tokens is longer than the compiled maximum "
                f"{self.cfg['max_prompt_len']}"
            )
        feeds = self._feeds(np.asarray(prompt_ids), np.asarray(prompt_mask), noise, s)
        rows = [int(n) + 2 for n in lengths] + ([0] * len(lengths) if s["cfg_text_scale"] > 1.0 else [])
        feeds["prefix_lens"] = np.asarray(rows, np.int64)
        run = {"num_steps": s["num_timesteps"] - 1, "timestep_shift": s["timestep_shift"]}
        env = self.chain.run(feeds, run, kv_tokens=rows)
        return {"image": to_numpy(env["image"]), "latents": to_numpy(env["x_t"])}

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        """The plan on `walkforge inputs`-style feeds: prompt_ids / prompt_mask (B, P), noise
        (B, h, w, 64)."""
        missing = [k for k in ("prompt_ids", "prompt_mask", "noise") if k not in feeds]
        if missing:
            raise WalkforgeError(
                f"missing input(s) {', '.join(missing)}; bagel takes prompt_ids, prompt_mask, noise"
            )
        steps = settings.pop("num_steps", None)  # the CLI's --num-steps: denoise calls = timesteps − 1
        if steps is not None:
            settings["num_timesteps"] = int(steps) + 1
        return self.sample(feeds["prompt_ids"], feeds["prompt_mask"], feeds["noise"], **settings)

    def _feeds(
        self, ids: np.ndarray, mask: np.ndarray, noise: np.ndarray, s: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """The walk inputs: wrapped, compacted prompts and the guidance settings as tensors."""
        tokens = self.cfg["special_tokens"]
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise WalkforgeError(
                f"prompt_ids {list(ids.shape)} and prompt_mask {list(mask.shape)} "
                "must both be (batch, prompt_len)"
            )
        vocab = int(self.cfg["llm"]["vocab"])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise WalkforgeError(f"prompt_ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
        length = int(mask.sum(1).max())
        wrapped = np.zeros((len(ids), length + 2), np.int64)
        for row, (r_ids, r_mask) in enumerate(zip(ids, mask, strict=True)):
            body = r_ids[r_mask.astype(bool)]
            wrapped[row, : len(body) + 2] = [tokens["bos"], *body, tokens["eos"]]
        wrapped_mask = np.arange(length + 2)[None] < (mask.sum(1) + 2)[:, None]
        feeds = {
            "prompt_ids": wrapped,
            "prompt_mask": wrapped_mask,
            "x_t": np.ascontiguousarray(noise, np.float32),
            "cfg_scale": np.array([s["cfg_text_scale"], s["cfg_img_scale"]], np.float32),
            "cfg_interval": np.array(s["cfg_interval"], np.float32),
            "cfg_renorm_min": np.array([s["cfg_renorm_min"]], np.float32),
            "cfg_renorm_type": np.array([RENORM_TYPES.index(s["cfg_renorm_type"])], np.int64),
        }
        dims: dict[str, int] = {}
        for spec in self.specs("denoise") + self.specs("prefill"):  # x_t (the noise) binds the batch first
            if spec.name in feeds:
                spec.check(feeds[spec.name], dims)
        self._grid(dims["grid_h"] * self.pixels_per_token, dims["grid_w"] * self.pixels_per_token)
        return feeds

    def _settings(self, given: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise WalkforgeError(
                f"unknown bagel setting(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
            )
        s = {**DEFAULTS, **given}
        if s["cfg_renorm_type"] not in RENORM_TYPES:
            raise WalkforgeError(
                f"unknown cfg_renorm_type '{s['cfg_renorm_type']}'; known: {', '.join(RENORM_TYPES)}"
            )
        if int(s["num_timesteps"]) < 2:
            raise WalkforgeError(f"num_timesteps must be ≥ 2, got {s['num_timesteps']}")
        values = [
            s["timestep_shift"],
            s["cfg_text_scale"],
            s["cfg_img_scale"],
            s["cfg_renorm_min"],
            *s["cfg_interval"],
        ]
        if len(s["cfg_interval"]) != 2 or not np.isfinite(np.asarray(values, np.float64)).all():
            raise WalkforgeError(
                "timestep_shift, the cfg scales, cfg_renorm_min and the 2 cfg_interval "
                "bounds must be finite numbers"
            )
        if float(s["timestep_shift"]) <= 0:
            raise WalkforgeError(f"timestep_shift must be > 0, got {s['timestep_shift']}")
        s["num_timesteps"] = int(s["num_timesteps"])
        return s

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) latent tokens of an image size; refuses sizes off the 16-pixel grid or the table."""
        ppt, side = self.pixels_per_token, int(self.cfg["max_latent_size"])
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % ppt or size // ppt > side:
                raise WalkforgeError(
                    f"{name} {size}: must be a positive multiple of {ppt} up to "
                    f"{ppt * side} (the latent position table's {side} tokens)"
                )
        return height // ppt, width // ppt

    def _noise(self, noise: np.ndarray, h: int, w: int) -> np.ndarray:
        """Noise in token layout (h·w, 64) or as a grid (h, w, 64) → the grid, checked."""
        c = self.latent_dim
        if noise.shape not in ((h * w, c), (h, w, c)):
            raise WalkforgeError(
                f"noise has shape {list(noise.shape)}; expected {[h * w, c]} (or {[h, w, c]}) "
                "for this height and width"
            )
        if not np.isfinite(noise).all():
            raise WalkforgeError("noise contains NaN or Inf")
        return noise.astype(np.float32).reshape(h, w, c)

    def _prompt_ids(self, prompt_ids: Any, prompt: str | None) -> np.ndarray:
        if (prompt_ids is None) == (prompt is None):
            raise WalkforgeError("give exactly one of prompt_ids and prompt")
        if prompt is not None:
            prompt_ids = self.tokenize(prompt)
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise WalkforgeError(
                f"prompt_ids must be a 1-D sequence of token ids, got shape {list(ids.shape)} {ids.dtype}"
            )
        if ids.size == 0:
            raise WalkforgeError("empty prompt: give at least one prompt token")
        return ids.astype(np.int64)

    def tokenize(self, prompt: str) -> list[int]:
        """The bundled Qwen2 tokenizer's ids of `prompt`, raw (no chat template, no special tokens)."""
        entry = self.bundle.typed.tokenizer
        if entry is None:
            raise WalkforgeError(
                "this bundle has no tokenizer (compile from a checkpoint folder with "
                "tokenizer.json): pass prompt_ids"
            )
        from tokenizers import Tokenizer

        return (
            Tokenizer.from_str(self.bundle.read_verified(entry.file).decode("utf-8"))
            .encode(prompt, add_special_tokens=False)
            .ids
        )


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image in [0, 1] as uint8, ×255 and truncated, as BAGEL's inferencer makes its PIL image."""
    return (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255).astype(np.uint8)
