"""Real-time chunking (LeRobot 0.6.1's RTC) in the engines: `predict_chunk(obs, inference_delay=d,
prev_chunk_left_over=P)` on tiny pi0 (a LeRobot folder with MEAN_STD stats, 6 action dims and an
`rtc_config`), SmolVLA and pi0.5 against a torch reference written HERE from LeRobot's formulas
(`RTCProcessor.denoise_step`, `get_prefix_weights`, `euler_integrate`) over the recipe's eager
modules, step by step; unguided requests bit-identical to before; rows with and without RTC in one
batch; every bad RTC input as one line; the rollout's queue, latency and leftovers
(`runtimes.rtc.RealTimeChunker`) against LeRobot's `ActionQueue` / rollout rules."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bundles import private_copy
from lerobot_folder import write_folder
from tolerances import POLICY_CHUNK_TOL, rel_err

import walkforge
from walkforge.errors import WalkforgeError
from walkforge.graphs.walk import Loop
from walkforge.recipes import get_recipe
from walkforge.recipes.blocks.flow import guidance_weight
from walkforge.recipes.lerobot import RTC_SCHEDULES, rtc_config
from walkforge.runtimes.backends.torch import build_model
from walkforge.runtimes.processors.steps import run_post
from walkforge.runtimes.rtc import (
    SCHEDULES,
    ActionQueue,
    LatencyTracker,
    RealTimeChunker,
    RTCSettings,
    guidance,
    guide_feeds,
    prefix_weights,
    reanchored,
    rtc_settings,
)

VLM = Path(__file__).parents[1] / "fixtures" / "lerobot" / "smolvlm2-tiny"  # config.json + tokenizer
RTC_TOL = POLICY_CHUNK_TOL  # 1e-4 relative to the chunk's scale: the bound for the guided chunk
SAME_TOL = 1e-5  # one request alone and in a batch: the same engines, fp32 rounding
FOLDER_RTC = {"enabled": True, "prefix_attention_schedule": "EXP", "max_guidance_weight": 5.0,
              "execution_horizon": 8, "debug": False, "debug_maxlen": 100}  # as LeRobot saves RTCConfig


# --- bundles ------------------------------------------------------------------------------------

def _pi0_folder(folder: Path) -> None:
    made = write_folder(folder / "ckpt", "pi0", seed=5, tokenizer=True)
    meta = json.loads((made.path / "config.json").read_text())
    (made.path / "config.json").write_text(json.dumps(meta | {"rtc_config": FOLDER_RTC}, indent=4))


@pytest.fixture(scope="module")
def pi0(compiled):
    """A LeRobot pi0 folder (MEAN_STD, 7 state / 6 action dims, an rtc_config) compiled."""
    folder = compiled.inputs("rtc-pi0-folder", _pi0_folder) / "ckpt"
    bundle = compiled("pi0", checkpoint=folder, tokenizer=folder / "tokenizer", gpu_archs=())
    return walkforge.load(bundle, spinning=False)


@pytest.fixture(scope="module")
def smolvla(compiled):
    return walkforge.load(compiled("smolvla", variant="tiny", seed=4, gpu_archs=(), tokenizer=VLM),
                          spinning=False)


@pytest.fixture(scope="module")
def pi05(compiled):
    return walkforge.load(compiled("pi05", variant="tiny", seed=3, gpu_archs=()), spinning=False)


def observation(policy, seed: int) -> dict:
    spec = policy.observation_spec()
    rng = np.random.default_rng(seed)
    obs: dict = {k: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for k in spec["cameras"]}
    obs[spec["state"]["key"]] = rng.standard_normal(spec["state"]["dim"]).astype(np.float32)
    return obs | {"task": "pick up the cube"}


def noise(policy, seed: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    shape = policy.observation_spec()["noise"]
    return np.random.default_rng(1000 + seed).standard_normal((*batch, *shape)).astype(np.float32)


# --- the reference: LeRobot's RTC written out with torch over the recipe's eager modules ---------

def lerobot_prefix_weights(schedule: str, start: int, end: int, total: int) -> torch.Tensor:
    """`RTCProcessor.get_prefix_weights(start, end, total)`, from its code's rules."""
    start = min(start, end)
    if schedule == "ZEROS":
        w = torch.zeros(total)
        w[:start] = 1.0
        return w
    if schedule == "ONES":
        w = torch.ones(total)
        w[end:] = 0.0
        return w
    steps = total - max(total - end, 0) - start
    lin = torch.tensor([]) if end <= start or steps <= 0 else torch.linspace(1, 0, steps + 2)[1:-1]
    if schedule == "EXP":
        lin = lin * torch.expm1(lin).div(math.e - 1)
    if total - end > 0:
        lin = torch.cat([lin, torch.zeros(total - end)])
    return torch.cat([torch.ones(min(start, total)), lin]) if min(start, total) > 0 else lin


def lerobot_guided(x_t: torch.Tensor, v: torch.Tensor, time: float, prev: torch.Tensor, delay: int,
                   horizon: int, schedule: str, max_weight: float) -> torch.Tensor:
    """`RTCProcessor.denoise_step` for one row (1, H, A) given its velocity `v`: the guided velocity."""
    tau = 1 - time
    horizon = min(horizon, prev.shape[1])
    padded = torch.zeros_like(x_t)
    padded[:, :prev.shape[1], :prev.shape[2]] = prev
    weights = lerobot_prefix_weights(schedule, delay, horizon, x_t.shape[1])[None, :, None]
    with torch.enable_grad():
        x = x_t.clone().detach().requires_grad_(True)  # marked after v was computed, as LeRobot does
        x1 = x - time * v
        err = (padded - x1) * weights
        correction = torch.autograd.grad(x1, x, err.clone().detach())[0]
    most = torch.as_tensor(max_weight)
    tau_t = torch.as_tensor(tau)
    inv_r2 = ((1 - tau_t) ** 2 + tau_t**2) / (1 - tau_t) ** 2
    c = torch.nan_to_num((1 - tau_t) / tau_t, posinf=most)
    weight = torch.minimum(torch.nan_to_num(c * inv_r2, posinf=most), most)
    return v - weight * correction


def reference(policy, feeds: dict[str, np.ndarray], start: np.ndarray, rows: list[dict | None]) -> np.ndarray:
    """The chunk (B, chunk, max_action_dim) of walk inputs `feeds` from the recipe's eager
    `sample_actions`, each Euler step's velocity guided per row as LeRobot guides it (`rows[b]`:
    prev, delay, horizon, schedule, max_weight; None: unguided)."""
    _, _, model = build_model(policy.bundle)
    plain, steps = model.denoise_step, model.cfg.num_steps

    def step(x_t, t, dt, *rest):
        v = plain(x_t, t, torch.ones_like(dt), *rest) - x_t  # one Euler step of length 1: the velocity
        time = 1.0 + round((1.0 - float(t[0])) * steps) * (-1.0 / steps)  # euler_integrate's float
        v = torch.cat([v[b:b + 1] if row is None else
                       lerobot_guided(x_t[b:b + 1], v[b:b + 1], time, torch.from_numpy(row["prev"]),
                                      row["delay"], row["horizon"], row["schedule"], row["max_weight"])
                       for b, row in enumerate(rows)])
        return x_t + dt * v

    model.denoise_step = step
    with torch.no_grad():
        args = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
        return model.sample_actions(**args, noise=torch.from_numpy(start)).numpy()


def walk_inputs(policy, obs: dict) -> dict[str, np.ndarray]:
    prepared = policy.processor.prepare(obs)
    return {k: prepared.feeds[k] for k in policy.inputs}


def lerobot_leftover(chunk, start: int, rows: int, dims: int) -> np.ndarray:
    """The unexecuted rows of a chunk as LeRobot holds them: model space, robot's action dims."""
    return np.ascontiguousarray(chunk.model[start:start + rows, :dims])


# --- the guided chunk vs LeRobot's formulas ------------------------------------------------------

CASES = {"delay0": (0, 25), "delay3-short": (3, 6)}  # (inference delay, leftover rows); horizon 10, pi0's 8


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["pi0", "smolvla"])
def test_rtc_chunk_equals_lerobots_formulas(kind, schedule, case, request):
    policy = request.getfixturevalue(kind)
    delay, rows = CASES[case]
    obs, before = observation(policy, 1), observation(policy, 2)
    dims = 6 if kind == "pi0" else 20  # pi0: the robot's 6 of 32; smolvla: a leftover of fewer dims too
    prev = lerobot_leftover(policy.predict_chunk(before, noise(policy, 2)), 25, rows, dims)
    settings = {"prefix_attention_schedule": schedule}
    got = policy.predict_chunk(obs, noise(policy, 1), inference_delay=delay, prev_chunk_left_over=prev,
                               rtc=settings)
    resolved = policy.rtc_settings(settings)
    row = {"prev": prev[None], "delay": delay, "horizon": resolved.execution_horizon, "schedule": schedule,
           "max_weight": resolved.max_guidance_weight}
    want = reference(policy, walk_inputs(policy, obs), noise(policy, 1, (1,)), [row])[0]
    unguided = policy.predict_chunk(obs, noise(policy, 1)).model
    err = rel_err(got.model, want)
    print(f"{kind} {schedule} {case}: rel err {err:.2e}, guidance moved the chunk by "
          f"{rel_err(unguided, want):.2e}")
    assert err <= RTC_TOL
    guided = prefix_weights(schedule, delay, min(resolved.execution_horizon, rows), 50).any()  # not ZEROS d0
    if guided:
        assert rel_err(unguided, want) > 100 * RTC_TOL  # the guidance did something the test can see
    np.testing.assert_array_equal(got.actions, policy.processor.postprocess(got.model[None],
                                                                            policy.processor.state(obs)[0])[0])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pi05_guide_inputs_equal_lerobots_formulas(pi05, schedule):
    """pi0.5 through `infer` (its variant bundle has no tokenizer): the guide walk's inputs made by
    runtimes.rtc for two rows, one delayed with a leftover shorter than the horizon."""
    cfg = get_recipe("pi05").variant("tiny")
    feeds = get_recipe("pi05").fake_inputs(cfg, batch=2, seed=6)
    start = feeds.pop("noise")
    rng = np.random.default_rng(7)
    prevs = [rng.standard_normal(shape).astype(np.float32) for shape in ((25, 32), (6, 20))]
    settings = RTCSettings(prefix_attention_schedule=schedule)
    rows = [guidance(p, d, None, settings, cfg.action_horizon) for p, d in zip(prevs, (0, 3), strict=True)]
    got = pi05.infer(**feeds, noise=start, **guide_feeds(rows, cfg.action_horizon, cfg.action_dim))
    want = reference(pi05, feeds, start, [{"prev": p[None], "delay": d, "horizon": 10, "schedule": schedule,
                                           "max_weight": 10.0} for p, d in zip(prevs, (0, 3), strict=True)])
    unguided = pi05.infer(**feeds, noise=start)
    print(f"pi05 {schedule}: rel err {rel_err(got, want):.2e}, guidance moved the chunk by "
          f"{rel_err(unguided, want):.2e}")
    assert rel_err(got, want) <= RTC_TOL
    assert rel_err(unguided[1], want[1]) > 100 * RTC_TOL  # row 1 (delay 3) is guided by every schedule


def test_prefix_weights_are_lerobots():
    for schedule in SCHEDULES:
        for delay, horizon, total in [(0, 10, 50), (3, 10, 50), (3, 6, 50), (12, 10, 50), (0, 0, 50),
                                      (5, 50, 50), (0, 1, 50), (49, 50, 50), (2, 2, 4)]:
            want = lerobot_prefix_weights(schedule, delay, horizon, total).numpy()
            got = prefix_weights(schedule, delay, horizon, total)
            assert got.shape == want.shape == (total,) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-7, err_msg=f"{schedule} {delay} {horizon}")
    # LeRobot's rules give 1 before the delay, and H/(H+1) first without one (docs/policy.md)
    assert prefix_weights("LINEAR", 0, 10, 50)[0] == pytest.approx(10 / 11)
    assert prefix_weights("LINEAR", 3, 10, 50)[:4].tolist() == pytest.approx([1, 1, 1, 7 / 8])


def test_guidance_weight_is_lerobots():
    tau = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.7, 0.9, 0.95], dtype=torch.float32)
    for most in (10.0, 5.0, 1.0):
        got = guidance_weight(tau, torch.full_like(tau, most))
        for g, t in zip(got, tau.tolist(), strict=True):
            t_ = torch.as_tensor(t)
            c = torch.nan_to_num((1 - t_) / t_, posinf=most)
            want = torch.minimum(torch.nan_to_num(c * ((1 - t_) ** 2 + t_**2) / (1 - t_) ** 2, posinf=most),
                                 torch.as_tensor(most))
            assert float(g) == pytest.approx(float(want), rel=1e-6)
    assert guidance_weight(torch.zeros(1), torch.full((1,), 10.0)).item() == 10.0  # τ = 0: the max


# --- unguided and mixed batches -------------------------------------------------------------------

def test_without_rtc_inputs_the_actions_are_bit_identical(pi0):
    obs, start = observation(pi0, 3), noise(pi0, 3)
    plain = pi0.predict_action_chunk(obs, start)
    np.testing.assert_array_equal(pi0.predict_chunk(obs, start).actions, plain)
    np.testing.assert_array_equal(pi0.predict_chunk(obs, start, inference_delay=4).actions, plain)
    prev = np.ones((10, 6), np.float32)
    off = pi0.predict_chunk(obs, start, prev_chunk_left_over=prev, rtc={"enabled": False})
    np.testing.assert_array_equal(off.actions, plain)  # LeRobot: RTC disabled ignores the leftover
    zero = pi0.predict_chunk(obs, start, prev_chunk_left_over=prev, execution_horizon=0)
    np.testing.assert_array_equal(zero.actions, plain)  # no row guided: no guide run
    # the guide walk run with every weight 0 leaves the chunk exactly as it was
    feeds = walk_inputs(pi0, obs)
    guide = {"prev_chunk": np.ones((1, 50, 32), np.float32), "prefix_weights": np.zeros((1, 50), np.float32),
             "max_guidance": np.full(1, 10.0, np.float32)}
    np.testing.assert_array_equal(pi0.infer(**feeds, noise=start[None], **guide),
                                  pi0.infer(**feeds, noise=start[None]))


def test_a_batch_mixing_rtc_and_plain_rows_equals_each_alone(pi0):
    a, b = observation(pi0, 4), observation(pi0, 5)
    prev = lerobot_leftover(pi0.predict_chunk(observation(pi0, 6), noise(pi0, 6)), 25, 25, 6)
    rtc = {"inference_delay": 3, "prev_chunk_left_over": prev}
    both = pi0.predict_chunks([a, b], [noise(pi0, 4), noise(pi0, 5)], rtc_inputs=[rtc, None])
    plain = pi0.predict_chunks([a, b], [noise(pi0, 4), noise(pi0, 5)])
    np.testing.assert_array_equal(both[1].model, plain[1].model)  # weight 0: untouched, bit for bit
    alone = [pi0.predict_chunk(a, noise(pi0, 4), **rtc).model, pi0.predict_chunk(b, noise(pi0, 5)).model]
    print(f"batch vs alone: RTC row {rel_err(both[0].model, alone[0]):.2e}, plain row "
          f"{rel_err(both[1].model, alone[1]):.2e}")
    assert rel_err(both[0].model, alone[0]) <= SAME_TOL
    assert rel_err(both[1].model, alone[1]) <= SAME_TOL
    assert rel_err(both[0].model, plain[0].model) > 100 * SAME_TOL


def test_a_batched_observation_takes_a_batched_leftover_and_a_delay_per_row(pi0):
    a, b = observation(pi0, 7), observation(pi0, 8)
    batch = {k: np.stack([a[k], b[k]]) for k in a if k != "task"} | {"task": [a["task"], b["task"]]}
    prev = np.random.default_rng(9).standard_normal((2, 12, 6)).astype(np.float32)
    start = noise(pi0, 7, (2,))
    got = pi0.predict_chunk(batch, start, inference_delay=[0, 3], prev_chunk_left_over=prev)
    assert got.actions.shape == (2, 50, 6) and got.model.shape == (2, 50, 32)
    for i, obs in enumerate((a, b)):
        alone = pi0.predict_chunk(obs, start[i], inference_delay=[0, 3][i], prev_chunk_left_over=prev[i])
        print(f"batched row {i} vs alone: {rel_err(got.model[i], alone.model):.2e}")
        assert rel_err(got.model[i], alone.model) <= SAME_TOL
    rows = [{"prev": prev[i:i + 1], "delay": d, "horizon": 8, "schedule": "EXP", "max_weight": 5.0}
            for i, d in enumerate((0, 3))]
    feeds = {k: np.concatenate([walk_inputs(pi0, a)[k], walk_inputs(pi0, b)[k]]) for k in pi0.inputs}
    err = rel_err(got.model, reference(pi0, feeds, start, rows))
    print(f"batched leftover vs LeRobot's formulas: {err:.2e}")
    assert err <= RTC_TOL


# --- settings: the folder's, the caller's, LeRobot's ------------------------------------------------

def test_the_folders_rtc_config_gives_the_defaults(pi0, smolvla):
    kept = {k: v for k, v in FOLDER_RTC.items() if "debug" not in k}
    assert pi0.bundle.typed.policy.extra["rtc_config"] == kept
    assert pi0.rtc_settings() == RTCSettings(True, "EXP", 5.0, 8)
    assert pi0.rtc_settings({"execution_horizon": 4}) == RTCSettings(True, "EXP", 5.0, 4)
    assert smolvla.rtc_settings() == RTCSettings(True, "LINEAR", 10.0, 10)  # none in a variant: LeRobot's
    assert rtc_settings({"prefix_attention_schedule": "exp", "debug": True}) == RTCSettings(True, "EXP")
    ones = {"prefix_attention_schedule": "ONES"}
    assert rtc_config(ones | {"debug_maxlen": 3}) == ones
    assert set(RTC_SCHEDULES) == set(SCHEDULES)
    with pytest.raises(WalkforgeError, match="rtc_config.prefix_attention_schedule"):
        rtc_config({"prefix_attention_schedule": "CUBIC"})
    with pytest.raises(WalkforgeError, match="rtc_config.max_guidance_weight"):
        rtc_config({"max_guidance_weight": 0})


BAD = [
    ({"rtc": {"max_guidance": 3}}, "unknown setting 'max_guidance'.*max_guidance_weight"),
    ({"rtc": {"prefix_attention_schedule": "CUBIC"}}, "prefix_attention_schedule"),
    ({"rtc": {"max_guidance_weight": 0}}, "max_guidance_weight"),
    ({"rtc": {"max_guidance_weight": float("nan")}}, "max_guidance_weight"),
    ({"rtc": {"enabled": "yes"}}, "enabled"),
    ({"rtc": ["EXP"]}, "mapping"),
    ({"execution_horizon": -1}, "execution_horizon"),
    ({"execution_horizon": 2.5}, "execution_horizon"),
    ({"inference_delay": -1}, "inference_delay"),
    ({"inference_delay": 1.5}, "inference_delay"),
    ({"inference_delay": [1, 2]}, "inference_delay: 2 values for a batch of 1"),
    ({"prev_chunk_left_over": np.zeros((51, 6))}, r"prev_chunk_left_over: shape \[51, 6\]"),
    ({"prev_chunk_left_over": np.zeros((10, 33))}, r"prev_chunk_left_over: shape \[10, 33\]"),
    ({"prev_chunk_left_over": np.zeros((1, 10, 6))}, r"prev_chunk_left_over: shape \[1, 10, 6\]"),
    ({"prev_chunk_left_over": np.full((10, 6), np.nan)}, "NaN"),
    ({"prev_chunk_left_over": [["a"]]}, "not an array of numbers"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD)
def test_bad_rtc_inputs_are_one_line_errors(pi0, kwargs, match):
    call = {"prev_chunk_left_over": np.zeros((10, 6), np.float32)} | kwargs
    with pytest.raises(WalkforgeError, match=match) as caught:
        pi0.predict_chunk(observation(pi0, 0), **call)
    assert "\n" not in str(caught.value)


def test_bad_batch_rtc_inputs_are_one_line_errors(pi0):
    obs = observation(pi0, 0)
    cases = [
        (lambda: pi0.predict_chunks([obs], rtc_inputs=[{"delay": 3}]), "unknown key"),
        (lambda: pi0.predict_chunks([obs], rtc_inputs=[None, None]), "2 rtc_inputs for 1 observations"),
        (lambda: pi0.predict_chunks([obs], rtc_inputs=["x"]), "a mapping"),
        (lambda: pi0.infer(**walk_inputs(pi0, obs), prefix_weights=np.zeros((1, 50), np.float32)),
         "together"),
        (lambda: pi0.infer(**walk_inputs(pi0, obs), prev_chunk=np.zeros((2, 50, 32), np.float32),
                           prefix_weights=np.zeros((2, 50), np.float32), max_guidance=np.ones(2, np.float32)),
         "'batch'"),
    ]
    for call, match in cases:
        with pytest.raises(WalkforgeError, match=match) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_the_plan_names_the_guide_only_when_there_is_one(pi0):
    plain = Loop(body="denoise", count="num_steps", carry={"x_next": "x_t"}, schedule="euler")
    assert "guide" not in plain.to_json()  # older manifests' loops, written and read as before
    assert Loop(**{**vars(plain), "guide": "guide"}).to_json()["guide"] == "guide"
    loop = next(step for step in pi0.bundle.typed.plan if isinstance(step, dict))
    assert loop["guide"] == "guide" and pi0.has_guide
    assert [s.name for s in pi0.engines["guide"].outputs] == ["x_guided"]


def test_a_bundle_without_the_guide_walk_refuses_rtc(pi0, tmp_path):
    copy = private_copy(pi0.bundle.root, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["plan"] = [{k: v for k, v in s.items() if k != "guide"} if isinstance(s, dict) else s
                        for s in manifest["plan"]]  # as walkforge < 0.5 wrote it
    (copy / "manifest.json").write_text(json.dumps(manifest))
    old = walkforge.load(copy, spinning=False)
    obs = observation(old, 0)
    with pytest.raises(WalkforgeError, match="recompile it with walkforge ≥ 0.5"):
        old.predict_chunk(obs, prev_chunk_left_over=np.zeros((10, 6), np.float32))
    np.testing.assert_array_equal(old.predict_action_chunk(obs, noise(old, 0)),
                                  pi0.predict_action_chunk(obs, noise(pi0, 0)))


# --- the rollout: queue, latency, leftovers --------------------------------------------------------

def test_action_queue_replaces_with_rtc_and_appends_without():
    model, robot = np.arange(20.0).reshape(10, 2), np.arange(20.0).reshape(10, 2) + 100
    queue = ActionQueue(rtc=True)
    assert queue.get() is None and queue.left_over() is None and queue.empty()
    queue.merge(model, robot, delay=0)
    assert [queue.get()[0] for _ in range(4)] == [100, 102, 104, 106]
    np.testing.assert_array_equal(queue.left_over(), model[4:])
    np.testing.assert_array_equal(queue.processed_left_over(), robot[4:])
    queue.merge(model + 1000, robot + 1000, delay=3)  # the first 3 rows ran on the old chunk meanwhile
    assert queue.qsize() == 7 and queue.action_index() == 0 and queue.get()[0] == 1106
    queue.merge(model, robot, delay=99)  # clamped to the chunk: nothing left
    assert queue.empty() and len(queue.left_over()) == 0
    plain = ActionQueue(rtc=False)
    plain.merge(model, robot, delay=5)
    plain.get(), plain.get()
    plain.merge(model + 1000, robot + 1000, delay=5)  # appended after the 8 unconsumed, delay unused
    assert plain.qsize() == 18 and plain.get()[0] == 104
    np.testing.assert_array_equal(plain.left_over()[7:], model + 1000)
    plain.clear()
    assert plain.get() is None


def test_latency_tracker_keeps_the_max_and_a_window():
    tracker = LatencyTracker(maxlen=3)
    assert tracker.max() == 0.0 and tracker.percentile(0.5) == 0.0
    for latency in (0.2, 0.5, -1.0, 0.1, 0.1, 0.1):
        tracker.add(latency)
    assert len(tracker) == 3 and tracker.max() == 0.5  # the max outlives the window, as LeRobot's
    assert tracker.percentile(0.0) == pytest.approx(0.1) and tracker.percentile(1.0) == 0.5
    tracker.reset()
    assert tracker.max() == 0.0 and len(tracker) == 0


class FakePolicy:
    """A policy that answers chunk k with rows k·100 + row (robot units = model + 1000) and
    records each call's RTC arguments; `steps` its post-processing."""

    def __init__(self, post=(), rtc=None):
        self.calls: list[dict] = []
        state = lambda obs: (np.asarray(obs["state"], np.float32)[None], False)  # noqa: E731
        self.processor = SimpleNamespace(steps=SimpleNamespace(post=list(post)), stats={}, state=state)
        self._rtc = rtc

    def rtc_settings(self, rtc=None):
        return rtc_settings(rtc, self._rtc)

    def predict_chunk(self, observation, noise=None, **rtc):
        self.calls.append(rtc)
        model = len(self.calls) * 100 + np.repeat(np.arange(50.0)[:, None], 32, axis=1)
        model = model.astype(np.float32)
        return SimpleNamespace(model=model, actions=model[:, :6] + 1000)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.05  # each reading 50 ms later: an inference measures 50 ms
        return self.now


def test_chunker_hands_leftovers_and_delays_as_lerobots_rollout():
    policy, obs = FakePolicy(rtc={"execution_horizon": 10}), {"state": np.zeros(7)}
    chunker = RealTimeChunker(policy, fps=50, queue_threshold=25, clock=Clock())  # 50 ms = 2.5 steps → 3
    assert chunker.needs_chunk()
    chunker.infer(obs)
    assert policy.calls[0]["prev_chunk_left_over"] is None and policy.calls[0]["inference_delay"] == 0
    assert chunker.queue.qsize() == 47  # the first chunk too drops the rows its latency covered
    actions = [chunker.get() for _ in range(21)]
    assert actions[0][0] == 1103 and not chunker.needs_chunk()
    chunker.get()
    assert chunker.needs_chunk()  # 25 ≤ 25 queued
    chunker.infer(obs)
    call = policy.calls[1]
    assert call["inference_delay"] == 3  # ceil(max latency 50 ms · 50 fps)
    rows = 100 + np.repeat(np.arange(25.0, 35)[:, None], 6, 1)  # model rows 25.. of chunk 1, 6 dims
    np.testing.assert_array_equal(call["prev_chunk_left_over"], rows)
    assert chunker.get()[0] == 1203  # the new chunk less its first 3 rows
    for _ in range(46):
        chunker.get()
    chunker.infer(obs)  # an exhausted queue: LeRobot pads the empty leftover to the horizon with zeros
    np.testing.assert_array_equal(policy.calls[2]["prev_chunk_left_over"], np.zeros((10, 6)))
    chunker.reset()
    chunker.infer(obs)
    assert policy.calls[3]["prev_chunk_left_over"] is None and policy.calls[3]["inference_delay"] == 0


def test_chunker_reanchors_a_relative_policys_leftover():
    stats = {"action.mean": np.linspace(-1, 1, 6, dtype=np.float32),
             "action.std": np.full(6, 2.0, np.float32)}
    post = [{"name": "crop_actions", "dim": 6}, {"name": "unnormalize", "mode": "MEAN_STD", "key": "action"},
            {"name": "absolute_actions", "mask": [1.0, 1.0, 0.0, 1.0]}]
    processor = SimpleNamespace(steps=SimpleNamespace(post=post), stats=stats)
    robot = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    state = np.arange(7.0, dtype=np.float32)
    model = reanchored(processor, robot, state)
    np.testing.assert_allclose(run_post(post, model[None], state[None], processor)[0], robot, atol=1e-6)
    want = (robot - np.pad(state[:4] * [1, 1, 0, 1], (0, 2))) - stats["action.mean"]
    np.testing.assert_allclose(model, want / (stats["action.std"] + 1e-8), atol=1e-6)
    policy = FakePolicy(post=post)
    policy.processor.stats = stats
    chunker = RealTimeChunker(policy, fps=10, clock=Clock())
    chunker.infer({"state": state})
    chunker.get()
    chunker.infer({"state": state + 1})
    expected = reanchored(processor, np.repeat((100 + np.arange(2.0, 12))[:, None], 6, 1) + 1000, state + 1)
    np.testing.assert_allclose(policy.calls[1]["prev_chunk_left_over"], expected, atol=1e-5)


def test_chunker_runs_a_real_policy(pi0):
    chunker = RealTimeChunker(pi0, fps=30, rtc={"execution_horizon": 10}, clock=Clock())
    first = chunker.infer(observation(pi0, 10), noise(pi0, 10))
    executed = [chunker.get() for _ in range(20)]
    np.testing.assert_array_equal(executed[0], first.actions[2])  # 50 ms at 30 fps: 2 rows skipped
    left = first.model[22:32, :6]
    second = chunker.infer(observation(pi0, 11), noise(pi0, 11))
    want = pi0.predict_chunk(observation(pi0, 11), noise(pi0, 11), inference_delay=2,
                             prev_chunk_left_over=left, rtc={"execution_horizon": 10})
    np.testing.assert_array_equal(second.model, want.model)
    assert chunker.get() is not None and chunker.queue.qsize() == 47
