"""LeRobot's processing as a list of named steps: the bundle's policy entry stores the list
(`steps.pre` and `steps.post`, built at compile time from the folder's processor JSONs by
recipes/lerobot.py), and this module runs it. Each step is one small function; no step knows
which model it serves.

Pre steps take a `Sample` and give the next one:

    cameras          frames → images (B, V, 3, H, W) in [0, 1], resized with padding (centred, or
                     on the left and top), and image_masks (absent and empty cameras: masked)
    newline          each task ends in one "\\n" (pi0's and SmolVLA's new-line processors)
    normalize        the state by its mode and the bundle's stats
    pad_state        the state zero-padded to the model's width; also the `state` walk input
    state_to_prompt  pi0.5's prompt "Task: …, State: <bins>;\\nAction: " over the first `dims` dims
    tokenize         prompts → prompt_ids / prompt_mask: [BOS] when `bos`, cut at `max_length`,
                     padded to `max_length` or to the longest prompt of the batch

Post steps take the chunk (B, chunk, A) and the observation's raw state (B, S):

    crop_actions      the model's padded action width cut to the robot's `dim`
    unnormalize       the actions back to robot units
    absolute_actions  the raw state added back on the dims of `mask` (relative actions)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from walkforge.errors import WalkforgeError
from walkforge.runtimes.processors.images import camera_image
from walkforge.runtimes.processors.prompts import pi0_prompt, pi05_prompt, tokenize
from walkforge.runtimes.processors.state import normalize, pad_to, state_bins, unnormalize
from walkforge.runtimes.processors.tokenizer import TextTokenizer


class Context(Protocol):
    """What steps read beside their own settings: the bundle's stats and tokenizer (loaded on
    first use)."""

    @property
    def stats(self) -> Mapping[str, np.ndarray]: ...

    @property
    def tokenizer(self) -> TextTokenizer: ...


@dataclass(frozen=True)
class Sample:
    """One observation (possibly batched) on its way to the walks: the raw `observation`,
    whether it came `batched`, its `state` (B, S) as the steps have made it so far, the
    `prompts` (the task texts, then the prompt texts), and the walk inputs made so far."""

    observation: Mapping[str, Any]
    batched: bool
    state: np.ndarray
    prompts: tuple[str, ...]
    feeds: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def with_feeds(self, **feeds: np.ndarray) -> Sample:
        return dataclasses.replace(self, feeds={**self.feeds, **feeds})


Step = Mapping[str, Any]
PreStep = Callable[[Sample, Step, Context], Sample]
PostStep = Callable[[np.ndarray, np.ndarray, Step, Context], np.ndarray]


# -- pre steps -----------------------------------------------------------------------------------

def cameras(sample: Sample, step: Step, ctx: Context) -> Sample:
    """`keys` in view order; `empty` ones are never read; `resolution` [H, W]; `pad` "center" or
    "left_top". A camera absent from the observation is masked (its tokens drop out of the
    prefix); at least one must be there."""
    keys, empty = list(step["keys"]), set(step.get("empty", ()))
    resolution = tuple(int(s) for s in step["resolution"])
    batch = len(sample.state)
    images = np.zeros((batch, len(keys), 3, *resolution), dtype=np.float32)
    masks = np.zeros((batch, len(keys)), dtype=bool)
    for v, key in enumerate(keys):
        if key in empty or key not in sample.observation:
            continue
        frames = np.asarray(sample.observation[key])
        if not sample.batched:
            frames = frames[None]
        elif frames.ndim != 4 or len(frames) != batch:
            raise WalkforgeError(f"{key}: shape {list(frames.shape)}; a batched observation wants "
                                 f"({batch}, H, W, 3) or ({batch}, 3, H, W)")
        for b in range(batch):
            images[b, v] = camera_image(frames[b], resolution, key, step.get("pad", "center"))
        masks[:, v] = True
    if not masks.any():
        readable = [k for k in keys if k not in empty]
        raise WalkforgeError(f"observation has none of this policy's cameras ({', '.join(readable)}): "
                             "give at least one (a missing one is masked, as LeRobot does)")
    return sample.with_feeds(images=images, image_masks=masks)


def newline(sample: Sample, step: Step, ctx: Context) -> Sample:
    """Each prompt ends in one newline (added when missing)."""
    return dataclasses.replace(sample, prompts=tuple(pi0_prompt(p) for p in sample.prompts))


def normalize_state(sample: Sample, step: Step, ctx: Context) -> Sample:
    """The state normalised by `mode` with the stats of feature `key`."""
    return dataclasses.replace(sample, state=normalize(sample.state, step["mode"], ctx.stats, step["key"]))


def pad_state(sample: Sample, step: Step, ctx: Context) -> Sample:
    """The state zero-padded to `dim`; it is the walks' `state` input too."""
    state = pad_to(sample.state, int(step["dim"]))
    return dataclasses.replace(sample, state=state).with_feeds(state=state)


def state_to_prompt(sample: Sample, step: Step, ctx: Context) -> Sample:
    """pi0.5's prompt: the task cleaned, then the first `dims` state dims as bins."""
    dims = int(step["dims"])
    prompts = tuple(pi05_prompt(p, state_bins(s[:dims])) for p, s in zip(sample.prompts, sample.state,
                                                                         strict=True))
    return dataclasses.replace(sample, prompts=prompts)


def tokenize_prompts(sample: Sample, step: Step, ctx: Context) -> Sample:
    """prompt_ids / prompt_mask of the prompts: BOS first when `bos`, cut at `max_length`,
    right-padded to `max_length` ("max_length") or to the longest prompt ("longest")."""
    tokenizer = ctx.tokenizer
    bos = tokenizer.bos_id if step.get("bos", True) else None
    if step.get("bos", True) and bos is None:
        raise WalkforgeError(f"{tokenizer.file}: has no BOS token, which this policy's prompts start with")
    ids, mask = tokenize(sample.prompts, tokenizer.encode, bos, int(step["max_length"]))
    if step.get("padding", "max_length") == "longest":
        width = max(1, int(mask.sum(1).max(initial=0)))
        ids, mask = ids[:, :width], mask[:, :width]
    return sample.with_feeds(prompt_ids=ids, prompt_mask=mask)


PRE: dict[str, PreStep] = {
    "cameras": cameras, "newline": newline, "normalize": normalize_state, "pad_state": pad_state,
    "state_to_prompt": state_to_prompt, "tokenize": tokenize_prompts,
}


# -- post steps ----------------------------------------------------------------------------------

def crop_actions(chunk: np.ndarray, state: np.ndarray, step: Step, ctx: Context) -> np.ndarray:
    """The model's padded action width cut to the robot's `dim`, float32."""
    return np.asarray(chunk, dtype=np.float32)[..., :int(step["dim"])]


def unnormalize_actions(chunk: np.ndarray, state: np.ndarray, step: Step, ctx: Context) -> np.ndarray:
    """The actions back to robot units by `mode` with the stats of feature `key`."""
    return unnormalize(chunk, step["mode"], ctx.stats, step["key"])


def absolute_actions(chunk: np.ndarray, state: np.ndarray, step: Step, ctx: Context) -> np.ndarray:
    """The observation's raw state (B, S) added back on the dims of `mask` (LeRobot's
    absolute_actions_processor)."""
    mask = np.asarray(step["mask"], dtype=np.float32)
    offset = np.asarray(state, dtype=np.float32)[:, :len(mask)] * mask
    out = chunk.copy()
    out[..., :len(mask)] += offset[:, None, :]
    return out


POST: dict[str, PostStep] = {
    "crop_actions": crop_actions, "unnormalize": unnormalize_actions, "absolute_actions": absolute_actions,
}


def run_pre(steps: Sequence[Step], sample: Sample, ctx: Context) -> Sample:
    for step in steps:
        sample = _lookup(PRE, step, "pre")(sample, step, ctx)
    return sample


def run_post(steps: Sequence[Step], chunk: np.ndarray, state: np.ndarray, ctx: Context) -> np.ndarray:
    for step in steps:
        chunk = _lookup(POST, step, "post")(chunk, state, step, ctx)
    return chunk


def _lookup(table: Mapping[str, Callable], step: Step, where: str) -> Callable:
    if step.get("name") not in table:
        raise WalkforgeError(f"this bundle's {where}-processing step '{step.get('name')}' is not in this "
                             f"walkforge (known: {', '.join(table)}); upgrade walkforge")
    return table[step["name"]]
