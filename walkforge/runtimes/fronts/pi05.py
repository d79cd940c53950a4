"""pi0.5 front: `Pi05Policy.infer` chains vision → prefill → `num_steps` × denoise.

pi0's front without the state input (pi0.5 reads the state from the prompt text): the same
checks, prompt padding, noise and KV paging (the chain owns the pages, runtimes/chain.py; this
front says how many prefix tokens each request has). The policy API (`predict_action_chunk`,
`select_action`, …) is pi0's: the processor writes the normalised state into the prompt instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.fronts.pi0 import Pi0Policy
from walkforge.runtimes.values import to_numpy

INPUTS = ("images", "image_masks", "prompt_ids", "prompt_mask")


class Pi05Policy(Pi0Policy):
    """A compiled pi0.5 policy. Shapes: images (B, V, 3, 224, 224) float32 in [0, 1]; prompts
    (B, ≤ max_prompt_len) token ids that already carry the discretised state.

    `kv_pages` sizes the page pool (default: room for 8 full-length prefixes). Thread-safe: calls
    from several threads share the engines and the pool, each with its own pages.
    """

    def infer(self, images: np.ndarray, image_masks: np.ndarray, prompt_ids: np.ndarray,  # type: ignore[override]
              prompt_mask: np.ndarray, noise: np.ndarray | None = None, num_steps: int | None = None,
              seed: int = 0) -> np.ndarray:
        """Sample an action chunk (B, horizon, action_dim). Without `noise`, it is drawn from a
        generator seeded with `seed`, so repeated calls give the same actions."""
        images, image_masks = np.asarray(images), np.asarray(image_masks)
        self._check_views(images)
        prompt_ids, prompt_mask = self._pad_prompt(np.asarray(prompt_ids), np.asarray(prompt_mask))
        if noise is None:
            shape = (images.shape[0], *self.spec("denoise", "x_t").shape[1:])
            noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        feeds = {"images": images, "image_masks": image_masks, "prompt_ids": prompt_ids,
                 "prompt_mask": prompt_mask, "x_t": np.asarray(noise)}
        self._check(feeds)
        steps = int(num_steps if num_steps is not None else self.manifest["config"]["num_steps"])
        env = self.chain.run(feeds, {"num_steps": steps}, kv_tokens=self._prefix_tokens(feeds))
        return to_numpy(env["x_t"])

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        missing = [k for k in INPUTS if k not in feeds]
        if missing:
            raise WalkforgeError(f"missing input(s) {', '.join(missing)}; pi05 takes {', '.join(INPUTS)}"
                                 " and optionally noise")
        if "state" in feeds:
            raise WalkforgeError("pi05 takes no 'state' input: the state is part of the prompt text "
                                 "(LeRobot's pi05 tokenizer step writes it there)")
        args = {k: feeds[k] for k in INPUTS}
        return {"actions": self.infer(**args, noise=feeds.get("noise"), **settings)}
