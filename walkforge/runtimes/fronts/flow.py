"""The front of every flow-matching VLA bundle (pi0, pi0.5, SmolVLA): `FlowPolicy.infer` chains
vision → prefill → `num_steps` × denoise.

Nothing here depends on the model kind; the manifest says it all: which inputs the walks take
(`inputs`: pi0 and SmolVLA take the state, pi0.5 reads it from the prompt), whether the camera
and prompt dims are dynamic (`compacts`: then the front compacts them, else it pads prompts to
the compiled length), how many prefix tokens a camera gives, and the processing steps.

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

Real-time chunking (LeRobot's RTC, runtimes/rtc.py): `predict_chunk(obs, inference_delay=d,
prev_chunk_left_over=P)` guides the new chunk towards the previous one's unexecuted rows P (model
space). The front turns P, d and the RTC settings into the `guide` walk's inputs (P zero-padded,
prefix weights per row, max guidance per row); the chain runs that walk after each denoise step,
inside the compiled loop. Without them nothing changes: the same engines run on the same inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.processors import PolicyProcessor, stack_feeds
from walkforge.runtimes.processors.policy import Prepared
from walkforge.runtimes.rtc import (
    Guidance,
    RTCSettings,
    count,
    delays,
    guidance,
    guide_feeds,
    leftover_rows,
    rtc_settings,
)
from walkforge.runtimes.runner import Runner
from walkforge.runtimes.values import to_numpy

OBSERVATION_INPUTS = ("images", "image_masks", "prompt_ids", "prompt_mask", "state")
"""The walk inputs an observation gives, in `infer`'s positional order; a bundle takes those its
walks name (the rest come from the chain: the pool, the schedule, the noise)."""
SETTINGS = ("noise", "num_steps", "seed")
GUIDE_INPUTS = ("prev_chunk", "prefix_weights", "max_guidance")
"""The `guide` walk's inputs only a real-time-chunking caller gives (recipes/blocks/flow.py
GUIDE_INPUTS): the padded leftover (B, chunk, max_action_dim), prefix weights (B, chunk) and the
largest guidance weight (B,); the chain runs the guide after each denoise step when they are there."""
RTC_KEYWORDS = ("inference_delay", "prev_chunk_left_over", "execution_horizon", "rtc")
NO_GUIDE = ("this bundle has no real-time chunking guide walk (compiled before walkforge 0.5): "
            "recompile it with walkforge ≥ 0.5 to pass prev_chunk_left_over")


@dataclass(frozen=True)
class Chunk:
    """One prediction in both spaces (batched: a leading batch dim on each)."""

    actions: np.ndarray
    """Robot units (chunk_size, action_dim): what the robot executes."""
    model: np.ndarray
    """Model space (chunk_size, max_action_dim): normalised, before the postprocessor. The next
    call's `prev_chunk_left_over` is cut from it: LeRobot's is the rows not executed yet, first
    action_dim dims (what `runtimes.rtc.RealTimeChunker` hands)."""


class FlowPolicy(Runner):
    """A compiled flow-matching VLA. Shapes: images (B, V, 3, S, S) float32 in [0, 1].

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
        return PolicyProcessor(policy, self.bundle.read_verified)

    def observation_spec(self) -> dict[str, Any]:
        """What an observation holds: camera keys (and the empty ones, never read), image
        resolution, state key and dim, task limits, action dim, chunk size, noise shape."""
        return self.processor.spec()

    def predict_action_chunk(self, observation: Mapping[str, Any], noise: Any = None, *,
                             num_steps: int | None = None, inference_delay: Any = 0,
                             prev_chunk_left_over: Any = None, execution_horizon: int | None = None,
                             rtc: Mapping[str, Any] | None = None) -> np.ndarray:
        """Actions in robot units: (chunk_size, action_dim) for an unbatched observation,
        (B, chunk_size, action_dim) for a batched one: `predict_chunk(...).actions`."""
        return self.predict_chunk(observation, noise, num_steps=num_steps, inference_delay=inference_delay,
                                  prev_chunk_left_over=prev_chunk_left_over,
                                  execution_horizon=execution_horizon, rtc=rtc).actions

    def predict_chunk(self, observation: Mapping[str, Any], noise: Any = None, *,
                      num_steps: int | None = None, inference_delay: Any = 0,
                      prev_chunk_left_over: Any = None, execution_horizon: int | None = None,
                      rtc: Mapping[str, Any] | None = None) -> Chunk:
        """The chunk of an observation in robot units and in model space (`Chunk`). `noise`: the
        flow's start, (chunk_size, max_action_dim) or (B, chunk_size, max_action_dim); seeded when
        absent. `num_steps`: Euler steps (default: the compiled config's).

        Real-time chunking, as LeRobot's `predict_action_chunk`: `prev_chunk_left_over` (rows,
        dims) — batched (B, rows, dims) — is the previous chunk's unexecuted tail in model space
        (rows ≤ chunk_size, dims ≤ max_action_dim; zero-padded in both), `inference_delay` the
        control steps the inference takes (an int, or one per row of a batch), `execution_horizon`
        the rows guided (default: the RTC settings'), `rtc` LeRobot's RTCConfig fields over the
        bundle's `rtc_config` and LeRobot's defaults (`rtc_settings`). Without a leftover the
        actions are exactly the unguided ones."""
        prepared = self.processor.prepare(observation)
        rows = self._guidance(len(prepared.state), prepared.batched, inference_delay, prev_chunk_left_over,
                              execution_horizon, rtc)
        model = self._sample(prepared, noise, num_steps, rows)
        actions = self.processor.postprocess(model, prepared.state)
        return Chunk(actions, model) if prepared.batched else Chunk(actions[0], model[0])

    def _sample(self, prepared: Prepared, noise: Any, num_steps: int | None = None,
                rows: Sequence[Guidance | None] = ()) -> np.ndarray:
        """The chunk of prepared observations in model space (B, chunk_size, max_action_dim),
        guided where `rows` say (one entry per batch row, or none at all)."""
        noise = self.processor.noise(noise, len(prepared.state), prepared.batched)
        feeds = {k: prepared.feeds[k] for k in self.inputs}
        guide = guide_feeds(rows, self.processor.chunk_size, self.processor.max_action_dim)
        return self.infer(**feeds, noise=noise, num_steps=num_steps, **guide)

    def rtc_settings(self, rtc: Mapping[str, Any] | None = None) -> RTCSettings:
        """LeRobot's RTCConfig for this bundle: `rtc` over the folder's `rtc_config` (kept at
        compile time when its config.json has one) over LeRobot's defaults; checked."""
        policy = self.bundle.typed.policy
        return rtc_settings(rtc, policy.extra.get("rtc_config") if policy is not None else None)

    @property
    def has_guide(self) -> bool:
        """Whether the bundle's denoise loop has the real-time chunking guide walk (walkforge ≥ 0.5)."""
        return any(isinstance(step, Mapping) and step.get("guide") for step in self.bundle.typed.plan)

    def _guidance(self, batch: int, batched: bool, inference_delay: Any = 0, prev_chunk_left_over: Any = None,
                  execution_horizon: Any = None, rtc: Mapping[str, Any] | None = None
                  ) -> list[Guidance | None]:
        """One request's RTC arguments, checked, as each batch row's guidance (None: unguided)."""
        settings = self.rtc_settings(rtc)
        row_delays = delays(inference_delay, batch)
        horizon = None if execution_horizon is None else count(execution_horizon, "execution_horizon")
        if prev_chunk_left_over is None:
            return [None] * batch
        if not self.has_guide:
            raise WalkforgeError(NO_GUIDE)
        chunk = self.processor.chunk_size
        rows = leftover_rows(prev_chunk_left_over, chunk, self.processor.max_action_dim,
                             batch if batched else None)
        rows = rows if batched else rows[None]
        return [guidance(r, d, horizon, settings, chunk) for r, d in zip(rows, row_delays, strict=True)]

    def predict_chunks(self, observations: Sequence[Mapping[str, Any]], noises: Sequence[Any] | None = None,
                       rtc_inputs: Sequence[Mapping[str, Any] | None] | None = None) -> list[Chunk]:
        """Several unbatched observations run as ONE batch (the server's micro-batches); each
        answer equals `predict_chunk` of that observation alone (to fp32 rounding). `rtc_inputs`:
        per observation None or a mapping of `predict_chunk`'s RTC keywords (inference_delay,
        prev_chunk_left_over, execution_horizon, rtc): robots with and without RTC share the batch."""
        if not observations:
            return []
        noises = list(noises) if noises is not None else [None] * len(observations)
        if len(noises) != len(observations):
            raise WalkforgeError(f"{len(noises)} noises for {len(observations)} observations")
        requests = list(rtc_inputs) if rtc_inputs is not None else [None] * len(observations)
        if len(requests) != len(observations):
            raise WalkforgeError(f"{len(requests)} rtc_inputs for {len(observations)} observations")
        parts, states, starts, rows = [], [], [], []
        for observation, noise, request in zip(observations, noises, requests, strict=True):
            prepared = self.processor.prepare(observation)
            if prepared.batched:
                raise WalkforgeError("predict_action_chunks takes unbatched observations")
            parts.append({k: prepared.feeds[k] for k in self.inputs})
            states.append(prepared.state)
            starts.append(self.processor.noise(noise, 1, False))
            rows += self._guidance(1, False, **_rtc_keywords(request))
        guide = guide_feeds(rows, self.processor.chunk_size, self.processor.max_action_dim)
        model = self.infer(**stack_feeds(parts), noise=np.concatenate(starts), **guide)
        actions = self.processor.postprocess(model, np.concatenate(states))
        return [Chunk(a, m) for a, m in zip(actions, model, strict=True)]

    def predict_action_chunks(self, observations: Sequence[Mapping[str, Any]],
                              noises: Sequence[Any] | None = None,
                              rtc_inputs: Sequence[Mapping[str, Any] | None] | None = None
                              ) -> list[np.ndarray]:
        """`predict_chunks`' actions in robot units."""
        return [chunk.actions for chunk in self.predict_chunks(observations, noises, rtc_inputs)]

    def select_action(self, observation: Mapping[str, Any], noise: Any = None) -> np.ndarray:
        """The next action (action_dim,) (batched: (B, action_dim)), LeRobot's way: when the
        queue is empty, predict a chunk and queue its first n_action_steps actions in model space;
        each call post-processes the one it returns with its own observation's state (relative
        actions add the state of the call, as LeRobot's postprocessor does)."""
        if not self._queue:
            chunk = self._sample(self.processor.prepare(observation), noise)
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
        return int(self.bundle.typed.config["num_views"])

    @property
    def max_prompt_len(self) -> int:
        return int(self.bundle.typed.config["max_prompt_len"])

    @cached_property
    def inputs(self) -> tuple[str, ...]:
        """The observation inputs this bundle's walks take, in `OBSERVATION_INPUTS` order."""
        taken = {s.name for w in self.bundle.typed.walks for s in self.specs(w)}
        return tuple(name for name in OBSERVATION_INPUTS if name in taken)

    @property
    def compacts(self) -> bool:
        """Whether vision takes a dynamic camera count (bundles compiled before it: a fixed one)."""
        return isinstance(self.specs("vision")[0].shape[1], str)

    def infer(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """Sample an action chunk (B, horizon, action_dim) from walk inputs: `inputs` (pi0:
        images, image_masks, prompt_ids, prompt_mask, state; pi0.5 without the state), by
        position or name, then `noise` (the start x_t), `num_steps` (default: the compiled
        config's) and `seed`. Without `noise`, it is drawn from a generator seeded with `seed`,
        so repeated calls give the same actions. The guide walk's GUIDE_INPUTS (all three, by
        name) guide the chunk (real-time chunking; `predict_chunk` makes them)."""
        names = (*self.inputs, *SETTINGS, *GUIDE_INPUTS)
        if len(args) > len(names):
            raise WalkforgeError(f"infer takes at most {len(names)} positional arguments "
                                 f"({', '.join(names)})")
        given = dict(zip(names, args, strict=False))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise WalkforgeError(f"infer got {', '.join(twice)} both by position and by name")
        given |= kwargs
        self._check_names(given, names)
        noise, num_steps, seed = given.get("noise"), given.get("num_steps"), given.get("seed", 0)
        feeds = {name: np.asarray(given[name]) for name in self.inputs}
        self._check_views(feeds["images"])
        ids, mask = self._pad_prompt(feeds["prompt_ids"], feeds["prompt_mask"])
        feeds |= {"prompt_ids": ids, "prompt_mask": mask}
        if self.compacts:
            feeds |= compact(feeds["images"], feeds["image_masks"], ids, mask)
        if noise is None:
            shape = (feeds["images"].shape[0], *self.spec("denoise", "x_t").shape[1:])
            noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        feeds["x_t"] = np.asarray(noise)
        feeds |= self._guide_inputs(given)
        self._check(feeds)
        steps = int(num_steps if num_steps is not None else self.bundle.typed.config["num_steps"])
        env = self.chain.run(feeds, {"num_steps": steps}, kv_tokens=self._prefix_tokens(feeds))
        return to_numpy(env["x_t"])

    def _guide_inputs(self, given: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The GUIDE_INPUTS among `given`: all three or none, and only where the bundle has a guide."""
        found = {k: np.asarray(given[k]) for k in GUIDE_INPUTS if given.get(k) is not None}
        if found and not self.has_guide:
            raise WalkforgeError(NO_GUIDE)
        if found and len(found) != len(GUIDE_INPUTS):
            raise WalkforgeError(f"the guide walk takes {', '.join(GUIDE_INPUTS)} together; got only "
                                 f"{', '.join(found)}")
        return found

    def _check_names(self, given: Mapping[str, Any], names: Sequence[str]) -> None:
        kind = self.bundle.typed.recipe
        missing = [k for k in self.inputs if k not in given]
        if missing:
            raise WalkforgeError(f"missing input(s) {', '.join(missing)}; {kind} takes "
                                 f"{', '.join(self.inputs)} and optionally noise")
        unknown = [k for k in given if k not in names]
        if "state" in unknown:
            raise WalkforgeError(f"{kind} takes no 'state' input: the state is part of the prompt text "
                                 "(LeRobot's pi05 tokenizer step writes it there)")
        if unknown:
            raise WalkforgeError(f"unknown input(s) {', '.join(unknown)}; {kind} takes {', '.join(names)}")

    def _prefix_tokens(self, feeds: Mapping[str, np.ndarray]) -> list[int]:
        """Valid prefix tokens per request: its unmasked cameras' image tokens, its prompt, and
        the state token when prefill takes the state (SmolVLA's prefix ends with it)."""
        config = self.bundle.typed.config
        vision = config["vision"]
        per_view = (vision["image_size"] // vision["patch"]) ** 2 // int(config.get("scale_factor", 1)) ** 2
        extra = int(any(s.name == "state" for s in self.specs("prefill")))
        valid = feeds["image_masks"].sum(1) * per_view + feeds["prompt_mask"].sum(1) + extra
        return [int(n) for n in valid]

    def run(self, feeds: Mapping[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
        given = {k: feeds[k] for k in feeds if k != "noise"}
        return {"actions": self.infer(**given, noise=feeds.get("noise"), **settings)}

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
        walks = ("vision", "prefill", "denoise", *(("guide",) if GUIDE_INPUTS[0] in feeds else ()))
        specs = {s.name: s for w in walks for s in self.specs(w)}
        for name, value in feeds.items():
            specs[name].check(value, dims)
        images = feeds["images"]
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise WalkforgeError(f"images must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
        vocab = int(self.bundle.typed.config["llm"]["vocab"])
        ids = feeds["prompt_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise WalkforgeError(f"prompt_ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")


def _rtc_keywords(request: Mapping[str, Any] | None) -> dict[str, Any]:
    """One observation's `rtc_inputs` entry as `predict_chunk`'s RTC keywords."""
    if request is None:
        return {}
    if not isinstance(request, Mapping):
        raise WalkforgeError(f"rtc_inputs: want a mapping (or None) per observation, got "
                             f"{type(request).__name__}")
    unknown = [k for k in request if k not in RTC_KEYWORDS]
    if unknown:
        raise WalkforgeError(f"rtc_inputs: unknown key(s) {', '.join(map(str, unknown))}; "
                             f"takes {', '.join(RTC_KEYWORDS)}")
    return dict(request)


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


# the names each kind's front had before they became one
Pi0Policy = Pi05Policy = SmolVLAPolicy = FlowPolicy
