"""A raw robot observation → a pi0 / pi0.5 bundle's walk inputs, and its action chunk → robot units.

Driven by the manifest's "policy" entry and the files beside it (policy/stats.safetensors,
policy/tokenizer/), so nothing but the bundle is needed. An observation is a dict keyed by LeRobot
feature names: camera keys (uint8 or float frames, HWC or CHW, any size), the state key and "task";
unbatched, or with a leading batch dim and a list of tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from walkforge.artifacts.manifest import Policy
from walkforge.errors import WalkforgeError, did_you_mean
from walkforge.runtimes.processors.images import camera_image
from walkforge.runtimes.processors.prompts import pi0_prompt, pi05_prompt, tokenize
from walkforge.runtimes.processors.state import normalize, pad_to, state_bins, unnormalize
from walkforge.runtimes.processors.tokenizer import TextTokenizer, load_tokenizer

TASK = "task"
NOISE_SEED = 0  # start noise when none is given: the same draw for every request, batched or not


class PolicyProcessor:
    """LeRobot's pre- and post-processing of one bundle's policy entry (numpy only).

    `path(rel)` resolves a bundle-relative file (Bundle.path); `entry` is the manifest's policy
    entry as JSON (`policy` types it: artifacts/manifest.py)."""

    def __init__(self, entry: Mapping[str, Any], path: Callable[[str], Path]) -> None:
        self.entry, self._path = entry, path
        self.policy = Policy.from_json(entry, "policy")
        self.kind = entry["type"]
        self.cameras = [c["key"] for c in entry["cameras"]]
        self.empty = {c["key"] for c in entry["cameras"] if c["empty"]}
        self.resolution = tuple(int(s) for s in entry["image_resolution"])
        self.state_key, self.state_dim = entry["state"]["key"], int(entry["state"]["dim"])
        self.action_key, self.action_dim = entry["action"]["key"], int(entry["action"]["dim"])
        self.chunk_size, self.max_action_dim = int(entry["chunk_size"]), int(entry["max_action_dim"])

    @cached_property
    def stats(self) -> dict[str, np.ndarray]:
        if not self.entry.get("stats"):
            return {}
        from safetensors.numpy import load_file

        return load_file(str(self._path(self.entry["stats"])))

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        entry = self.entry.get("tokenizer")
        if not entry:
            hub = self.entry.get("hub_tokenizer") or "the model's Gemma tokenizer"
            raise WalkforgeError(f"this bundle has no tokenizer: compile with --tokenizer DIR (a local copy "
                                 f"of {hub}, which cannot be fetched offline) to give text tasks")
        return load_tokenizer(self._path(entry["dir"]), list(entry["files"]))

    def spec(self) -> dict[str, Any]:
        """What an observation holds (openpi metadata, server-side validation)."""
        self.require_processors()
        e = self.entry
        return {
            "type": self.kind,
            "cameras": [c for c in self.cameras if c not in self.empty],
            "empty_cameras": [c for c in self.cameras if c in self.empty],
            "image_resolution": list(self.resolution),
            "state": {"key": self.state_key, "dim": self.state_dim},
            "task": {"key": TASK, "max_tokens": int(e["tokenizer_max_length"]),
                     "tokenizer": bool(e.get("tokenizer"))},
            "action": {"key": self.action_key, "dim": self.action_dim},
            "chunk_size": self.chunk_size, "n_action_steps": int(e["n_action_steps"]),
            "noise": [self.chunk_size, self.max_action_dim],
        }

    # --- observation → walk inputs -------------------------------------------------------------

    def prepare(self, observation: Mapping[str, Any]) -> Prepared:
        """The walk inputs (images, image_masks, prompt_ids, prompt_mask, and pi0's state), whether
        the observation was batched, and its raw state (for relative actions)."""
        self.require_processors()
        self._check_keys(observation)
        raw, batched = self.state(observation)
        tasks = self._tasks(observation, len(raw), batched)
        images, masks = self._images(observation, len(raw), batched)
        state = pad_to(normalize(raw, self._mode("STATE"), self.stats, self.state_key),
                       int(self.entry["max_state_dim"]))
        feeds = {"images": images, "image_masks": masks}
        if self.kind == "pi05":
            dims = int(self.policy.state_dims_in_prompt)
            prompts = [pi05_prompt(t, state_bins(s[:dims])) for t, s in zip(tasks, state, strict=True)]
        else:
            prompts = [pi0_prompt(t) for t in tasks]
            feeds["state"] = state
        feeds["prompt_ids"], feeds["prompt_mask"] = tokenize(
            prompts, self.tokenizer.encode, self.tokenizer.bos_id, int(self.entry["tokenizer_max_length"]))
        return Prepared(feeds, batched, raw)

    def preprocess(self, observation: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
        """`prepare`'s walk inputs and whether the observation was batched."""
        prepared = self.prepare(observation)
        return prepared.feeds, prepared.batched

    def require_processors(self) -> None:
        """A bundle compiled from a model-only folder has no LeRobot processing to run."""
        if not self.policy.has_processors:
            raise WalkforgeError("this bundle was compiled from a model-only folder (no "
                                 "policy_preprocessor.json / policy_postprocessor.json and their stats "
                                 "files): recompile with "
                                 "--processors DIR (a folder holding both JSONs and their stats files, e.g. "
                                 "the training run's checkpoint), or call infer() with walk inputs")

    def _mode(self, feature_type: str) -> str:
        return self.entry["normalization"].get(feature_type, "IDENTITY")

    def _check_keys(self, observation: Mapping[str, Any]) -> None:
        known = [*self.cameras, self.state_key, TASK]
        for key in observation:
            if key not in known:
                raise WalkforgeError(f"observation key '{key}' unknown{did_you_mean(str(key), known)}; "
                                     "this policy takes "
                                     f"{', '.join(k for k in known if k not in self.empty)}")

    def state(self, observation: Mapping[str, Any]) -> tuple[np.ndarray, bool]:
        """The state as (B, S) float32 and whether it came batched ((S,) → B = 1)."""
        if self.state_key not in observation:
            raise WalkforgeError(f"observation lacks '{self.state_key}' ({self.state_dim} values)")
        state = np.asarray(observation[self.state_key])
        if state.ndim not in (1, 2) or state.shape[-1] != self.state_dim:
            raise WalkforgeError(f"{self.state_key}: shape {list(state.shape)}; want ({self.state_dim},) "
                                 f"or (batch, {self.state_dim})")
        if not np.issubdtype(state.dtype, np.number) or np.issubdtype(state.dtype, np.complexfloating):
            raise WalkforgeError(f"{self.state_key}: dtype {state.dtype} is not a real number type")
        state = state.astype(np.float32)
        if not np.isfinite(state).all():
            raise WalkforgeError(f"{self.state_key}: has NaN or inf values")
        return (state, True) if state.ndim == 2 else (state[None], False)

    def _tasks(self, observation: Mapping[str, Any], batch: int, batched: bool) -> list[str]:
        if TASK not in observation:
            raise WalkforgeError("observation lacks 'task' (the instruction text)")
        task = observation[TASK]
        task = task.tolist() if isinstance(task, np.ndarray) else task  # an npz holds str arrays
        many = batched and isinstance(task, (list, tuple))
        tasks = [task] * batch if isinstance(task, str) else list(task) if many else None
        if tasks is None or len(tasks) != batch or not all(isinstance(t, str) for t in tasks):
            want = f"a list of {batch} strings (or one string)" if batched else "a string"
            raise WalkforgeError(f"task: want {want} for this {'batched ' if batched else ''}observation")
        return tasks

    def _images(self, observation: Mapping[str, Any], batch: int, batched: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        """(B, V, 3, H, W) float32 in [0, 1] and (B, V) masks; an absent or empty camera → zeros
        (−1 inside the vision walk), mask false."""
        images = np.zeros((batch, len(self.cameras), 3, *self.resolution), dtype=np.float32)
        masks = np.zeros((batch, len(self.cameras)), dtype=bool)
        for v, key in enumerate(self.cameras):
            if key in self.empty or key not in observation:
                continue
            frames = np.asarray(observation[key])
            if not batched:
                frames = frames[None]
            elif frames.ndim != 4 or len(frames) != batch:
                raise WalkforgeError(f"{key}: shape {list(frames.shape)}; a batched observation wants "
                                     f"({batch}, H, W, 3) or ({batch}, 3, H, W)")
            for b in range(batch):
                images[b, v] = camera_image(frames[b], self.resolution, key)
            masks[:, v] = True
        if not masks.any():
            readable = [c for c in self.cameras if c not in self.empty]
            raise WalkforgeError(f"observation has none of this policy's cameras ({', '.join(readable)}): "
                                 "give at least one (a missing one is masked, as LeRobot does)")
        return images, masks

    # --- noise in, actions out -----------------------------------------------------------------

    def noise(self, noise: Any, batch: int, batched: bool) -> np.ndarray:
        """The start noise (B, chunk_size, max_action_dim): the caller's, checked, or the seeded
        draw (the same for every request, so a request's actions never depend on its batch)."""
        want = (self.chunk_size, self.max_action_dim)
        if noise is None:
            one = np.random.default_rng(NOISE_SEED).standard_normal((1, *want)).astype(np.float32)
            return np.repeat(one, batch, axis=0)
        noise = np.asarray(noise, dtype=np.float32)
        shape = (batch, *want) if batched else want
        if noise.shape != shape:
            after = ", after the batch dim)" if batched else ")"
            raise WalkforgeError(f"noise: shape {list(noise.shape)}; want {list(shape)} "
                                 f"(chunk_size, max_action_dim{after}")
        if not np.isfinite(noise).all():
            raise WalkforgeError("noise: has NaN or inf values")
        return noise if batched else noise[None]

    def postprocess(self, chunk: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """(B, chunk_size, max_action_dim) normalised → (B, chunk_size, A) in robot units; with
        relative actions, the raw `state` (B, S) of the same observations added back on the
        dims of the entry's mask (LeRobot's absolute_actions_processor)."""
        actions = np.asarray(chunk, dtype=np.float32)[..., :self.action_dim]
        actions = unnormalize(actions, self._mode("ACTION"), self.stats, self.action_key)
        relative = self.policy.relative_actions
        if relative:
            if state is None:
                raise WalkforgeError("this policy predicts actions relative to the state: give the "
                                     "observation's state to postprocess")
            mask = np.asarray(relative.mask, dtype=np.float32)
            offset = np.asarray(state, dtype=np.float32)[:, :len(mask)] * mask
            actions = actions.copy()
            actions[..., :len(mask)] += offset[:, None, :]
        return actions


@dataclass
class Prepared:
    """An observation as the walks take it: `feeds`, whether it came `batched`, and its raw
    state (B, S) in robot units (relative actions add it back)."""

    feeds: dict[str, np.ndarray]
    batched: bool
    state: np.ndarray


def stack_feeds(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several requests' walk inputs (each with batch 1) as one batch."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
