"""kv_cache_write eager reference vs a per-token loop; skipped tokens write nothing."""

from __future__ import annotations

import pytest
import torch
from plugin_cases import ALL_CASES, dense_kv_write, make_inputs

from walkforge.plugins.kv_cache_write import kv_cache_write


def _write(x: dict) -> torch.Tensor:
    return kv_cache_write(x["pool"], x["k_all"], x["v_all"], x["block_table"], x["positions"])


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_matches_loop_reference(case):
    x = make_inputs(case)
    expected = dense_kv_write(x["pool"], x["k_all"], x["v_all"], x["block_table"], x["positions"])
    out = _write(x)
    assert torch.equal(out, expected)
    assert torch.equal(out, x["pool"]) == bool((x["positions"] < 0).all())  # b1-s1: its one token is skipped


@pytest.mark.parametrize("case", ALL_CASES[:4], ids=lambda c: c.id)
def test_only_valid_slots_change(case):
    """Request 0's last token is skipped (-1): its slot and every slot not targeted keep their value."""
    x = make_inputs(case)
    out = _write(x)
    changed = (out != x["pool"]).any(dim=(0, 1, 4, 5))  # [NP, PS]
    page_size = x["pool"].shape[3]
    valid = x["positions"] >= 0
    pos = x["positions"][valid]
    rows = valid.nonzero()[:, 0]
    targeted = torch.zeros_like(changed)
    targeted[x["block_table"][rows, pos // page_size], pos % page_size] = True
    assert torch.equal(changed, targeted)
    skipped = int(x["prefix_lens"][0]) + case.seq - 1
    page = x["block_table"][0, skipped // page_size]
    if page >= 0:
        assert torch.equal(out[:, :, page, skipped % page_size], x["pool"][:, :, page, skipped % page_size])


def test_input_pool_is_not_mutated():
    x = make_inputs(ALL_CASES[0])
    before = x["pool"].clone()
    _write(x)
    assert torch.equal(x["pool"], before)
