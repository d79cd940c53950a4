"""pi0 front: `Pi0Policy.infer` chains vision → prefill → `num_steps` × denoise.

The chain owns the KV pages (runtimes/chain.py): each call gets pages for every request's valid
prefix tokens, prefill writes them in place, each denoise step reads them through
PagedAttention, and the pages are freed when the call returns. This front only checks inputs,
pads prompts, draws the start noise and says how many prefix tokens each request has.

The policy API (`predict_action_chunk`, `select_action`, `reset`, `observation_spec`,
`predict_action_chunks`) takes raw robot observations keyed by LeRobot feature names and returns
actions in robot units: runtimes/processors/ does LeRobot's pre- and post-processing from the
bundle's "policy" entry, `infer` runs the walks in between.

Masked cameras cost nothing (bundles whose walks take a dynamic camera count): `compact` moves
each request's valid cameras to the front, in order, and drops the camera slots and prompt
columns no request uses, so vision encodes only cameras some request has and prefill runs only
over the valid prefix. The valid tokens keep their order, hence their RoPE positions (which
count valid tokens) and what they attend to: the actions are the same.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.processors import PolicyProcessor, stack_feeds
from walkforge.runtimes.processors.policy import Prepared
from walkforge.runtimes.runner import Runner
from walkforge.runtimes.values import to_numpy

INPUTS = ("images", "image_masks", "prompt_ids", "prompt_mask", "state")


class Pi0Policy(Runner):
    """A compiled pi0 policy. Shapes: images (B, V, 3, 224, 224) float32 in [0, 1].

    `kv_pages` sizes the page pool (default: room for 8 full-length prefixes). Thread-safe: calls
    from several threads share the engines and the pool, each with its own pages.
    """

    @cached_property
    def processor(self) -> PolicyProcessor:
        """LeRobot's processing of this bundle (its "policy" manifest entry and files)."""
        policy = self.bundle.typed.policy
        if policy is None:
            raise WalkforgeError("this bundle has no policy entry (compiled before walkforge read LeRobot "
                                 "folders): recompile it, or call infer() with walk inputs")
        return PolicyProcessor(policy.to_json(), self.bundle.path)

    def observation_spec(self) -> dict[str, Any]:
        """What an observation holds: camera keys (and the empty ones, never read), image
        resolution, state key and dim, task limits, action dim, chunk size, noise shape."""
        return self.processor.spec()

    def predict_action_chunk(self, observation: Mapping[str, Any], noise: Any = None, *,
                             num_steps: int | None = None) -> np.ndarray:
        """Actions in robot units: (chunk_size, action_dim) for an unbatched observation,
        (B, chunk_size, action_dim) for a batched one. `noise`: the flow's start,
        (chunk_size, max_action_dim) or (B, chunk_size, max_action_dim); seeded when absent.
        `num_steps`: Euler steps (default: the compiled config's)."""
        prepared, chunk = self._model_chunk(observation, noise, num_steps)
        actions = self.processor.postprocess(chunk, prepared.state)
        return actions if prepared.batched else actions[0]

    def _model_chunk(self, observation: Mapping[str, Any], noise: Any, num_steps: int | None = None
                     ) -> tuple[Prepared, np.ndarray]:
        """The observation as walk inputs and its chunk in model space (B, chunk_size, max_action_dim)."""
        prepared = self.processor.prepare(observation)
        noise = self.processor.noise(noise, len(prepared.state), prepared.batched)
        return prepared, self.infer(**prepared.feeds, noise=noise, num_steps=num_steps)

    def predict_action_chunks(self, observations: Sequence[Mapping[str, Any]],
                              noises: Sequence[Any] | None = None) -> list[np.ndarray]:
        """Several unbatched observations run as ONE batch (the server's micro-batches); each
        answer equals `predict_action_chunk` of that observation alone (to fp32 rounding)."""
        if not observations:
            return []
        noises = list(noises) if noises is not None else [None] * len(observations)
        if len(noises) != len(observations):
            raise WalkforgeError(f"{len(noises)} noises for {len(observations)} observations")
        parts, states, starts = [], [], []
        for observation, noise in zip(observations, noises, strict=True):
            prepared = self.processor.prepare(observation)
            if prepared.batched:
                raise WalkforgeError("predict_action_chunks takes unbatched observations")
            parts.append(prepared.feeds)
            states.append(prepared.state)
            starts.append(self.processor.noise(noise, 1, False))
        chunk = self.infer(**stack_feeds(parts), noise=np.concatenate(starts))
        return list(self.processor.postprocess(chunk, np.concatenate(states)))

    def select_action(self, observation: Mapping[str, Any], noise: Any = None) -> np.ndarray:
        """The next action (action_dim,) (batched: (B, action_dim)), LeRobot's way: when the
        queue is empty, predict a chunk and queue its first n_action_steps actions in model space;
        each call post-processes the one it returns with its own observation's state (relative
        actions add the state of the call, as LeRobot's postprocessor does)."""
        if not self._queue:
            _, chunk = self._model_chunk(observation, noise)
            steps = int(self.processor.policy.n_action_steps)
            self._queue.extend(np.moveaxis(chunk[:, :steps], 1, 0))
        state, batched = self.processor.state(observation)
        action = self.processor.postprocess(self._queue.popleft()[:, None], state)[:, 0]
        return action if batched else action[0]

    def reset(self) -> None:
        """Empty the action queue (call at the start of an episode)."""
        self._queue.clear()

    @cached_property
    def _queue(self) -> deque[np.ndarray]:
        return deque()

    @property
    def num_views(self) -> int:
        return int(self.manifest["config"]["num_views"])

    @property
    def max_prompt_len(self) -> int:
        return int(self.manifest["config"]["max_prompt_len"])

    @property
    def compacts(self) -> bool:
        """Whether vision takes a dynamic camera count (bundles compiled before it: a fixed one)."""
        return isinstance(self.specs("vision")[0].shape[1], str)

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
        if self.compacts:
            feeds |= compact(images, image_masks, prompt_ids, prompt_mask)
        if noise is None:
            shape = (images.shape[0], *self.spec("denoise", "x_t").shape[1:])
            noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        feeds["x_t"] = np.asarray(noise)
        self._check(feeds)
        steps = int(num_steps if num_steps is not None else self.manifest["config"]["num_steps"])
        env = self.chain.run(feeds, {"num_steps": steps}, kv_tokens=self._prefix_tokens(feeds))
        return to_numpy(env["x_t"])

    def _prefix_tokens(self, feeds: Mapping[str, np.ndarray]) -> list[int]:
        """Valid prefix tokens per request: its unmasked cameras' image tokens, then its prompt."""
        vision = self.manifest["config"]["vision"]
        tokens_per_view = (vision["image_size"] // vision["patch"]) ** 2
        valid = feeds["image_masks"].sum(1) * tokens_per_view + feeds["prompt_mask"].sum(1)
        return [int(n) for n in valid]

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


def compact(images: np.ndarray, image_masks: np.ndarray, prompt_ids: np.ndarray,
            prompt_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The same requests with no work on padding: images (B, V', …) and image_masks (B, V') with
    each request's valid cameras first (in order) and V' = the most any request has (≥ 1);
    prompt_ids/prompt_mask cut after the last column any request fills (≥ 1 column)."""
    order = np.argsort(~image_masks, axis=1, kind="stable")  # valid cameras first, in order
    views = max(1, int(image_masks.sum(1).max(initial=0)))
    order = order[:, :views]
    length = max(1, int(np.flatnonzero(prompt_mask.any(0)).max(initial=-1)) + 1)
    return {"images": np.take_along_axis(images, order[:, :, None, None, None], axis=1),
            "image_masks": np.take_along_axis(image_masks, order, axis=1),
            "prompt_ids": prompt_ids[:, :length], "prompt_mask": prompt_mask[:, :length]}
