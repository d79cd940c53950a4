"""`--policy.type=walkforge`: the config of a policy that runs a walkforge bundle.

`bundle` is the bundle's folder (absolute, or relative to the working directory). Reading its
manifest (no engine is loaded here) fills what LeRobot's plumbing reads off a policy config: the
input features (the bundle's cameras, as (3, H, W) at the model's resolution, and its state), the
action feature, `chunk_size` and `n_action_steps`. Both of the latter are the bundle's: a
different value is refused (they were fixed when the bundle was compiled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.optim.optimizers import AdamWConfig
from lerobot.policies.rtc.configuration_rtc import RTCConfig

NAME = "walkforge"


@PreTrainedConfig.register_subclass(NAME)
@dataclass
class WalkforgeConfig(PreTrainedConfig):
    """A walkforge bundle as a LeRobot policy (inference only).

    bundle: the bundle folder. backend: walkforge.load's ("cpu", "torch", "cuda", "trt", "auto";
    default: "auto" when `device` is a CUDA device, else "cpu"). threads: CPU threads per engine.
    rtc_config: LeRobot's RTCConfig (set by `lerobot-rollout --inference.type=rtc`); None: the
    bundle's own rtc_config over LeRobot's defaults.
    """

    bundle: str | None = None
    backend: str | None = None
    threads: int | None = None
    chunk_size: int | None = None
    n_action_steps: int | None = None
    rtc_config: RTCConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bundle:
            self.read_bundle()

    def read_bundle(self) -> dict[str, Any]:
        """The bundle's observation spec; fills the features, chunk_size and n_action_steps."""
        spec = bundle_spec(self.bundle)
        for name, value in (("chunk_size", spec["chunk_size"]), ("n_action_steps", spec["n_action_steps"])):
            given = getattr(self, name)
            if given is not None and int(given) != int(value):
                raise ValueError(f"--policy.{name}={given}: this bundle's is {value}, fixed when it was "
                                 "compiled (leave it out)")
            setattr(self, name, int(value))
        if not self.input_features:
            self.input_features = input_features(spec)
        if not self.output_features:
            self.output_features = {spec["action"]["key"]: PolicyFeature(FeatureType.ACTION,
                                                                          (spec["action"]["dim"],))}
        return spec

    def validate_features(self) -> None:
        """The action feature LeRobot set (from the dataset or robot) has the bundle's width."""
        if not self.bundle:
            raise ValueError("give the bundle: --policy.bundle=PATH (a folder `walkforge compile` wrote)")
        spec = bundle_spec(self.bundle)
        action = (self.output_features or {}).get(spec["action"]["key"])
        if action is not None and tuple(action.shape)[-1:] != (spec["action"]["dim"],):
            raise ValueError(f"the dataset's or robot's action has shape {tuple(action.shape)}, this "
                             f"bundle's policy gives {spec['action']['dim']} values")

    @property
    def backend_name(self) -> str:
        if self.backend:
            return self.backend
        return "auto" if str(self.device or "").startswith("cuda") else "cpu"

    # --- what PreTrainedConfig requires; a bundle is not trained ----------------------------------

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> None:
        return None

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig()

    def get_scheduler_preset(self) -> None:
        return None


def bundle_spec(bundle: str | Path) -> dict[str, Any]:
    """`FlowPolicy.observation_spec()` read from the manifest alone (no engine, no hashing)."""
    from walkforge.artifacts.bundle import read_typed_manifest
    from walkforge.errors import WalkforgeError
    from walkforge.runtimes.processors import PolicyProcessor

    root = Path(bundle).expanduser()
    try:
        policy = read_typed_manifest(root).policy
        if policy is None:
            raise WalkforgeError(f"{root}: this bundle has no policy entry (not a pi0 / pi0.5 / SmolVLA "
                                 "bundle, or compiled before walkforge read LeRobot folders)")
        return PolicyProcessor(policy, lambda rel: root / rel).spec()
    except WalkforgeError as exc:
        raise ValueError(f"--policy.bundle: {exc}") from None


def input_features(spec: dict[str, Any]) -> dict[str, PolicyFeature]:
    """The bundle's cameras (its empty ones left out: never read) and state as LeRobot features."""
    height, width = spec["image_resolution"]
    image = (3, int(height), int(width))
    features = {key: PolicyFeature(FeatureType.VISUAL, image) for key in spec["cameras"]}
    features[spec["state"]["key"]] = PolicyFeature(FeatureType.STATE, (int(spec["state"]["dim"]),))
    return features
