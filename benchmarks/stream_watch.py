"""What open job streams cost: one look a tick for every stream of the process
(`control_plane.api.stream_watch`) against each stream reading its job every second on its own
(the streams before it, reproduced here as they were).

    python -m benchmarks.stream_watch [--streams 100 1000] [--seconds 10] [--rounds 2]
        [--events-per-second 20]

A throwaway database (migrated to head) with as many queued jobs as the largest size. For each
size, in alternating rounds, one asyncio stream per job follows it in this process, as the API's
streams do (the shared side is `sse.follow_job` itself), for `--seconds`, while a writer on an
engine of its own adds `--events-per-second` events to random jobs, each in its own transaction.
Each side: the statements its streams ran a second (counted on their engine), the CPU seconds a
second of this process and of the machine's `postgres` processes, and each event's delivery
time (its commit to the stream yielding it), p50 and p99. One JSON line per size and figure, the
shared look beside its own polls.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, event
from starlette.concurrency import run_in_threadpool

from benchmarks.interactive import interactive_services
from benchmarks.queue import (
    TenantFixture,
    _client_cpu_seconds,
    _server_cpu_seconds,
    add_database_url_argument,
    emit,
    insert_queued_jobs,
    machine_description,
    make_base,
    make_file_row,
    make_tenant,
    percentile,
    progress,
)
from control_plane import jobs
from control_plane.api import sse
from control_plane.api.stream_watch import StreamWatch
from control_plane.events import add_event, list_events
from control_plane.records import JobRecord
from control_plane.services import Services

OWN_POLL_SECONDS = 1.0  # how often each stream read its job before the shared look

Received = Callable[[int], None]


async def _own_polls(
    services: Services,
    tenant_id: str,
    job_id: str,
    received: Received,
    opened: Callable[[], None],
    failed: Callable[[], None],
) -> None:
    """A stream as it was: its job and its new events read every second, whatever moved."""
    cursor: int | None = None

    def read() -> tuple[JobRecord | None, list[Any]]:
        with services.engine.connect() as conn:
            job = jobs.get_job(conn, tenant_id, job_id)
            found = list_events(
                conn, job_id, after=cursor, limit=sse.EVENTS_PER_POLL, newest_first=False
            )
            return job, found

    first = True
    while True:
        try:
            job, found = await run_in_threadpool(read)
        except sqlalchemy.exc.TimeoutError:
            # No connection came free in time: the stream would have ended here and its client
            # reconnected; it reads again at its next poll.
            failed()
        else:
            if job is None:
                return
            if found:
                cursor = found[-1].id
                for e in found:
                    received(e.id)
        if first:
            first = False
            opened()
        await asyncio.sleep(OWN_POLL_SECONDS)


async def _shared_look(
    services: Services,
    watch: StreamWatch,
    tenant_id: str,
    job_id: str,
    received: Received,
    opened: Callable[[], None],
) -> None:
    async def never_gone() -> bool:
        return False

    first = True
    async for change in sse.follow_job(services, watch, tenant_id, job_id, None, never_gone):
        if first:
            first = False
            opened()
        if change is not None:
            for e in change.events:
                received(e.id)


def _writer(
    engine: Engine,
    job_ids: list[str],
    rate: float,
    stop: threading.Event,
    committed: dict[int, float],
) -> None:
    rng = random.Random(11)
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += 1.0 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
        with engine.begin() as conn:
            event_id = add_event(conn, rng.choice(job_ids), "a step")
        committed[event_id] = time.monotonic()


def _round(
    side: str,
    services: Services,
    writer_engine: Engine,
    tenant_id: str,
    job_ids: list[str],
    seconds: float,
    rate: float,
) -> dict[str, Any]:
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    delivered: dict[int, float] = {}
    committed: dict[int, float] = {}

    def received(event_id: int) -> None:
        delivered.setdefault(event_id, time.monotonic())

    opened_count = failed_count = 0

    def opened() -> None:
        nonlocal opened_count
        opened_count += 1

    def failed() -> None:
        nonlocal failed_count
        failed_count += 1

    async def run() -> None:
        watch = StreamWatch(services.engine)
        if side == "shared_look":
            streams = [
                _shared_look(services, watch, tenant_id, j, received, opened) for j in job_ids
            ]
        else:
            streams = [
                _own_polls(services, tenant_id, j, received, opened, failed) for j in job_ids
            ]
        opening = time.monotonic()
        tasks = [asyncio.create_task(s) for s in streams]
        while opened_count + sum(task.done() for task in tasks) < len(job_ids):
            await asyncio.sleep(0.05)
        # Past the streams' first reads, and the shared side's first look and the read again
        # that it wakes (which take about as long as the first reads).
        await asyncio.sleep(time.monotonic() - opening + 2.0)
        nonlocal statements, failed_count
        statements = failed_count = 0
        event.listen(services.engine, "before_cursor_execute", count)
        stop = threading.Event()
        writer = threading.Thread(
            target=_writer, args=(writer_engine, job_ids, rate, stop, committed)
        )
        client, server = _client_cpu_seconds(), _server_cpu_seconds()
        started = time.monotonic()
        writer.start()
        await asyncio.sleep(seconds)
        stop.set()
        await run_in_threadpool(writer.join)
        await asyncio.sleep(OWN_POLL_SECONDS + 0.5)  # the last events reach their streams
        elapsed = time.monotonic() - started
        event.remove(services.engine, "before_cursor_execute", count)
        client_cpu = _client_cpu_seconds() - client
        server_cpu = None if server is None else (_server_cpu_seconds() or 0.0) - server
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await watch.stop()
        result.update(
            statements_per_s=statements / elapsed,
            client_cpu_per_s=client_cpu / elapsed,
            server_cpu_per_s=None if server_cpu is None else server_cpu / elapsed,
            reads_without_connection=failed_count,
        )

    result: dict[str, Any] = {}
    asyncio.run(run())
    latencies = [
        max(0.0, delivered[e] - at) * 1000 for e, at in committed.items() if e in delivered
    ]
    result.update(latencies_ms=latencies, lost=len(committed) - len(latencies))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_watch", description=__doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--events-per-second", type=float, default=20.0)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with interactive_services(args.database_url, lease_seconds=30) as (services, _):
        engine = services.engine
        machine = machine_description(engine)
        writer_engine = create_engine(services.database_url)
        tenant_id = make_tenant(engine, "streams-bench")
        fixture = TenantFixture(tenant_id, make_file_row(engine, tenant_id))
        insert_queued_jobs(
            engine, make_base(engine, "streams-base"), [(fixture, max(args.streams))]
        )
        with engine.connect() as conn:
            listed, _ = jobs.list_jobs(conn, tenant_id, after=None, limit=max(args.streams))
        all_jobs = [job.id for job in listed]
        try:
            for size in args.streams:
                job_ids = all_jobs[:size]
                sides: dict[str, list[dict[str, Any]]] = {"shared_look": [], "own_polls": []}
                for round_number in range(args.rounds):
                    for side in sides:
                        progress(f"{size} streams, round {round_number + 1}: {side}")
                        sides[side].append(
                            _round(
                                side,
                                services,
                                writer_engine,
                                tenant_id,
                                job_ids,
                                args.seconds,
                                args.events_per_second,
                            )
                        )
                _emit(size, sides, args, machine)
        finally:
            writer_engine.dispose()
    return 0


def _emit(
    size: int, sides: dict[str, list[dict[str, Any]]], args: argparse.Namespace, machine: str
) -> None:
    def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
        latencies = [ms for r in rounds for ms in r["latencies_ms"]]
        server = [r["server_cpu_per_s"] for r in rounds if r["server_cpu_per_s"] is not None]
        return {
            "statements_per_s": round(sum(r["statements_per_s"] for r in rounds) / len(rounds), 1),
            "client_cpu_per_s": round(sum(r["client_cpu_per_s"] for r in rounds) / len(rounds), 3),
            "server_cpu_per_s": round(sum(server) / len(server), 3) if server else None,
            "delivery_p50_ms": round(percentile(latencies, 50), 1),
            "delivery_p99_ms": round(percentile(latencies, 99), 1),
            "events": len(latencies),
            "lost": sum(r["lost"] for r in rounds),
            "reads_without_connection": sum(r["reads_without_connection"] for r in rounds),
        }

    shared, own = summary(sides["shared_look"]), summary(sides["own_polls"])
    emit(
        {
            "name": "job_streams",
            "streams": size,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "events_per_second": args.events_per_second,
            **shared,
            "baseline": "own_polls",
            **{f"baseline_{k}": v for k, v in own.items()},
            "statements_ratio": round(shared["statements_per_s"] / own["statements_per_s"], 4),
            "machine": machine,
        }
    )


if __name__ == "__main__":
    raise SystemExit(main())
