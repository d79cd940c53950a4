"""Task text → prompt text → token ids: pi0's `task + "\\n"`, pi0.5's prompt carrying the state bins,
and LeRobot's tokenizer step (BOS first where the tokenizer adds one, right-padded with id 0).

A prompt longer than the compiled length is truncated to it, as LeRobot's tokenizer step does in
every release (pi0's trailing newline or pi0.5's state may be cut off): a warning, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

PAD_ID = 0  # LeRobot pads prompts with id 0 (Gemma's <pad>) and masks them out


def pi0_prompt(task: str) -> str:
    """pi0's prompt: the task ending in one newline (LeRobot's pi0_new_line_processor adds it
    when missing)."""
    return task if task.endswith("\n") else task + "\n"


def clean_task(task: str) -> str:
    """pi0.5's task text: stripped, underscores and newlines turned into spaces."""
    return task.strip().replace("_", " ").replace("\n", " ")


def pi05_prompt(task: str, bins: Sequence[int]) -> str:
    """pi0.5's prompt: `Task: {cleaned task}, State: {bins, space-separated};\\nAction: `."""
    return f"Task: {clean_task(task)}, State: {' '.join(str(int(b)) for b in bins)};\nAction: "


def tokenize(texts: Sequence[str], encode: Callable[[str], list[int]], bos_id: int | None, max_length: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int64 (B, max_length) and mask bool (B, max_length): [BOS, *encode(text)] (no
    BOS when `bos_id` is None), right-padded with PAD_ID; a longer prompt is cut to its first
    `max_length` tokens, as LeRobot's tokenizer step (`truncation=True`) cuts it, with a warning."""
    ids = np.full((len(texts), max_length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(texts), max_length), dtype=bool)
    for row, text in enumerate(texts):
        tokens = [*([] if bos_id is None else [bos_id]), *encode(text)]
        if len(tokens) > max_length:
            log.warning("task too long: its prompt is %d tokens%s, cut to %d "
                        "(tokenizer_max_length) as LeRobot cuts it", len(tokens),
                        "" if bos_id is None else " (with BOS)", max_length)
            tokens = tokens[:max_length]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = True
    return ids, mask
