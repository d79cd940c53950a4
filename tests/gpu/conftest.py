"""GPU tests: every `gpu`-marked test here skips with a reason where torch sees no CUDA device.

Collection needs neither CUDA nor Triton nor cupy: the test modules import those inside the
tests. Timings that tests record with the `timings` fixture are printed at the end of the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMINGS = pytest.StashKey[list]()


def cuda_missing() -> str:
    """'' where torch sees a CUDA device, else why not (the torch-cuda backend's own probe, which
    recognises a CPU-only torch build before anything calls into CUDA)."""
    from walkforge.runtimes.backends._cuda import cuda_device

    missing = cuda_device()
    return f"no CUDA device: {missing}" if missing else ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's gpu tests at collection, so no fixture (a pi0 compile) runs for them."""
    reason = cuda_missing()
    if not reason:
        return
    for item in items:
        if item.get_closest_marker("gpu") and HERE in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def timings(request: pytest.FixtureRequest) -> list[str]:
    """Append one line per measurement; the lines are printed in the run's summary."""
    return request.config.stash.setdefault(TIMINGS, [])


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(TIMINGS, [])
    if lines:
        terminalreporter.section("gpu timings")
        for line in lines:
            terminalreporter.write_line(line)
