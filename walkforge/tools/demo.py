"""`make demo`: compile tiny pi0, run it, and show actions, parity and latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from walkforge import CompileRequest, compile_bundle
from walkforge.artifacts.bundle import Bundle
from walkforge.progress import Progress
from walkforge.recipes.inputs import example_inputs
from walkforge.runtimes import load
from walkforge.tools.bench import bench
from walkforge.tools.render import show_bench, show_verify
from walkforge.tools.verify import verify


def demo(out: Path, out_console: Console | None = None) -> dict:
    """Compile `pi0 --variant tiny` to `out`, run it, verify it and bench it."""
    console = out_console or Console()
    compile_bundle(CompileRequest("pi0", out, variant="tiny", force=True), Progress())
    bundle = Bundle.open(out)
    feeds = example_inputs(bundle, batch=2, seed=0)
    actions = load(bundle).run(feeds)["actions"]
    console.print(f"[bold]actions[/bold] {list(actions.shape)}: mean {actions.mean():+.4f}, "
                  f"std {actions.std():.4f}, range [{actions.min():+.3f}, {actions.max():+.3f}]")
    first = np.array2string(actions[0, 0, :6], precision=4, separator=", ")
    console.print(f"request 0, first action, first 6 dims: {first}")
    result = verify(bundle)
    show_verify(console, result)
    report = bench(out, iters=10)
    show_bench(console, report)
    return {"actions": actions, "verify": result, "bench": report}
