"""Open streams wait on one look a tick (`control_plane.api.stream_watch`): an idle stream reads
nothing, a job that moves wakes its own streams alone, and every change reaches them in order."""

from __future__ import annotations

import asyncio
import json
import queue
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, event

from control_plane.api import sse
from control_plane.api.stream_watch import TICK_SECONDS, StreamWatch
from control_plane.events import add_event
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.factories import enqueue_jobs, make_base, make_file

Message = tuple[str, dict[str, Any]]


def _jobs(services: Services, tenant: TenantKeys, count: int) -> list[str]:
    base = make_base(services.engine, "tiny-llama")
    file_id = make_file(services.engine, tenant.tenant_id).id
    return enqueue_jobs(services.engine, tenant.tenant_id, base.id, file_id, count)


@contextmanager
def _statements(services: Services) -> Iterator[list[tuple[str, Any]]]:
    """Every statement the engine runs for the block (the served app's and this test's)."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    event.listen(services.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(services.engine, "before_cursor_execute", record)


@contextmanager
def _streams(
    url: str, tenant: TenantKeys, job_ids: list[str]
) -> Iterator[list[queue.Queue[Message]]]:
    """Each job's event stream read in a thread of its own, its messages in a queue."""
    inboxes: list[queue.Queue[Message]] = [queue.Queue() for _ in job_ids]
    client = httpx.Client(timeout=60)
    stop = threading.Event()

    def read(job_id: str, inbox: queue.Queue[Message]) -> None:
        stream_url = f"{url}/v1/fine_tuning/jobs/{job_id}/events/stream"
        with client.stream("GET", stream_url, headers=tenant.headers()) as response:
            name, data = "message", ""
            for line in response.iter_lines():
                if stop.is_set():
                    return
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data += line[6:]
                elif line == "" and data:
                    inbox.put((name, json.loads(data)))
                    name, data = "message", ""

    threads = [
        threading.Thread(target=read, args=(job_id, inbox), daemon=True)
        for job_id, inbox in zip(job_ids, inboxes, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        yield inboxes
    finally:
        stop.set()
        client.close()
        for thread in threads:
            thread.join(10)


def _next(inbox: queue.Queue[Message], name: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got_name, data = inbox.get(timeout=left)
        if got_name == name:
            return data
    raise AssertionError(f"no {name!r} message within {timeout} s")


def _job_reads(statements: list[tuple[str, Any]]) -> list[Any]:
    """The parameters of each stream's read of its job (`jobs.get_job`), looks left out."""
    return [
        params
        for statement, params in statements
        if "FROM jobs" in statement and "xmin" not in statement and "tenant_id" in statement
    ]


@pytest.mark.slow
def test_idle_streams_read_nothing_and_a_job_that_moves_wakes_its_own_stream_alone(
    live_url: str, app: FastAPI, services: Services, tenant_a: TenantKeys
) -> None:
    job_ids = _jobs(services, tenant_a, 20)
    watch: StreamWatch = app.state.stream_watch
    with _streams(live_url, tenant_a, job_ids) as inboxes:
        for inbox in inboxes:
            assert _next(inbox, "status")["status"] == "queued"
        time.sleep(3 * TICK_SECONDS)  # each stream's first look, which wakes it once, is past
        looks_before = watch.looks
        with _statements(services) as quiet:
            time.sleep(2.0)
        # 20 streams polling on their own read their jobs 2 statements a second each: 80 here.
        assert _job_reads(quiet) == []
        assert all("xmin" in statement for statement, _ in quiet), quiet
        assert 1 <= len(quiet) <= 2.0 / TICK_SECONDS + 2
        # A look is counted after its statement returns, so one at either edge of the window
        # may be recorded on one side and counted on the other.
        assert abs((watch.looks - looks_before) - len(quiet)) <= 1

        moved = 7
        with _statements(services) as after_move:
            with services.engine.begin() as conn:
                add_event(conn, job_ids[moved], "moved")
            sent = time.monotonic()
            assert _next(inboxes[moved], "event")["message"] == "moved"
            delivered = time.monotonic() - sent
        assert delivered < 5 * TICK_SECONDS + 1
        reads = _job_reads(after_move)
        assert reads and all(job_ids[moved] in params.values() for params in reads), reads
        for other, inbox in enumerate(inboxes):
            if other != moved:
                assert all(name != "event" for name, _ in list(inbox.queue))


def test_every_change_reaches_the_stream_once_and_in_order(
    live_url: str, services: Services, tenant_a: TenantKeys
) -> None:
    """Events in bursts at random moments, around the looks' ticks: the stream sends each
    once, in order, and its statuses never go back."""
    (job_id,) = _jobs(services, tenant_a, 1)
    rng = random.Random(7)
    written: list[int] = []
    with _streams(live_url, tenant_a, [job_id]) as (inbox,):
        assert _next(inbox, "status")["status"] == "queued"
        for burst in range(12):
            with services.engine.begin() as conn:
                for n in range(rng.randint(1, 4)):
                    written.append(add_event(conn, job_id, f"burst {burst} line {n}"))
            time.sleep(rng.uniform(0, 2 * TICK_SECONDS))
        services.queue.request_cancel(job_id)
        messages: list[Message] = []
        while not messages or messages[-1][0] != "done":
            messages.append(inbox.get(timeout=15))
    sent = [int(data["id"].removeprefix("ftevent-")) for name, data in messages if name == "event"]
    assert sent[: len(written)] == written
    assert [data["message"] for name, data in messages if name == "event"][-1] == "Job cancelled"
    statuses = [data["status"] for name, data in messages if name == "status"]
    order = ["queued", "cancelled"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    assert messages[-1][1]["status"] == "cancelled"


def test_a_look_that_fails_ends_the_streams_waiting_on_it() -> None:
    """The database away (nothing listens on the port): the look fails and its watchers are
    told the stream is over, rather than waiting on a look that never comes."""
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    watch = StreamWatch(engine, tick_seconds=0.05)

    async def follow() -> str:
        async def never_gone() -> bool:
            return False

        with watch.watching(job_ids=("ftjob-x",)) as watcher:
            now = time.monotonic()
            why = await sse.next_move(watcher, now + 30, now + 30, never_gone)
        await watch.stop()
        return why

    try:
        assert asyncio.run(follow()) == "over"
        assert watch.looks == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("gone_after", [0.0, 0.3])
def test_a_waiting_stream_sees_its_client_go(gone_after: float, services: Services) -> None:
    """A stream whose job never moves still ends within a wait slice of its client leaving."""
    watch = StreamWatch(services.engine, tick_seconds=0.05)

    async def follow() -> float:
        left = time.monotonic() + gone_after

        async def gone() -> bool:
            return time.monotonic() >= left

        with watch.watching(job_ids=("ftjob-none",)) as watcher:
            watcher.moved.clear()
            now = time.monotonic()
            why = "moved"
            while why == "moved":
                why = await sse.next_move(watcher, now + 30, now + 30, gone)
            ended = time.monotonic() - now
        await watch.stop()
        assert why == "over"
        return ended

    assert asyncio.run(follow()) < gone_after + sse.WAIT_SLICE_SECONDS + 0.5


def test_a_change_before_the_first_look_wakes_the_stream(
    services: Services, tenant_a: TenantKeys
) -> None:
    """A stream reads its job when it opens, then waits; the first look after it registered
    may already hold a change its read missed, so that look wakes it whatever it holds."""
    (job_id,) = _jobs(services, tenant_a, 1)
    watch = StreamWatch(services.engine, tick_seconds=0.05)

    async def follow() -> str:
        async def never_gone() -> bool:
            return False

        with watch.watching(job_ids=(job_id,)) as watcher:
            # Between the stream's first read and the first look (the loop is not yielded to,
            # so no look runs before this write commits).
            with services.engine.begin() as conn:
                add_event(conn, job_id, "between the read and the first look")
            now = time.monotonic()
            why = await sse.next_move(watcher, now + 30, now + 5.0, never_gone)
        await watch.stop()
        return why

    assert asyncio.run(follow()) == "moved"


def test_a_job_committed_behind_the_newest_still_moves_its_tenants_version(
    services: Services, tenant_a: TenantKeys
) -> None:
    """A job whose transaction began before the newest job's but committed after it is not the
    newest (`created_at` is its transaction's start): the tenant's version moves anyway, with
    the bookkeeping row its queueing writes, so a jobs table announces it."""
    from sqlalchemy import text

    from control_plane.job_versions import look

    base = make_base(services.engine, "tiny-llama")
    file_id = make_file(services.engine, tenant_a.tenant_id).id
    (newest,) = enqueue_jobs(services.engine, tenant_a.tenant_id, base.id, file_id, 1)
    with services.engine.connect() as conn:
        before = look(conn, (), (tenant_a.tenant_id,)).newest[tenant_a.tenant_id]
    (late,) = enqueue_jobs(services.engine, tenant_a.tenant_id, base.id, file_id, 1)
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET created_at = created_at - interval '1 hour' WHERE id = :j"),
            {"j": late},
        )
    with services.engine.connect() as conn:
        after = look(conn, (), (tenant_a.tenant_id,)).newest[tenant_a.tenant_id]
    assert before[0] == after[0] == newest  # the newest job did not change
    assert after != before


def test_each_event_loop_has_its_own_look(services: Services, tenant_a: TenantKeys) -> None:
    """Served from a second loop (a test's second server) after the first one ended, streams
    are woken by a task of their own loop, and the ended loop's state is let go."""
    (job_id,) = _jobs(services, tenant_a, 1)
    watch = StreamWatch(services.engine, tick_seconds=0.05)

    async def follow() -> str:
        async def never_gone() -> bool:
            return False

        with watch.watching(job_ids=(job_id,)) as watcher:
            now = time.monotonic()
            return await sse.next_move(watcher, now + 30, now + 5, never_gone)

    assert asyncio.run(follow()) == "moved"  # the loop ends without `stop`
    assert asyncio.run(follow()) == "moved"
    assert len(watch._loops) == 1
