"""A pinned policy vouches for every byte it uses (issue #32): a file changed after the load — the
tokenizer the first request reads, or an engine's weights onnxruntime maps — is refused before it
can change an answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundles import private_copy
from lerobot_folder import write_tokenizer

import walkforge
from walkforge.artifacts.bundle import Bundle
from walkforge.errors import WalkforgeError


@pytest.fixture(scope="module")
def bundle(compiled) -> Path:
    tokenizer = compiled.inputs("tamper-tokenizer", lambda d: write_tokenizer(d / "tok"))
    return compiled("pi0", variant="tiny", seed=3, gpu_archs=(), tokenizer=tokenizer / "tok")


def observation(policy) -> dict:
    spec = policy.observation_spec()
    rng = np.random.default_rng(0)
    return {spec["cameras"][0]: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            spec["state"]["key"]: rng.standard_normal(spec["state"]["dim"]).astype(np.float32),
            "task": "pick"}


def test_a_processor_file_changed_before_its_first_read_is_refused(bundle, tmp_path):
    copy = private_copy(bundle, tmp_path / "b")
    policy = walkforge.load(copy, digest=Bundle.open(copy).digest, spinning=False)
    (copy / "policy" / "tokenizer" / "tokenizer.model").write_bytes(b"not the tested tokenizer")
    with pytest.raises(WalkforgeError, match="policy/tokenizer/tokenizer.model"):
        policy.predict_action_chunk(observation(policy))


def test_an_engine_file_changed_after_the_load_is_refused_before_the_answer(bundle, tmp_path):
    copy = private_copy(bundle, tmp_path / "b")
    policy = walkforge.load(copy, digest=Bundle.open(copy).digest, spinning=False)
    obs = observation(policy)
    policy.predict_action_chunk(obs)  # fine as loaded
    data = next((copy / "walks").glob("denoise*"))
    data.write_bytes(data.read_bytes())  # the same bytes, written in place: the file was touched
    with pytest.raises(WalkforgeError, match="changed after bundle"):
        policy.predict_action_chunk(obs)
