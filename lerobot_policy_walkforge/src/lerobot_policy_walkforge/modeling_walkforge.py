"""The policy LeRobot's commands build for `--policy.type=walkforge`: a walkforge bundle behind
LeRobot's `PreTrainedPolicy` API.

LeRobot hands a batch of torch tensors (a batch dim; frames float in [0, 1], CHW, as
`prepare_observation_for_inference` makes them; the state; `task` a string or a list of them).
It is passed to the bundle as the raw observation walkforge takes (numpy, keyed by the same
feature names), and the bundle does all of LeRobot's processing — resizing, normalising,
tokenising, unnormalising — so this plugin's LeRobot pipelines do none (processor_walkforge.py)
and nothing is applied twice. Actions come back in robot units.

Real-time chunking: LeRobot's rollout hands `prev_chunk_left_over` in the space
`predict_action_chunk` returned, i.e. robot units here: the rows of the last chunk from some row
on, cut or zero-padded to the execution horizon (rollout/inference/rtc.py). The bundle wants the
same rows in model space (FlowPolicy.predict_chunk), so the last chunk is kept in both spaces and
the leftover is mapped row for row; one that is not such a run of rows is refused.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from torch import Tensor

from .configuration_walkforge import NAME, WalkforgeConfig

TASK = "task"
HUB_KWARGS = ("force_download", "resume_download", "proxies", "token", "cache_dir", "local_files_only",
              "revision", "strict")
INFERENCE_ONLY = ("a walkforge bundle runs inference only: train with LeRobot's own policy, then compile "
                  "its checkpoint with `walkforge compile`")


class WalkforgePolicy(PreTrainedPolicy):
    """A walkforge bundle (pi0, pi0.5, SmolVLA) as a LeRobot policy; it has no torch parameters."""

    config_class = WalkforgeConfig
    name = NAME

    def __init__(self, config: WalkforgeConfig, dataset_stats: Any = None, dataset_meta: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(config)
        if not isinstance(config, WalkforgeConfig):
            raise ValueError(f"WalkforgePolicy takes a WalkforgeConfig, got {type(config).__name__}")
        config.validate_features()
        config.read_bundle()
        import walkforge

        options = {} if config.threads is None else {"threads": int(config.threads)}
        bundle = Path(config.bundle).expanduser()
        self.runtime = walkforge.load(bundle, backend=config.backend_name, **options)
        self.spec = self.runtime.observation_spec()
        self._last: tuple[np.ndarray, np.ndarray | None] | None = None  # robot units, model space

    # --- LeRobot's policy API ------------------------------------------------------------------

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], noise: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The next action (B, action_dim) in robot units; a chunk is predicted when the bundle's
        queue of `n_action_steps` actions is empty (walkforge's FlowPolicy.select_action)."""
        actions = self.runtime.select_action(self._observation(batch), _numpy(noise))
        return self._tensor(actions, batch)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], noise: Tensor | None = None, *,
                             inference_delay: int | None = None, prev_chunk_left_over: Tensor | None = None,
                             execution_horizon: int | None = None, **kwargs: Any) -> Tensor:
        """The action chunk (B, chunk_size, action_dim) in robot units. With RTC
        (`prev_chunk_left_over`: rows of the chunk this returned last, as LeRobot's rollout cuts
        them), the chunk is guided towards those rows (FlowPolicy.predict_chunk)."""
        observation = self._observation(batch)
        predict_chunk = getattr(self.runtime, "predict_chunk", None)
        if predict_chunk is None:
            if prev_chunk_left_over is not None:
                raise ValueError("this walkforge's FlowPolicy has no predict_chunk (real-time chunking): "
                                 "upgrade walkforge, or call without prev_chunk_left_over")
            actions, model = self.runtime.predict_action_chunk(observation, _numpy(noise)), None
        else:
            leftover = None
            if prev_chunk_left_over is not None:
                leftover = self._model_leftover(prev_chunk_left_over)
            chunk = predict_chunk(observation, _numpy(noise), inference_delay=inference_delay or 0,
                                  prev_chunk_left_over=leftover, execution_horizon=execution_horizon,
                                  rtc=self._rtc())
            actions, model = chunk.actions, chunk.model
        self._last = (_batched(actions, 3), None if model is None else _batched(model, 3))
        return self._tensor(actions, batch)

    def reset(self) -> None:
        """Start of an episode: the bundle's action queue emptied."""
        self.runtime.reset()

    def supports_rtc(self) -> bool:
        """Whether `predict_action_chunk` does LeRobot's RTC: this walkforge has
        FlowPolicy.predict_chunk and the bundle its guide walk (compiled by walkforge ≥ 0.5)."""
        predict_chunk = getattr(self.runtime, "predict_chunk", None)
        return callable(predict_chunk) and bool(getattr(self.runtime, "has_guide", False))

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict | None]:
        raise NotImplementedError(INFERENCE_ONLY)

    def get_optim_params(self) -> dict:
        raise NotImplementedError(INFERENCE_ONLY)

    # --- saving and loading a policy folder (`--policy.path=DIR`) ------------------------------

    def _save_pretrained(self, save_directory: Path, **kwargs: Any) -> None:
        """config.json and this plugin's (pass-through) processor files; no weights: they are in
        the bundle, which the config names by its absolute path. (LeRobot 0.6 passes a state_dict.)"""
        save_policy_folder(self.config, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: str | Path, *, config: PreTrainedConfig | None = None,
                        **kwargs: Any) -> WalkforgePolicy:
        """A policy folder `save_pretrained` wrote (config.json naming the bundle): no weights to load."""
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        hub.pop("strict", None)  # a weights option: there are none
        if config is None:
            config = PreTrainedConfig.from_pretrained(pretrained_name_or_path, **hub)
        policy = cls(config, **kwargs)
        policy.to(config.device)
        policy.eval()
        return policy

    # --- conversions ---------------------------------------------------------------------------

    def _observation(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The bundle's raw observation: its cameras present in the batch (an absent one is masked,
        as LeRobot does), its state and the task, as numpy; other batch keys are not read."""
        keys = [*self.spec["cameras"], self.spec["state"]["key"]]
        observation = {key: _numpy(batch[key]) for key in keys if key in batch}
        if TASK in batch:
            observation[TASK] = batch[TASK]
        return observation

    def _tensor(self, actions: np.ndarray, batch: Mapping[str, Any]) -> Tensor:
        state = batch.get(self.spec["state"]["key"])
        device = state.device if isinstance(state, Tensor) else torch.device(self.config.device or "cpu")
        return torch.from_numpy(np.ascontiguousarray(actions, dtype=np.float32)).to(device)

    def _rtc(self) -> dict[str, Any] | None:
        """LeRobot's RTCConfig as walkforge takes it (its field names); None: the bundle's."""
        rtc = self.config.rtc_config
        if rtc is None:
            return None
        return {f.name: getattr(rtc, f.name) for f in dataclasses.fields(rtc)}

    def _model_leftover(self, leftover: Tensor) -> np.ndarray:
        if self._last is None or self._last[1] is None:
            raise ValueError("prev_chunk_left_over given before this policy returned any chunk with "
                             "predict_action_chunk: it must be rows of that chunk")
        return model_leftover(_numpy(leftover), *self._last)


def model_leftover(leftover: np.ndarray, actions: np.ndarray, model: np.ndarray) -> np.ndarray:
    """LeRobot's `prev_chunk_left_over` (T, A) or (B, T, A), robot units — each batch row's rows
    k, k+1, … of the last chunk `actions` (B, chunk, A), cut to T rows or zero-padded to them —
    as the same rows of `model` (B, chunk, ≥ A) cut to A dims, zero rows where it was padded:
    (B, T, A) float32. Anything else is refused (ValueError, one line)."""
    left = np.asarray(leftover, dtype=np.float32)
    left = left[None] if left.ndim == 2 else left
    batch, chunk, dims = actions.shape
    if left.ndim != 3 or left.shape[0] != batch or left.shape[2] != dims or left.shape[1] > chunk:
        raise ValueError(f"prev_chunk_left_over: shape {list(np.shape(leftover))}; want (rows ≤ {chunk}, "
                         f"{dims}) rows of the last chunk predict_action_chunk returned (batch {batch})")
    out = np.zeros(left.shape, dtype=np.float32)
    for b in range(batch):
        start = _offset(left[b], actions[b])
        if start is None:
            raise ValueError("prev_chunk_left_over is not a run of rows of the last chunk "
                             "predict_action_chunk returned (robot units, from some row on, cut or "
                             "zero-padded, as LeRobot's rollout hands it): it cannot be mapped to the "
                             "model's space")
        rows = min(left.shape[1], chunk - start)
        out[b, :rows] = model[b, start:start + rows, :dims]
    return out


def _offset(left: np.ndarray, actions: np.ndarray) -> int | None:
    """The first row k of `actions` (chunk, A) such that `left` (T, A) is rows k, k+1, … of it,
    then zero rows past the chunk's end; None when there is none."""
    chunk = len(actions)
    for start in range(chunk + 1):
        rows = min(len(left), chunk - start)
        same = np.allclose(left[:rows], actions[start:start + rows], rtol=1e-6, atol=1e-6)
        if same and not left[rows:].any():
            return start
    return None


def _numpy(value: Any) -> Any:
    """A tensor as numpy on the CPU (floating point as float32: walkforge's dtype); else as is."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        return value.numpy()
    return value


def _batched(array: Any, ndim: int) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    return array if array.ndim == ndim else array[None]


def save_policy_folder(config: WalkforgeConfig, folder: str | Path) -> Path:
    """A folder for LeRobot's `--policy.path=FOLDER`: config.json (type walkforge, the bundle's
    absolute path) and the pass-through processors (policy_preprocessor.json,
    policy_postprocessor.json) LeRobot loads from a pretrained path."""
    from .processor_walkforge import make_walkforge_pre_post_processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, bundle=os.path.abspath(Path(config.bundle).expanduser()))
    config._save_pretrained(folder)
    for pipeline in make_walkforge_pre_post_processors(config):
        pipeline.save_pretrained(folder)
    return folder
