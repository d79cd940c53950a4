"""Cross-client micro-batching over the policy's one page pool.

Requests from every connection join one queue. A worker thread takes the first waiting request,
waits up to `batch_wait_ms` for more (at most `max_batch`), and runs them as ONE batch
(`predict_chunks`), so each answer equals the serial one. A request may carry real-time chunking
inputs (`rtc`: predict_chunks' per-observation mapping) and shares the batch with those that do
not. Only as many requests run as the pool has pages for (each is counted at the bundle's most
prefix tokens); the rest wait for pages up to `pool_wait_ms` and are then refused with a message.
A batch the policy refuses is rerun one request at a time, so a bad request gets its own error
and never costs another its answer. A request whose client went away before its batch started is
dropped; one that is already running finishes and its pages are freed by the chain as always.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from walkforge.errors import WalkforgeError

log = logging.getLogger(__name__)

POOL_POLL_S = 0.005  # how often a request waiting for pages looks at the pool again


@dataclass
class Answer:
    """One request's actions (chunk_size, A) and its model-space chunk (chunk_size, max_action_dim:
    what the connection cuts the next leftover from), or the one-line reason it was refused; timing."""

    actions: np.ndarray | None = None
    error: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    model: np.ndarray | None = None


def pool_capacity(policy: Any) -> int | None:
    """How many full-length requests the pool has free pages for now (None: no page pool)."""
    paging = policy.paging
    if paging is None:
        return None
    return paging.pages.free_pages // paging.pages.pages_for(paging.max_tokens)


def _wait_for_pages(policy: Any, deadline: float) -> int:
    """Requests that fit now, after waiting until at least one does or `deadline` passes."""
    while True:
        capacity = pool_capacity(policy)
        if capacity is None or capacity > 0 or time.monotonic() >= deadline:
            return 1 << 30 if capacity is None else capacity
        time.sleep(POOL_POLL_S)


def _run(policy: Any, observations: Sequence[dict], noises: Sequence[Any],
         rtc: Sequence[Any]) -> list[Answer]:
    """One batch through the policy; if it refuses the batch, each request alone (its own error)."""
    t0 = time.perf_counter()
    try:
        chunks: list[Any] = policy.predict_chunks(observations, noises, rtc)
    except WalkforgeError as exc:
        if len(observations) == 1:
            return [Answer(error=str(exc))]
        return [a for o, n, r in zip(observations, noises, rtc, strict=True)
                for a in _run(policy, [o], [n], [r])]
    infer_ms = (time.perf_counter() - t0) * 1e3
    return [Answer(np.asarray(c.actions, np.float32), model=np.asarray(c.model, np.float32),
                   timing={"infer_ms": infer_ms, "batch_size": len(chunks)}) for c in chunks]


def answer_batch(policy: Any, observations: Sequence[dict], noises: Sequence[Any],
                 pool_wait_s: float, rtc: Sequence[Any] | None = None) -> list[Answer]:
    """Answers in order: run what the pool has pages for, wait (bounded) for pages for the rest,
    refuse what still does not fit when the wait is over. `rtc`: per request None or its
    real-time chunking inputs (predict_chunks' `rtc_inputs`)."""
    rtc = list(rtc) if rtc is not None else [None] * len(observations)
    answers: list[Answer] = []
    deadline = time.monotonic() + pool_wait_s
    while len(answers) < len(observations):
        fit = _wait_for_pages(policy, deadline)
        start = len(answers)
        if fit == 0:
            paging = policy.paging
            refusal = (f"KV page pool full: waited {pool_wait_s * 1e3:.0f} ms for pages, "
                       f"{paging.pages.free_pages} of {paging.pages.num_pages} free; try again later")
            answers += [Answer(error=refusal) for _ in observations[start:]]
            break
        end = min(len(observations), start + fit)
        answers += _run(policy, observations[start:end], noises[start:end], rtc[start:end])
    return answers


@dataclass
class _Pending:
    observation: dict
    noise: Any
    rtc: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float

    def resolve(self, answer: Answer) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, answer)


def _set_result(future: asyncio.Future, answer: Answer) -> None:
    if not future.done():  # a client that left cancelled its future
        future.set_result(answer)


class MicroBatcher:
    """The queue and its worker thread (module doc). `await submit(observation, noise, rtc)` → Answer."""

    def __init__(self, policy: Any, max_batch: int = 8, batch_wait_ms: float = 2.0,
                 max_queue: int = 64, pool_wait_ms: float = 5000.0) -> None:
        if max_batch < 1 or batch_wait_ms < 0 or max_queue < 1 or pool_wait_ms < 0:
            raise WalkforgeError(f"batching wants max_batch ≥ 1, batch_wait_ms ≥ 0, max_queue ≥ 1, "
                                 f"pool_wait_ms ≥ 0; got {max_batch}, {batch_wait_ms}, {max_queue}, "
                                 f"{pool_wait_ms}")
        capacity = pool_capacity(policy)
        if capacity == 0:
            raise WalkforgeError("the KV page pool cannot hold one full-length request: give it more pages")
        self.policy, self.max_batch = policy, max_batch
        self.batch_wait_s, self.pool_wait_s = batch_wait_ms / 1e3, pool_wait_ms / 1e3
        self.max_queue = max_queue
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.batches = 0
        self._thread = threading.Thread(target=self._work, name="walkforge-batcher", daemon=True)
        self._thread.start()

    async def submit(self, observation: dict, noise: Any = None, rtc: Any = None) -> Answer:
        loop = asyncio.get_running_loop()
        pending = _Pending(observation, noise, rtc, loop.create_future(), loop, time.perf_counter())
        with self._cond:
            if self._stopping:
                return Answer(error="server is shutting down; request refused")
            if len(self._queue) >= self.max_queue:
                return Answer(error=f"server busy: {len(self._queue)} requests already waiting "
                                    f"(--max-queue {self.max_queue}); try again later")
            self._queue.append(pending)
            self._cond.notify()
        return await pending.future

    def close(self) -> None:
        """Answer everything queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _collect(self) -> list[_Pending]:
        """The next batch: block for a first request, then gather up to max_batch for batch_wait."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._queue) < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            take = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(take)]

    def _work(self) -> None:
        while True:
            batch = [p for p in self._collect() if not p.future.cancelled()]
            if not batch:
                with self._cond:
                    if self._stopping and not self._queue:
                        return
                continue
            started = time.perf_counter()
            try:
                answers = answer_batch(self.policy, [p.observation for p in batch],
                                       [p.noise for p in batch], self.pool_wait_s,
                                       [p.rtc for p in batch])
            except Exception as exc:  # a bug: log its traceback, tell the clients, keep serving
                log.exception("batch of %d failed", len(batch))
                answers = [Answer(error=f"internal server error: {type(exc).__name__}: {exc}")
                           for _ in batch]
            self.batches += 1
            for pending, answer in zip(batch, answers, strict=True):
                answer.timing["queue_ms"] = (started - pending.queued) * 1e3
                pending.resolve(answer)
