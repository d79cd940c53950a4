"""paged_attention eager reference vs a dense per-request float64 reference."""

from __future__ import annotations

import pytest
import torch
from plugin_cases import ALL_CASES, case_tol, dense_attention, make_inputs
from tolerances import rel_err

from walkforge.plugins.paged_attention import paged_attention


def attention_args(x: dict) -> tuple:
    layer = x["layer"]
    return (x["q"], x["k_all"][layer], x["v_all"][layer], x["pool"], x["block_table"], x["prefix_lens"],
            x["suffix_mask"], layer, x["scale"])  # fmt: skip


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_matches_dense_reference(case):
    args = attention_args(make_inputs(case))
    assert rel_err(paged_attention(*args), dense_attention(*args)) <= case_tol(case)  # fp32 vs float64


def test_keys_beyond_prefix_are_never_read():
    """Poisoning every pool slot past each prefix (same pages included) leaves the output unchanged."""
    x = make_inputs(ALL_CASES[3])
    args = attention_args(x)
    poisoned = x["pool"].clone()
    page_size = poisoned.shape[3]
    for b, n in enumerate(x["prefix_lens"].tolist()):
        for p in range(n, x["block_table"].shape[1] * page_size):
            page = x["block_table"][b, p // page_size]
            if page >= 0:
                poisoned[:, :, page, p % page_size] = 1e4
    out = paged_attention(*args[:3], poisoned, *args[4:])
    assert torch.equal(out, paged_attention(*args))  # the same op on the same shapes: exact on any CPU


def test_fake_impl_gives_query_shape():
    args = attention_args(make_inputs(ALL_CASES[0]))
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert paged_attention(*fake).shape == args[0].shape
