"""One look a tick for every live stream of an API process, instead of each stream's own reads.

A stream (a job's events, the dashboard's job page or jobs table) lives for minutes while its
client watches. Each stream polled on its own once a second: a job's row and its new events,
two statements and a connection checked out, whether anything had moved or not, so 1,000 open
browser tabs cost the database 2,000 statements a second doing nothing. Here each stream
registers what it follows (jobs, tenants' newest job) and waits; one task per process looks at
what every stream follows every `TICK_SECONDS`, in one statement (`job_versions.look`), and
wakes only the streams whose versions moved. A woken stream then reads what it shows, as it
did before, on a connection of its own: the look tells it when, never what, so what it sends
is as fresh as its own read, and a look that lags cannot send a job back to an older state.

Every change after a stream registered is seen: a stream is woken by the first look it takes
(a look begun before its own first read may be older than that read, so the stream reads
again), and then by every look whose versions differ from the look before; a change between
two looks makes the later one differ (a job's row gets a new `xmin` at every update, its
events only grow, a deleted job is absent). A look that fails (the database away) ends the
streams it would have woken; their clients reconnect (`EventSource` does) and are answered
as any request is then.

The task starts with the first stream in the running loop (one served by a bare TestClient
too; each loop has its own) and sleeps while no stream is open; `stop` ends it with the server
(the app's lifespan).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from control_plane.job_versions import JobVersion, Look, TenantVersion, look

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
"""How often the streams' versions are looked at: the most a change waits to be sent."""

FAILURE_LOG_EVERY_S = 60.0


class Watcher:
    """What one stream follows, and an event set when it moved (the stream clears it)."""

    def __init__(self, job_ids: tuple[str, ...], tenant_ids: tuple[str, ...]) -> None:
        self.job_ids = job_ids
        self.tenant_ids = tenant_ids
        self.moved = asyncio.Event()
        self.failed = False  # a look failed: the stream ends
        self._seen: tuple[dict[str, JobVersion], dict[str, TenantVersion]] | None = None

    def take(self, found: Look) -> None:
        """Wake the stream when this look differs from the last it took (or is its first)."""
        seen = (
            {j: found.jobs[j] for j in self.job_ids if j in found.jobs},
            {t: found.newest.get(t, (None, None)) for t in self.tenant_ids},
        )
        if seen != self._seen:
            self._seen = seen
            self.moved.set()

    def fail(self) -> None:
        self.failed = True
        self.moved.set()


@dataclass
class _Loop:
    """The streams of one event loop and the task that looks for them."""

    watchers: set[Watcher] = field(default_factory=set)
    wanted: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class StreamWatch:
    """The streams of one API process and the task that looks at what they follow (one per
    event loop: a server has one; a test may serve the app from several)."""

    def __init__(self, engine: Engine, tick_seconds: float = TICK_SECONDS) -> None:
        self.engine = engine
        self.tick_seconds = tick_seconds
        self.looks = 0  # looks taken (what tests and the benchmark read)
        self._loops: dict[asyncio.AbstractEventLoop, _Loop] = {}
        self._failure_logged = 0.0

    @contextmanager
    def watching(
        self, job_ids: tuple[str, ...] = (), tenant_ids: tuple[str, ...] = ()
    ) -> Iterator[Watcher]:
        """Follow these jobs and tenants for the block; the first look after this wakes it."""
        watcher = Watcher(job_ids, tenant_ids)
        here = self._here()
        here.watchers.add(watcher)
        here.wanted.set()
        try:
            yield watcher
        finally:
            here.watchers.discard(watcher)

    def _here(self) -> _Loop:
        """The running loop's streams, its task started (again, if it ended)."""
        loop = asyncio.get_running_loop()
        for gone in [other for other in self._loops if other.is_closed()]:
            del self._loops[gone]
        here = self._loops.setdefault(loop, _Loop())
        if here.task is None or here.task.done():
            here.task = loop.create_task(self._run(here), name="stream-watch")
        return here

    async def stop(self) -> None:
        """End the running loop's task (the server's lifespan, as it stops)."""
        here = self._loops.pop(asyncio.get_running_loop(), None)
        if here is not None and here.task is not None:
            here.task.cancel()
            with suppress(asyncio.CancelledError):
                await here.task

    async def _run(self, here: _Loop) -> None:
        while True:
            if not here.watchers:
                here.wanted.clear()
                await here.wanted.wait()
            watchers = list(here.watchers)
            job_ids = {j for w in watchers for j in w.job_ids}
            tenant_ids = {t for w in watchers for t in w.tenant_ids}
            try:
                found = await run_in_threadpool(self._look, job_ids, tenant_ids)
            except Exception as exc:
                self._log_failure(exc)
                for watcher in watchers:
                    watcher.fail()
            else:
                self.looks += 1
                for watcher in watchers:
                    watcher.take(found)
            await asyncio.sleep(self.tick_seconds)

    def _look(self, job_ids: set[str], tenant_ids: set[str]) -> Look:
        with self.engine.connect() as conn:
            return look(conn, job_ids, tenant_ids)

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._failure_logged >= FAILURE_LOG_EVERY_S:
            self._failure_logged = now
            log.warning("live streams: a look failed (%s); their streams end", str(exc)[:200])


def get_stream_watch(request: Request) -> StreamWatch:
    watch: StreamWatch = request.app.state.stream_watch
    return watch


StreamWatchDep = Annotated[StreamWatch, Depends(get_stream_watch)]
