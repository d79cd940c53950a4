"""VAE front: decode latents to pixels with a bundle of the `vae` recipe."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from walkforge.runtimes.runner import Runner
from walkforge.runtimes.values import to_numpy


class VaeDecoder(Runner):
    """AutoencoderKL decoder: latents [B, C, h, w] → sample [B, 3, 8h, 8w] (no scaling applied)."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.run({"latents": latents})["sample"]

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        self.check_inputs(self.specs("decode"), feeds)
        env = self.chain.run(dict(feeds), settings)
        return {"sample": to_numpy(env["sample"])}
