"""Concurrent requests batched into one `ask` call of the answerer, in one worker thread.

Owns the queue of waiting requests (`Job`s), how they are grouped into a batch, the worker thread
the model runs in (the model is not thread-safe: one batch at a time), and the way answers get
back to the event loop while they are decoded: every `Delta` of a streaming job is forwarded
through `loop.call_soon_threadsafe`, and a job is resolved as soon as its last answer is complete,
not when its whole batch is. Between batches, and every `refresh_s` while idle, the worker runs
`refresh` (a served ensemble picks up experts learned meanwhile). Does not parse requests or
render responses (server.py, openai_api.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from seecl.serving.routing import Answer, Delta, Query, Sampling

log = logging.getLogger("seecl.server")


@dataclass
class Job:
    """One request's queries. A streaming job receives (query index, Delta) in `events`, then a
    final None (all answered) or the exception that failed its batch."""

    queries: list[str | Query]
    samplings: list[Sampling]
    future: asyncio.Future
    events: asyncio.Queue | None = None
    cancelled: bool = False  # its client went away: its answers stop at the next token
    answers: list[Answer | None] = field(default_factory=list)
    closed: set[int] = field(default_factory=set)  # indices whose closing delta the worker has sent

    def __post_init__(self) -> None:
        self.answers = [None] * len(self.queries)

    def deliver(self, index: int, answer: Answer) -> None:
        """On the event loop: one answer is complete; the job resolves with its last one."""
        self.answers[index] = answer
        if all(a is not None for a in self.answers) and not self.future.done():
            self.future.set_result(list(self.answers))


def streams(answerer) -> bool:
    """Whether the answerer's `ask` takes an `on_token` callback (fakes and older backends do not)."""
    try:
        return "on_token" in inspect.signature(answerer.ask).parameters
    except (TypeError, ValueError):
        return False


class Batcher:
    """Requests arriving within `window_s` of the first waiting one (up to `max_queries` queries)
    are answered by one `ask` call; requests queued while a batch runs form the next one."""

    def __init__(
        self,
        answerer,
        window_s: float,
        max_queries: int,
        refresh: Callable[[], Any] | None = None,
        refresh_s: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.answerer, self.window_s, self.max_queries = answerer, window_s, max_queries
        self.refresh, self.refresh_s, self.on_batch = refresh, refresh_s, on_batch
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self._held: Job | None = None
        self._streams = streams(answerer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seecl-answer")

    def submit(self, queries: list, samplings: list[Sampling], stream: bool = False) -> Job:
        job = Job(list(queries), list(samplings), asyncio.get_running_loop().create_future())
        if stream:
            job.events = asyncio.Queue()
        self.queue.put_nowait(job)
        return job

    async def ask(self, queries: list, samplings: list[Sampling]) -> list[Answer]:
        return await self.submit(queries, samplings).future

    @property
    def waiting(self) -> int:
        """Queries queued for the next batch."""
        held = len(self._held.queries) if self._held is not None else 0
        return held + sum(len(job.queries) for job in list(self.queue._queue))  # type: ignore[attr-defined]

    def _take(self) -> list[Job]:
        jobs: list[Job] = []
        size = 0
        while self._held is not None or not self.queue.empty():
            job = self._held if self._held is not None else self.queue.get_nowait()
            self._held = None
            if job.future.done() or job.cancelled:  # its client went away while waiting
                continue
            if jobs and size + len(job.queries) > self.max_queries:
                self._held = job
                break
            jobs.append(job)
            size += len(job.queries)
        return jobs

    def _refresh(self) -> None:
        if self.refresh is None:
            return
        try:
            self.refresh()
        except Exception:  # a failed reload keeps the experts being served; it is retried later
            log.exception("reloading the ensemble failed; still serving the experts loaded before")

    def _work(self, loop: asyncio.AbstractEventLoop, jobs: list[Job]) -> list[Answer]:
        """In the worker thread: refresh, then answer every query of the batch."""
        self._refresh()
        queries = [q for job in jobs for q in job.queries]
        samplings = [s for job in jobs for s in job.samplings]
        if not self._streams:
            return self.answerer.ask(queries, samplings)
        owners = [(job, index) for job in jobs for index in range(len(job.queries))]

        def on_token(position: int, delta: Delta) -> bool:
            job, index = owners[position]
            if job.cancelled:
                return False
            if job.events is not None:
                loop.call_soon_threadsafe(job.events.put_nowait, (index, delta))
            if delta.answer is not None:
                job.closed.add(index)
                loop.call_soon_threadsafe(job.deliver, index, delta.answer)
            return True

        return self.answerer.ask(queries, samplings, on_token=on_token)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._held is None:
                try:
                    self._held = await asyncio.wait_for(self.queue.get(), self.refresh_s or None)
                except asyncio.TimeoutError:
                    await loop.run_in_executor(self._executor, self._refresh)
                    continue
            await asyncio.sleep(self.window_s)
            jobs = self._take()
            if not jobs:
                continue
            size = sum(len(job.queries) for job in jobs)
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self._executor, self._work, loop, jobs)
                if len(answers) != size:
                    raise RuntimeError(f"the answerer returned {len(answers)} answers for {size} queries")
            except Exception as exc:  # reported to every request of the batch as a server error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                        job.future.exception()  # retrieved: a request that left never reads it
                    if job.events is not None:
                        job.events.put_nowait(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(size, time.perf_counter() - started)
            start = 0
            for job in jobs:
                mine = answers[start : start + len(job.queries)]
                start += len(job.queries)
                if job.events is not None:  # answers the answerer did not stream arrive whole
                    for index, answer in enumerate(mine):
                        if index not in job.closed:
                            job.events.put_nowait((index, Delta(answer.text, None, None, answer)))
                    job.events.put_nowait(None)
                if not job.future.done():
                    job.future.set_result(mine)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def drain(job: Job) -> None:
    """A job whose client left: its answers stop, and its outcome is never read."""
    job.cancelled = True
    if job.future.done():
        with contextlib.suppress(BaseException):
            job.future.exception()
