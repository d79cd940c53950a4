"""Visible progress for long compile work: a rich bar over stages plus one-line notes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Stage progress on stderr. Disabled, it only records notes (for the Python API/tests)."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.notes: list[str] = []
        self._bar: RichProgress | None = None
        self._task = None
        self._t0 = 0.0

    @property
    def bar(self) -> RichProgress | None:
        """The live rich bar (None when disabled); long stages add their own task to it."""
        return self._bar

    @contextmanager
    def stages(self, total: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
        with self._bar:
            self._task = self._bar.add_task("compile", total=total)
            yield
        self._bar = None

    def begin(self, stage: str) -> None:
        self._t0 = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, description=f"[bold]{stage}[/bold]")

    def say(self, message: str) -> None:
        self.notes.append(message)
        if self._bar is not None:
            self._bar.console.print(f"  {message}")

    def end(self, stage: str, counts: dict) -> None:
        took = time.perf_counter() - self._t0
        summary = ", ".join(f"{k} {v}" for k, v in counts.items())
        self.notes.append(f"{stage}: {summary} ({took:.1f}s)")
        if self._bar is not None:
            self._bar.console.print(f"[green]✓[/green] {stage:8s} {summary} [dim]({took:.1f}s)[/dim]")
            self._bar.advance(self._task)
