"""Server-Sent Events, read with short checkouts when what a stream follows moved.

A stream lives for minutes while its client watches; holding a pooled connection (or a
LISTEN) that long would let a few open browser tabs take the API's small pool. Instead each
stream waits on the process's `StreamWatch`, which looks at what every stream follows in one
statement a tick, and reads (a connection checked out for one short read and handed back) only
when its job moved, and sends only what changed. A client that reconnects sends
`Last-Event-ID` and continues where it left off.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal

from starlette.concurrency import run_in_threadpool

from control_plane import jobs
from control_plane.api.stream_watch import StreamWatch, Watcher
from control_plane.events import list_events
from control_plane.job_status import TERMINAL
from control_plane.records import JobEventRecord, JobRecord
from control_plane.services import Services

WAIT_SLICE_SECONDS = 1.0
"""A stream waiting for its job to move sees within this long that its client went away."""
KEEPALIVE_SECONDS = 15.0
MAX_STREAM_SECONDS = 600.0
"""A stream ends after this long; the browser's EventSource reconnects with Last-Event-ID, so
no stream outlives a deploy by more than this."""
EVENTS_PER_POLL = 500

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MEDIA_TYPE = "text/event-stream"


_LINE_ENDS = re.compile(r"\r\n|\r|\n")


def frame(data: str, *, event: str | None = None, id: str | int | None = None) -> str:
    """One SSE message; multi-line data becomes several `data:` lines, as the spec says."""
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    # CR, LF and CRLF each end a line in an event stream: a lone CR in the data (a job's
    # metadata may hold one) would otherwise start a line of its own, an `event:` even.
    lines.extend(f"data: {line}" for line in _LINE_ENDS.split(data))
    return "\n".join(lines) + "\n\n"


def json_frame(payload: Any, *, event: str | None = None, id: str | int | None = None) -> str:
    return frame(json.dumps(payload, separators=(",", ":")), event=event, id=id)


def comment(text: str = "keep-alive") -> str:
    return f": {text}\n\n"


# Event ids are a bigint sequence: a cursor past it names no event (and a query bound to it
# would fail in the database).
EVENT_ID_MAX = 2**63 - 1


def parse_event_id(value: str | None) -> int | None:
    """An event cursor as clients send it (`123` or `ftevent-123`); None when absent or bad
    (not a number, or outside the ids' bigint range)."""
    if not value:
        return None
    try:
        number = int(value.removeprefix("ftevent-"))
    except ValueError:
        return None
    return number if 0 <= number <= EVENT_ID_MAX else None


async def next_move(
    watcher: Watcher,
    ends_at: float,
    keepalive_at: float,
    is_gone: Callable[[], Awaitable[bool]],
) -> Literal["moved", "keepalive", "over"]:
    """Wait until what `watcher` follows moved (`moved`, the watcher cleared), a keep-alive is
    due at `keepalive_at` (`keepalive`), or the stream is over (`over`): past `ends_at`, its
    client gone (looked at every `WAIT_SLICE_SECONDS`), or a look failed."""
    while not watcher.moved.is_set():
        now = time.monotonic()
        if now >= ends_at or await is_gone():
            return "over"
        if now >= keepalive_at:
            return "keepalive"
        with suppress(TimeoutError):
            await asyncio.wait_for(watcher.moved.wait(), WAIT_SLICE_SECONDS)
    watcher.moved.clear()
    return "over" if watcher.failed else "moved"


@dataclass(frozen=True)
class JobChange:
    """What one read found: the job as it is now and its events since the last read."""

    job: JobRecord
    events: list[JobEventRecord]
    final: bool
    """The job is over and these are its last events: the stream ends after this change."""


async def follow_job(
    services: Services,
    watch: StreamWatch,
    tenant_id: str,
    job_id: str,
    after_event_id: int | None,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[JobChange | None]:
    """Follow a job until it is over and its events are all sent, or the client goes away.

    Yields a `JobChange` whenever the job's row or its events moved, and None when a
    keep-alive is due. Reads the job when the stream starts and again only when `watch` says
    its row or its events moved. Ends when the job is terminal and no events are left, when
    the job is gone (or never was the tenant's), when a look fails, or after
    `MAX_STREAM_SECONDS`.
    """
    cursor = after_event_id
    last_row: JobRecord | None = None
    idle_since = time.monotonic()
    ends_at = idle_since + MAX_STREAM_SECONDS

    def read() -> tuple[JobRecord | None, list[JobEventRecord]]:
        with services.engine.connect() as conn:
            job = jobs.get_job(conn, tenant_id, job_id)
            if job is None:
                return None, []
            found = list_events(
                conn, job_id, after=cursor, limit=EVENTS_PER_POLL, newest_first=False
            )
            return job, found

    with watch.watching(job_ids=(job_id,)) as watcher:
        job, found = await run_in_threadpool(read)
        while job is not None:
            if found:
                cursor = found[-1].id
            more = len(found) == EVENTS_PER_POLL
            final = job.status in TERMINAL and not more
            if found or job != last_row or final:
                last_row = job
                idle_since = time.monotonic()
                yield JobChange(job, found, final)
                if final:
                    return
            while not more:
                why = await next_move(
                    watcher, ends_at, idle_since + KEEPALIVE_SECONDS, is_disconnected
                )
                if why == "over":
                    return
                if why == "moved":
                    break
                idle_since = time.monotonic()
                yield None
            job, found = await run_in_threadpool(read)
