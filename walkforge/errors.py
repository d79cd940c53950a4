"""The one user-facing exception type.

`WalkforgeError` is what a user did wrong or what their machine lacks (bad input, missing
key, corrupt bundle, missing TensorRT). The CLI prints it on one line and exits 2. Anything
else is an internal bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WalkforgeError(Exception):
    """A user-facing error: one line, names what is wrong."""


class CompileError(WalkforgeError):
    """A compile stage failed; names the stage and the stages that finished before it."""

    def __init__(self, stage: str, done: list[str], reason: str) -> None:
        self.stage = stage
        self.done = list(done)
        finished = ", ".join(done) if done else "nothing"
        super().__init__(f"compile failed at stage '{stage}' (finished: {finished}): {reason}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close: for errors
    about unknown names (recipes, variants, config fields, observation keys)."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
