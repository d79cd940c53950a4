"""LeRobot's pre- and post-processors for `--policy.type=walkforge`: pass-through.

The bundle carries LeRobot's processing of the policy it was compiled from (resize with padding,
normalisation, tokenisation, unnormalisation, relative actions) and runs it itself, so these
pipelines change no value: the preprocessor only renames keys (`--rename_map`, empty by default)
and moves tensors to the policy's device, the postprocessor moves the actions to the CPU. They
keep the step names LeRobot's record / eval / rollout override when loading a policy folder
("rename_observations_processor", "device_processor").
"""

from __future__ import annotations

from typing import Any

from lerobot.processor import DeviceProcessorStep, PolicyProcessorPipeline, RenameObservationsProcessorStep
from lerobot.processor.converters import (
    batch_to_transition,
    policy_action_to_transition,
    transition_to_batch,
    transition_to_policy_action,
)
from lerobot.utils.constants import POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME

from .configuration_walkforge import WalkforgeConfig


def make_walkforge_pre_post_processors(
    config: WalkforgeConfig, dataset_stats: Any = None, **kwargs: Any
) -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """(preprocessor, postprocessor); `dataset_stats` is not used: the bundle has its own."""
    preprocessor = PolicyProcessorPipeline(
        steps=[RenameObservationsProcessorStep(rename_map={}),
               DeviceProcessorStep(device=config.device or "cpu")],
        name=POLICY_PREPROCESSOR_DEFAULT_NAME, to_transition=batch_to_transition,
        to_output=transition_to_batch)
    postprocessor = PolicyProcessorPipeline(
        steps=[DeviceProcessorStep(device="cpu")], name=POLICY_POSTPROCESSOR_DEFAULT_NAME,
        to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
    return preprocessor, postprocessor
