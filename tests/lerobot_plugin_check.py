"""Run inside a LeRobot venv by tests/test_lerobot_plugin.py: a walkforge bundle through LeRobot's
own plugin discovery, CLI parsing, policy factory, processors and inference helper, as
`lerobot-record --policy.type=walkforge --policy.bundle=…` drives them.

    python lerobot_plugin_check.py BUNDLE OBSERVATIONS.npz OUT_DIR

OBSERVATIONS.npz holds `steps` robot observations (cameras `cam_<i>` uint8 HWC, `state` rows, `task`
strings). Writes OUT_DIR/actions.npz (what LeRobot got back) and OUT_DIR/facts.json (what LeRobot
saw); the test compares both with walkforge's own answers in its process.

No `from __future__ import annotations`: LeRobot's parser.wrap reads the config class off the
function's annotations, and draccus the field types off the dataclass.
"""

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def main(bundle: str, observations: str, out: str) -> None:
    out_dir = Path(out)
    # what every lerobot-* command does first (lerobot_record.main, lerobot_eval.main, …)
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()
    import lerobot
    from lerobot.configs.policies import PreTrainedConfig

    facts: dict = {"lerobot": lerobot.__version__,
                   "known": "walkforge" in PreTrainedConfig.get_known_choices()}
    data = np.load(observations)
    meta = dataset_meta(data, out_dir / "dataset")

    cfg = parse(["--policy.type=walkforge", f"--policy.bundle={bundle}", "--policy.device=cpu"])
    policy, pre, post = build(cfg, meta)
    facts |= {"config": type(cfg.policy).__name__, "policy": type(policy).__qualname__,
              "policy_module": type(policy).__module__, "supports_rtc": policy.supports_rtc(),
              "input_features": sorted(cfg.policy.input_features),
              "n_action_steps": cfg.policy.n_action_steps,
              "pre_steps": [type(s).__name__ for s in pre.steps],
              "post_steps": [type(s).__name__ for s in post.steps]}
    steps = len(data["task"])
    select = [record_step(policy, pre, post, meta, data, i) for i in range(steps)]
    policy.reset()
    after_reset = [record_step(policy, pre, post, meta, data, i) for i in range(2)]
    chunk = predict_chunk(policy, pre, post, meta, data, 0)
    facts["rtc"], guided = rtc_checks(policy, pre, post, meta, data)

    folder = out_dir / "policy"  # --policy.path=FOLDER: what lerobot-rollout takes
    policy.save_pretrained(folder)
    facts["folder"] = sorted(p.name for p in folder.iterdir())
    cfg = parse([f"--policy.path={folder}", "--policy.device=cpu"])
    loaded, pre, post = build(cfg, meta)
    from_folder = [record_step(loaded, pre, post, meta, data, i) for i in range(2)]
    np.savez(out_dir / "actions.npz", select=np.stack(select), after_reset=np.stack(after_reset),
             chunk=chunk, guided=guided, from_folder=np.stack(from_folder))
    (out_dir / "facts.json").write_text(json.dumps(facts, indent=1))


def lerobot_name(name: str, *modules: str):
    """`name` from the first of LeRobot's `modules` that has it (0.4.4's place first, then 0.6.1's)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(f"lerobot.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} is in none of lerobot.{{{', '.join(modules)}}}")


def dataset_meta(data, root: Path):
    """A local dataset's metadata for a robot with the observations' cameras and joints
    (lerobot-record makes one with LeRobotDataset.create from the robot's features)."""
    metadata = lerobot_name("LeRobotDatasetMetadata", "datasets.lerobot_dataset", "datasets.dataset_metadata")
    hw_to_dataset_features = lerobot_name("hw_to_dataset_features", "datasets.utils", "utils.feature_utils")
    joints = {f"j{i}.pos": float for i in range(data["state"].shape[1])}
    cameras = {key: tuple(data[key].shape[1:]) for key in data.files if key.startswith("cam_")}
    features = {**hw_to_dataset_features(joints, "action", use_video=False),
                **hw_to_dataset_features({**joints, **cameras}, "observation", use_video=False)}
    return metadata.create(repo_id="local/walkforge", fps=30, features=features, root=root,
                                         use_videos=False)


def parse(argv: list[str]):
    """`argv` through LeRobot's CLI parser, into a config shaped like lerobot-record's policy part."""
    from lerobot.configs import parser
    from lerobot.configs.policies import PreTrainedConfig

    @dataclass
    class RunConfig:
        policy: PreTrainedConfig | None = None

        def __post_init__(self) -> None:  # as RecordConfig.__post_init__
            path = parser.get_path_arg("policy")
            if path:
                overrides = parser.get_cli_overrides("policy")
                self.policy = PreTrainedConfig.from_pretrained(path, cli_overrides=overrides)
                self.policy.pretrained_path = path

        @classmethod
        def __get_path_fields__(cls) -> list[str]:
            return ["policy"]

    @parser.wrap()
    def run(cfg: RunConfig) -> RunConfig:
        return cfg

    sys.argv = ["lerobot-record", *argv]
    return run()


def build(cfg, meta):
    """Policy and processors as lerobot_record.record builds them."""
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.processor.rename_processor import rename_stats

    policy = make_policy(cfg.policy, ds_meta=meta)
    pre, post = make_pre_post_processors(
        policy_cfg=cfg.policy, pretrained_path=cfg.policy.pretrained_path,
        dataset_stats=rename_stats(meta.stats, {}),
        preprocessor_overrides={"device_processor": {"device": cfg.policy.device},
                                "rename_observations_processor": {"rename_map": {}}})
    return policy, pre, post


def robot_observation(data, i: int) -> dict:
    """Step i as a robot's get_observation() gives it: one float per joint, camera frames HWC uint8."""
    obs = {f"j{j}.pos": float(v) for j, v in enumerate(data["state"][i])}
    obs |= {key: data[key][i] for key in data.files if key.startswith("cam_")}
    return obs


def record_step(policy, pre, post, meta, data, i: int) -> np.ndarray:
    """One control step of lerobot_record.record_loop: the frame, then control_utils.predict_action."""
    build_dataset_frame = lerobot_name("build_dataset_frame", "datasets.utils", "utils.feature_utils")
    predict_action = lerobot_name("predict_action", "utils.control_utils", "common.control_utils")
    get_safe_torch_device = lerobot_name("get_safe_torch_device", "utils.utils", "utils.device_utils")

    frame = build_dataset_frame(meta.features, robot_observation(data, i), prefix="observation")
    device = get_safe_torch_device(policy.config.device)
    action = predict_action(observation=frame, policy=policy, device=device, preprocessor=pre,
                            postprocessor=post, use_amp=False, task=str(data["task"][i]),
                            robot_type="test_robot")
    return action.squeeze(0).numpy()


def batch(pre, meta, data, i: int) -> dict:
    from lerobot.policies.utils import prepare_observation_for_inference

    build_dataset_frame = lerobot_name("build_dataset_frame", "datasets.utils", "utils.feature_utils")

    frame = build_dataset_frame(meta.features, robot_observation(data, i), prefix="observation")
    task = str(data["task"][i])
    return pre(prepare_observation_for_inference(frame, torch.device("cpu"), task, "test_robot"))


def predict_chunk(policy, pre, post, meta, data, i: int) -> np.ndarray:
    with torch.inference_mode():
        return post(policy.predict_action_chunk(batch(pre, meta, data, i))).squeeze(0).numpy()


def queued_leftover(policy, pre, meta, data, facts: dict) -> torch.Tensor:
    """LeRobot's RTC loop up to the next inference: step 0's chunk merged into its ActionQueue
    (policies/rtc/action_queue.py), 5 actions executed, the queue's leftover — cut to the execution
    horizon (10) by the 0.6 rollout's `_normalize_prev_actions_length`; 0.4's RTC example hands it
    whole. facts["leftover"]: the rows of the chunk it holds."""
    from lerobot.policies.rtc.action_queue import ActionQueue
    from lerobot.policies.rtc.configuration_rtc import RTCConfig

    queue = ActionQueue(RTCConfig(enabled=True, execution_horizon=10))
    with torch.inference_mode():
        original = policy.predict_action_chunk(batch(pre, meta, data, 0))
    queue.merge(original.squeeze(0).clone(), original.squeeze(0).clone(), 0, queue.get_action_index())
    for _ in range(5):
        queue.get()
    leftover = queue.get_left_over()
    try:
        from lerobot.rollout.inference.rtc import _normalize_prev_actions_length, supports_rtc_inference
    except ImportError:
        pass
    else:
        leftover = _normalize_prev_actions_length(leftover, target_steps=10)
        facts["rollout_accepts_policy"] = supports_rtc_inference(policy)
    facts["leftover"] = [5, 5 + len(leftover)]
    return leftover


def rtc_checks(policy, pre, post, meta, data) -> tuple[dict, np.ndarray]:
    """The leftover mapping (robot units → model space) and its refusals, then a guided chunk of
    step 1 from the leftover LeRobot's RTC queue hands (`queued_leftover`); the guided chunk is
    empty when this walkforge or bundle has no RTC (the error is in facts)."""
    from lerobot_policy_walkforge.modeling_walkforge import model_leftover

    rng = np.random.default_rng(0)
    actions = rng.standard_normal((1, 6, 3)).astype(np.float32)
    model = rng.standard_normal((1, 6, 5)).astype(np.float32)
    cut = model_leftover(actions[0, 2:5], actions, model)  # rows 2..4 (an execution horizon of 3)
    padded = model_leftover(np.concatenate([actions[0, 4:], np.zeros((2, 3), np.float32)]), actions, model)
    tail = np.concatenate([model[0, 4:, :3], np.zeros((2, 3))])
    facts: dict = {"cut": bool(np.array_equal(cut[0], model[0, 2:5, :3])),
                   "padded": bool(np.array_equal(padded[0], tail))}
    for name, bad in (("not_rows", actions[0, 2:5] + 1), ("too_long", np.zeros((7, 3))),
                      ("wrong_dims", actions[0, :, :2])):
        try:
            model_leftover(bad, actions, model)
            facts[name] = "accepted"
        except ValueError as exc:
            facts[name] = str(exc)
    leftover = queued_leftover(policy, pre, meta, data, facts)
    guided = np.zeros((0,), np.float32)
    try:
        with torch.inference_mode():
            guided = post(policy.predict_action_chunk(batch(pre, meta, data, 1), inference_delay=2,
                                                      prev_chunk_left_over=leftover)).squeeze(0).numpy()
    except Exception as exc:  # reported, the test decides
        facts["guided_error"] = f"{type(exc).__name__}: {exc}"
    try:
        with torch.inference_mode():
            policy.predict_action_chunk(batch(pre, meta, data, 1), prev_chunk_left_over=leftover + 1)
        facts["bad_leftover"] = "accepted"
    except ValueError as exc:
        facts["bad_leftover"] = str(exc)
    return facts, guided


if __name__ == "__main__":
    main(*sys.argv[1:])
