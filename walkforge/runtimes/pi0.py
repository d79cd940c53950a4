"""pi0 front: `Pi0Policy.infer` chains vision → prefill → `num_steps` × denoise.

The prefix K/V produced by prefill stays in the backend's buffers and is bound by reference
into every denoise step; only x_t moves between steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.runner import Runner, to_numpy_any

INPUTS = ("images", "image_masks", "prompt_ids", "prompt_mask", "state")


class Pi0Policy(Runner):
    """A compiled pi0 policy. Shapes: images (B, V, 3, 224, 224) float32 in [0, 1]."""

    @property
    def num_views(self) -> int:
        return int(self.specs("vision")[0].shape[1])

    @property
    def max_prompt_len(self) -> int:
        return int(self._spec("prefill", "prompt_ids").shape[1])

    def _spec(self, walk: str, name: str):
        return next(s for s in self.specs(walk) if s.name == name)

    def infer(self, images: np.ndarray, image_masks: np.ndarray, prompt_ids: np.ndarray,
              prompt_mask: np.ndarray, state: np.ndarray, noise: np.ndarray | None = None,
              num_steps: int | None = None, seed: int = 0) -> np.ndarray:
        """Sample an action chunk (B, horizon, action_dim). Without `noise`, it is drawn from a
        generator seeded with `seed`, so repeated calls give the same actions."""
        images, image_masks = np.asarray(images), np.asarray(image_masks)
        self._check_views(images)
        prompt_ids, prompt_mask = self._pad_prompt(np.asarray(prompt_ids), np.asarray(prompt_mask))
        feeds = {"images": images, "image_masks": image_masks, "prompt_ids": prompt_ids,
                 "prompt_mask": prompt_mask, "state": np.asarray(state)}
        x_t = self._spec("denoise", "x_t")
        if noise is None:
            batch = images.shape[0]
            rng = np.random.default_rng(seed)
            noise = rng.standard_normal((batch, *x_t.shape[1:])).astype(np.float32)
        feeds["x_t"] = np.asarray(noise)
        self._check(feeds)
        steps = int(num_steps if num_steps is not None else self.manifest["config"]["num_steps"])
        env = self.chain.run(dict(feeds), {"num_steps": steps})
        return to_numpy_any(env["x_t"])

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        missing = [k for k in INPUTS if k not in feeds]
        if missing:
            raise WalkforgeError(f"missing input(s) {', '.join(missing)}; pi0 takes {', '.join(INPUTS)}"
                                 " and optionally noise")
        args = {k: feeds[k] for k in INPUTS}
        return {"actions": self.infer(**args, noise=feeds.get("noise"), **settings)}

    def _check_views(self, images: np.ndarray) -> None:
        if images.ndim == 5 and images.shape[1] != self.num_views:
            raise WalkforgeError(f"images has {images.shape[1]} views, this bundle was compiled "
                                 f"for {self.num_views}")

    def _pad_prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad prompts to the compiled length; refuse longer ones."""
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise WalkforgeError(f"prompt_ids {list(ids.shape)} and prompt_mask {list(mask.shape)} "
                                 "must both be (batch, prompt_len)")
        length, limit = ids.shape[1], self.max_prompt_len
        if length > limit:
            raise WalkforgeError(f"prompt of {length} tokens is longer than the compiled maximum {limit}")
        pad = ((0, 0), (0, limit - length))
        return np.pad(ids, pad), np.pad(mask, pad)

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        dims: dict[str, int] = {}
        specs = {s.name: s for w in ("vision", "prefill", "denoise") for s in self.specs(w)}
        for name, value in feeds.items():
            specs[name].check(value, dims)
        images = feeds["images"]
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise WalkforgeError(f"images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
        vocab = int(self.manifest["config"]["llm"]["vocab"])
        ids = feeds["prompt_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise WalkforgeError(f"prompt_ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
