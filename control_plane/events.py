"""Job events: ordered per job, written in the same transaction as the change they describe."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Table,
    UnaryExpression,
    any_,
    insert,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY

from control_plane.db.tables import JobEvent
from control_plane.records import JobEventRecord

events = cast(Table, JobEvent.__table__)


def add_event(
    conn: Connection,
    job_id: str,
    message: str,
    *,
    type: str = "message",
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> int:
    """Append one event to a job's stream; returns its id (monotonic per database)."""
    result = conn.execute(
        insert(events)
        .values(job_id=job_id, message=message, type=type, level=level, data=data)
        .returning(events.c.id)
    )
    return int(result.scalar_one())


@contextmanager
def metric_events_in_bulk(conn: Connection, job_ids: list[str]) -> Iterator[None]:
    """Insert many metric events of these jobs in `conn`'s transaction (an import, a test's
    long run): their loss-chart buckets (`job_metric_rollups`) are summed once per job at the
    end, not updated once per event, which in one transaction costs each update a walk of the
    row's versions (revision 0015). One event per transaction, as trainers write them, needs
    none of this."""
    conn.execute(text("SELECT set_config('loraforge.metric_rollups', 'by_job', true)"))
    yield
    conn.execute(text("SELECT set_config('loraforge.metric_rollups', '', true)"))
    for job_id in job_ids:
        conn.execute(text("SELECT job_metric_rollups_rebuild(:job)"), {"job": job_id})


def of_job(job_id: str) -> ColumnElement[bool]:
    """The events of one job, for statements ordered by `in_job_order`: `job_id = ANY(ARRAY[job])`,
    which PostgreSQL estimates as the equality it is but does not fold into the order.

    Written as an equality, the job is a constant to the planner, which drops it from the
    order (job, id): the order is then the primary key's too, and where one job holds a good
    share of the events the planner walks the primary key back from the table's newest event,
    over every newer event of every job, to the job's own (20,051 rows for a page of 50 of a
    job older than another's 20,000-step run). Ordered by (job, id) with the job as an array,
    only `ix_job_events_job_id_id` gives the order: the job's own events, from its newest or
    its oldest. (A range, `BETWEEN job AND job`, also keeps the order, but is estimated at
    about one row, and the planner then sometimes sorted every event of the job.)"""
    return events.c.job_id == any_(literal([job_id], ARRAY(String)))


def in_job_order(*, newest_first: bool) -> tuple[UnaryExpression[Any], UnaryExpression[Any]]:
    """The order of `ix_job_events_job_id_id`, forwards or backwards (see `of_job`)."""
    if newest_first:
        return events.c.job_id.desc(), events.c.id.desc()
    return events.c.job_id.asc(), events.c.id.asc()


def list_events(
    conn: Connection,
    job_id: str,
    *,
    after: int | None = None,
    limit: int = 20,
    newest_first: bool = True,
) -> list[JobEventRecord]:
    """A page of a job's events. `after` is an event id: the page continues past it in order.

    Each plan reads the job's own events: from its newest (`of_job`), forwards from a cursor
    (the stream: past a finished job's last event, the primary key read forwards would meet
    every newer event of the platform), or backwards from a cursor, where the job equated and
    ordered by id is kept: the cursor bounds the primary key there too, which then meets only
    the events of other jobs logged in between (the job as an array, the planner sometimes
    sorted all the job's events before the cursor)."""
    if newest_first and after is not None:
        query = (
            select(events)
            .where(events.c.job_id == job_id, events.c.id < after)
            .order_by(events.c.id.desc())
        )
    else:
        query = select(events).where(of_job(job_id))
        query = query.order_by(*in_job_order(newest_first=newest_first))
        if after is not None:
            query = query.where(events.c.id > after)
    rows = conn.execute(query.limit(limit)).all()
    return [JobEventRecord.from_row(row) for row in rows]
