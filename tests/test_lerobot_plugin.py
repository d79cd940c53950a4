"""The LeRobot plugin (lerobot_policy_walkforge/) against a real LeRobot 0.4.4, in its own venv.

tests/lerobot_plugin_check.py runs there: LeRobot's plugin discovery imports the plugin, its CLI
parser builds `--policy.type=walkforge --policy.bundle=…` (and later `--policy.path=FOLDER`),
`make_policy` / `make_pre_post_processors` build our policy and pass-through processors as
lerobot-record does, and `control_utils.predict_action` runs record's control steps on robot
frames. Here, in walkforge's own process, the same observations give the same actions:
`select_action` step by step (over a queue refill and a reset), `predict_action_chunk`, and an
RTC chunk guided by the robot-unit leftover LeRobot's rollout would hand back.

The venv (build/venvs/lerobot-0.4.4-plugin) is made once, cached, and rebuilt when it no longer
imports: `python -m venv --system-site-packages` (the system's torch and numpy), LeRobot with
--no-deps plus what its config, factory, processor and dataset-metadata imports need, an
import-only torchvision stub (PyPI's torchvision does not load beside this torch 2.13.0+cpu; the
plugin path never calls it), and the plugin itself, editable. walkforge comes from this checkout
(PYTHONPATH). About 80 s to build from PyPI; skipped, with pip's error, only if pip cannot install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot_folder import write_tokenizer
from tolerances import PI0_TINY_ACTIONS_TOL, rel_err

import walkforge

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "lerobot_policy_walkforge"
VENV = ROOT / "build" / "venvs" / "lerobot-0.4.4-plugin"
LEROBOT = "lerobot==0.4.4"
DEPS = [  # LeRobot 0.4.4's own bounds for what importing its configs, factory and processors needs
    "draccus==0.10.0", "datasets>=4,<5", "huggingface-hub>=0.34.2,<0.36", "transformers>=4.57.1,<5",
    "diffusers>=0.27.2,<0.36", "accelerate>=1.10,<2", "deepdiff>=7,<9", "imageio>=2.34,<3",
    "pyserial>=3.5,<4", "av>=15,<16", "einops>=0.8,<0.9", "gymnasium>=1.1.1,<2",
]
STEPS = 53  # n_action_steps is 50: two chunks
TASKS = ("pick the cube", "open it", "stack")
TOL = PI0_TINY_ACTIONS_TOL  # the same maths on the same engines; the named fp32 bound all the same

TORCHVISION_STUB = '''"""Import-only torchvision stub (tests/test_lerobot_plugin.py): every torchvision.*
module imports; every name in one is a class that refuses to be instantiated, but InterpolationMode."""
import enum, importlib.abc, importlib.machinery, sys, types

InterpolationMode = enum.Enum("InterpolationMode", {n.upper().replace("-", "_"): n for n in (
    "nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")})


class _Missing:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"torchvision stub: {type(self).__qualname__} is not available")


def _getattr(module):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return InterpolationMode
        setattr(sys.modules[module], name, type(name, (_Missing,), {"__module__": module}))
        return getattr(sys.modules[module], name)
    return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__, module.__getattr__ = [], _getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
__getattr__ = _getattr(__name__)
__version__ = "0.0.0+stub"
from . import transforms  # noqa: E402
'''

PROBE = ("import lerobot, lerobot_policy_walkforge as plugin, sys; "
         "from lerobot.policies.factory import make_policy; "
         "sys.exit(lerobot.__version__ != '0.4.4' or not plugin.__file__.startswith(sys.argv[1]))")


def _env() -> dict[str, str]:
    """This checkout's walkforge first on the path (the system's may be another install)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def lerobot_python() -> Path:
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", PROBE, str(PLUGIN / "src")]
    if python.exists() and subprocess.run(probe, capture_output=True, env=_env()).returncode == 0:
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["--no-deps", LEROBOT], DEPS, ["--no-deps", "-e", str(PLUGIN)]):
        done = subprocess.run([*pip, *args], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(f"pip cannot install {' '.join(args)}: {done.stderr.strip()[-300:]}")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "torchvision").mkdir(exist_ok=True)
    (Path(site) / "torchvision" / "__init__.py").write_text(TORCHVISION_STUB)
    done = subprocess.run(probe, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"built {VENV} in {time.monotonic() - start:.0f} s")
    return python


@pytest.fixture(scope="module")
def pi0_bundle(compiled) -> Path:
    """The serving tests' tiny pi0 (with a tokenizer): the same request, so one compile a session."""
    tokenizer = compiled.inputs("serving-tokenizer", lambda d: write_tokenizer(d / "tok"))
    return compiled("pi0", variant="tiny", seed=3, gpu_archs=(), tokenizer=tokenizer / "tok")


@pytest.fixture(scope="module")
def policy(pi0_bundle):
    return walkforge.load(pi0_bundle, spinning=False)


@pytest.fixture(scope="module")
def observations(policy) -> dict[str, np.ndarray]:
    """STEPS robot observations: uint8 HWC frames of another size than the model's, states, tasks."""
    spec = policy.observation_spec()
    rng = np.random.default_rng(5)
    data = {f"cam_{i}": rng.integers(0, 256, (STEPS, 96, 128, 3), dtype=np.uint8)
            for i in range(len(spec["cameras"]))}
    data["state"] = rng.standard_normal((STEPS, spec["state"]["dim"])).astype(np.float32)
    data["task"] = np.array([TASKS[i % len(TASKS)] for i in range(STEPS)])
    return data


@pytest.fixture(scope="module")
def lerobot_run(lerobot_python, pi0_bundle, observations, tmp_path_factory) -> tuple[dict, dict]:
    """What LeRobot saw (facts) and got back (actions) in tests/lerobot_plugin_check.py."""
    out = tmp_path_factory.mktemp("lerobot-plugin")
    np.savez(out / "observations.npz", **observations)
    script = ROOT / "tests" / "lerobot_plugin_check.py"
    done = subprocess.run([str(lerobot_python), str(script), str(pi0_bundle), str(out / "observations.npz"),
                           str(out)], capture_output=True, text=True, timeout=600, env=_env(), cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads((out / "facts.json").read_text())
    with np.load(out / "actions.npz") as actions:
        return facts, dict(actions)


def raw(policy, observations: dict, i: int) -> dict:
    """Step i as walkforge takes it (the same frames, state and task LeRobot's robot gave)."""
    cameras = policy.observation_spec()["cameras"]
    obs = {key: observations[f"cam_{v}"][i] for v, key in enumerate(cameras)}
    return obs | {"observation.state": observations["state"][i], "task": str(observations["task"][i])}


def test_lerobot_discovers_and_builds_the_plugin(lerobot_run, policy):
    facts, _ = lerobot_run
    spec = policy.observation_spec()
    assert facts["lerobot"] == "0.4.4"
    assert facts["known"]  # register_third_party_plugins imported it: PreTrainedConfig knows "walkforge"
    assert (facts["config"], facts["policy"]) == ("WalkforgeConfig", "WalkforgePolicy")
    assert facts["policy_module"] == "lerobot_policy_walkforge.modeling_walkforge"
    assert facts["input_features"] == sorted([*spec["cameras"], spec["state"]["key"]])
    assert facts["n_action_steps"] == spec["n_action_steps"]
    # pass-through processors: nothing LeRobot runs normalises, tokenises or resizes a second time
    assert facts["pre_steps"] == ["RenameObservationsProcessorStep", "DeviceProcessorStep"]
    assert facts["post_steps"] == ["DeviceProcessorStep"]
    assert facts["folder"] == ["config.json", "policy_postprocessor.json", "policy_preprocessor.json"]


def test_select_action_equals_walkforge(lerobot_run, policy, observations):
    _, actions = lerobot_run
    policy.reset()
    want = np.stack([policy.select_action(raw(policy, observations, i)) for i in range(STEPS)])
    assert actions["select"].shape == want.shape
    assert rel_err(actions["select"], want) <= TOL
    for name in ("after_reset", "from_folder"):  # reset(); a policy loaded from --policy.path=FOLDER
        policy.reset()
        want = np.stack([policy.select_action(raw(policy, observations, i)) for i in range(2)])
        assert rel_err(actions[name], want) <= TOL, name
    policy.reset()


def test_predict_action_chunk_equals_walkforge(lerobot_run, policy, observations):
    _, actions = lerobot_run
    want = policy.predict_action_chunk(raw(policy, observations, 0))
    assert actions["chunk"].shape == want.shape
    assert rel_err(actions["chunk"], want) <= TOL


def test_rtc_leftover_maps_to_model_space(lerobot_run, policy, observations):
    facts, actions = lerobot_run
    rtc = facts["rtc"]
    assert rtc["cut"] and rtc["padded"]
    for name in ("not_rows", "too_long", "wrong_dims"):
        assert rtc[name].startswith("prev_chunk_left_over") and "\n" not in rtc[name], (name, rtc[name])
    if not hasattr(policy, "predict_chunk"):
        pytest.skip("this walkforge's FlowPolicy has no predict_chunk (real-time chunking) yet")
    assert facts["supports_rtc"], rtc.get("guided_error")
    assert rtc["bad_leftover"].startswith("prev_chunk_left_over is not a run of rows"), rtc["bad_leftover"]
    dims = policy.observation_spec()["action"]["dim"]
    start, end = rtc["leftover"]  # the rows of step 0's chunk LeRobot's ActionQueue handed back
    first = policy.predict_chunk(raw(policy, observations, 0))
    want = policy.predict_chunk(raw(policy, observations, 1), inference_delay=2,
                                prev_chunk_left_over=first.model[start:end, :dims]).actions
    assert actions["guided"].shape == want.shape, rtc.get("guided_error")
    assert rel_err(actions["guided"], want) <= TOL
    unguided = policy.predict_action_chunk(raw(policy, observations, 1))
    assert rel_err(want, unguided) > 100 * TOL  # the guidance did something
