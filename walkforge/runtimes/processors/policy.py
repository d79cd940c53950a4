"""A raw robot observation → a policy bundle's walk inputs, and its action chunk → robot units.

Driven by the manifest's "policy" entry — its processing steps (runtimes/processors/steps.py)
— and the files beside it (policy/stats.safetensors, policy/tokenizer/), so nothing but the
bundle is needed, and nothing here depends on the model kind. An observation is a dict keyed by
LeRobot feature names: camera keys (uint8 or float frames, HWC or CHW, any size), the state key
and "task"; unbatched, or with a leading batch dim and a list of tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from walkforge.artifacts.manifest import Policy, PolicySteps
from walkforge.errors import WalkforgeError, did_you_mean
from walkforge.runtimes.processors.steps import Sample, run_post, run_pre
from walkforge.runtimes.processors.tokenizer import TextTokenizer, load_tokenizer

TASK = "task"
NOISE_SEED = 0  # start noise when none is given: the same draw for every request, batched or not


class PolicyProcessor:
    """LeRobot's pre- and post-processing of one bundle's policy entry (numpy only).

    `read(rel)` gives a bundle file's bytes (Bundle.read_verified: checked against the files table
    the digest covers, so a file changed after the load is refused, never used); `policy` is the
    manifest's policy entry (typed, or its JSON)."""

    def __init__(self, policy: Policy | Mapping[str, Any], read: Callable[[str], bytes]) -> None:
        self.policy = policy if isinstance(policy, Policy) else Policy.from_json(policy, "policy")
        self._read = read
        p = self.policy
        self.cameras = [c.key for c in p.cameras]
        self.empty = {c.key for c in p.cameras if c.empty}
        self.resolution = tuple(int(s) for s in p.image_resolution)
        self.state_key, self.state_dim = p.state.key, int(p.state.dim)
        self.action_key, self.action_dim = p.action.key, int(p.action.dim)
        self.chunk_size, self.max_action_dim = int(p.chunk_size), int(p.max_action_dim)

    @cached_property
    def stats(self) -> dict[str, np.ndarray]:
        if not self.policy.stats:
            return {}
        from safetensors.numpy import load

        return load(self._read(self.policy.stats))

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        entry = self.policy.tokenizer
        if not entry:
            hub = self.policy.hub_tokenizer or "the model's tokenizer"
            raise WalkforgeError(f"this bundle has no tokenizer: compile with --tokenizer DIR (a local copy "
                                 f"of {hub}, which cannot be fetched offline) to give text tasks")
        return load_tokenizer(self._read, entry["dir"], list(entry["files"]))

    def spec(self) -> dict[str, Any]:
        """What an observation holds (openpi metadata, server-side validation)."""
        self.require_processors()
        return {
            "type": self.policy.type,
            "cameras": [c for c in self.cameras if c not in self.empty],
            "empty_cameras": [c for c in self.cameras if c in self.empty],
            "image_resolution": list(self.resolution),
            "state": {"key": self.state_key, "dim": self.state_dim},
            "task": {"key": TASK, "max_tokens": int(self.policy.tokenizer_max_length),
                     "tokenizer": bool(self.policy.tokenizer)},
            "action": {"key": self.action_key, "dim": self.action_dim},
            "chunk_size": self.chunk_size, "n_action_steps": int(self.policy.n_action_steps),
            "noise": [self.chunk_size, self.max_action_dim],
        }

    # --- observation → walk inputs -------------------------------------------------------------

    def prepare(self, observation: Mapping[str, Any]) -> Prepared:
        """The walk inputs the bundle's pre-processing steps make (images, image_masks,
        prompt_ids, prompt_mask, state), whether the observation was batched, and its raw state
        (for relative actions)."""
        self.require_processors()
        self._check_keys(observation)
        raw, batched = self.state(observation)
        sample = Sample(observation, batched, raw, tuple(self._tasks(observation, len(raw), batched)))
        sample = run_pre(self.steps.pre, sample, self)
        return Prepared(dict(sample.feeds), batched, raw)

    def preprocess(self, observation: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
        """`prepare`'s walk inputs and whether the observation was batched."""
        prepared = self.prepare(observation)
        return prepared.feeds, prepared.batched

    @property
    def steps(self) -> PolicySteps:
        """The bundle's processing steps (runtimes/processors/steps.py)."""
        self.require_processors()
        return self.policy.steps  # type: ignore[return-value]

    def require_processors(self) -> None:
        """A bundle compiled from a model-only folder has no LeRobot processing to run."""
        if self.policy.steps is None:
            raise WalkforgeError("this bundle was compiled from a model-only folder (no "
                                 "policy_preprocessor.json / policy_postprocessor.json and their stats "
                                 "files): recompile with "
                                 "--processors DIR (a folder holding both JSONs and their stats files, e.g. "
                                 "the training run's checkpoint), or call infer() with walk inputs")

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
        task = _text(observation[TASK])
        many = batched and isinstance(task, (list, tuple))
        tasks = [task] * batch if isinstance(task, str) else list(task) if many else None
        if tasks is None or len(tasks) != batch or not all(isinstance(t, str) for t in tasks):
            want = f"a list of {batch} strings (or one string)" if batched else "a string"
            raise WalkforgeError(f"task: want {want} for this {'batched ' if batched else ''}observation")
        return tasks

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
        """(B, chunk_size, max_action_dim) in model space → (B, chunk_size, A) in robot units by
        the bundle's post-processing steps; `state` is the raw state (B, S) of the same
        observations (relative actions add it back, as LeRobot's absolute_actions_processor)."""
        if state is None:
            if any(step["name"] == "absolute_actions" for step in self.steps.post):
                raise WalkforgeError("this policy predicts actions relative to the state: give the "
                                     "observation's state to postprocess")
            state = np.zeros((len(chunk), self.state_dim), dtype=np.float32)
        return run_post(self.steps.post, np.asarray(chunk, dtype=np.float32), state, self)


@dataclass
class Prepared:
    """An observation as the walks take it: `feeds`, whether it came `batched`, and its raw
    state (B, S) in robot units (relative actions add it back)."""

    feeds: dict[str, np.ndarray]
    batched: bool
    state: np.ndarray


def _text(task: Any) -> Any:
    """A task as str (or a list of them): numpy str or bytes arrays (what an npz holds), bytes
    and numpy string scalars decoded (UTF-8); anything else is returned for the caller to refuse."""
    if isinstance(task, np.ndarray):
        task = task.tolist()
    if isinstance(task, (list, tuple)):
        return [_text(t) for t in task]
    if isinstance(task, (bytes, np.bytes_)):
        try:
            return bytes(task).decode("utf-8")
        except UnicodeDecodeError:
            raise WalkforgeError("task: bytes that are not UTF-8 text") from None
    return str(task) if isinstance(task, np.str_) else task


def stack_feeds(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several requests' walk inputs (each with batch 1) as one batch."""
    return {k: np.concatenate(_right_padded([p[k] for p in parts])) for k in parts[0]}


def _right_padded(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Prompts padded to each request's longest (`tokenize` with padding "longest") made one
    width: zeros (PAD_ID, mask False) appended along axis 1."""
    width = max(a.shape[1] if a.ndim > 1 else 0 for a in arrays)
    return [a if a.ndim < 2 or a.shape[1] == width else
            np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
