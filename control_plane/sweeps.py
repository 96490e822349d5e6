"""Cancelling, pausing, resuming and reprioritizing a tenant's jobs by their metadata: a sweep
of thousands in one request.

A platform's tenants queue sweeps (a grid of learning rates, one job per point) and tag them
with OpenAI's job `metadata`; a sweep started by mistake must stop, and one must make way for
something urgent and go on afterwards, without one request per job. Each function here moves
every job of one tenant whose metadata holds every given pair, as the queue's single move
(`JobQueue.request_cancel`, `request_pause`, `resume`) moves one, with its event:

- `cancel_matching`: a job not yet running (validating, queued, paused) is `cancelled` at once;
  a running one is `cancelling`, its trainer told (NOTIFY on the cancel channel, and its next
  heartbeat).
- `pause_matching`: a queued job is `paused` at once; a running one is asked to pause (it stops
  at its next step with a checkpoint, and its trainer's hand-back leaves it `paused`).
- `resume_matching`: a paused job is queued again (trainers woken, as any job queued); a running
  job asked to pause is asked no more.
- `prioritize_matching`: every job that can take a priority (`JobQueue.set_priority`: not
  cancelling, not over) and has another takes the new one; the queued ones move in the claim's
  order at once.

Jobs a move leaves as they are (over, already moved, or in a state it does not take) are not
counted. The jobs move in batches of `batch`, each its own transaction, in the order of the
tenant's `(created_at, id)` index. Every job that moves updates its tenant's bookkeeping row
(the queue's triggers), and a row updated many times in one transaction walks its versions at
each update, so one statement over a 50,000-job sweep would cost the square of its size. A job
a claim holds meanwhile is waited for (not skipped), so a queued job of the sweep cannot slip
into `running` unmoved; a job whose state changed while waited for is passed over, and a last
pass from the start picks up anything a batch passed over that still qualifies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, Engine, TextClause, text

from control_plane.job_status import JobStatus, sql_params
from control_plane.queue import CANCEL_CHANNEL

DEFAULT_BATCH = 100
# The metadata key a sweep made in one request (`POST /v1/fine_tuning/sweeps`) tags each of its
# jobs with: `sweep=<its name>`.
SWEEP_KEY = "sweep"

Action = Literal["cancel", "pause", "resume"]

# One batch of a move: the next `:batch` jobs after the keyset that the move would change
# (`{eligible}`), locked, moved (`{moved}`: an UPDATE of `jobs j` FROM picked, RETURNING the
# job's id, new status and base, and its priority before), each given its event (`{message}`,
# `{data}`, over `moved`); then how many moved at once, the ids of the running jobs it asked,
# the bases of the jobs it queued, and where the batch ended.
_BATCH = """
WITH picked AS (
    SELECT id, created_at, priority AS previous_priority FROM jobs
    WHERE tenant_id = :tenant
      AND (created_at, id) > (CAST(:after_created AS timestamptz), :after_id)
      AND user_metadata @> CAST(:metadata AS jsonb)
      AND {eligible}
    ORDER BY created_at, id
    LIMIT :batch
    FOR UPDATE
), moved AS (
    {moved}
), noted AS (
    INSERT INTO job_events (job_id, message, type, level, data)
    SELECT id, {message}, 'message', 'info', {data} FROM moved
)
SELECT (SELECT count(*) FROM moved WHERE status NOT IN (:running, :cancelling)) AS now,
       (SELECT coalesce(array_agg(id), '{{}}') FROM moved
        WHERE status IN (:running, :cancelling)) AS asked,
       (SELECT coalesce(array_agg(base_model_id), '{{}}') FROM moved
        WHERE status = :queued) AS queued_bases,
       (SELECT max(created_at) FROM picked) AS last_created,
       (SELECT max(id) FROM picked
        WHERE created_at = (SELECT max(created_at) FROM picked)) AS last_id
"""


# The event of a job moved at once (`:now_message`, its new status its data), or of a running
# job asked (`:asked_message`, `:asked_data`; cancelling counts as asked).
_NOW_OR_ASKED = (
    "CASE WHEN status IN (:running, :cancelling) THEN :asked_message ELSE :now_message END",
    "CASE WHEN status IN (:running, :cancelling) THEN CAST(:asked_data AS jsonb) "
    "ELSE jsonb_build_object('status', status) END",
)


@dataclass(frozen=True)
class _Move:
    eligible: str
    moved: str
    now_message: str = ""
    asked_message: str = ""
    asked_data: dict[str, Any] | None = None
    event: tuple[str, str] = _NOW_OR_ASKED  # the event's message and data, SQL over `moved`


_MOVES: dict[str, _Move] = {
    "cancel": _Move(
        eligible="status = ANY(:unfinished) AND NOT cancel_requested",
        moved="""
        UPDATE jobs j SET
          status = CASE WHEN j.status = ANY(:waiting) THEN :cancelled ELSE :cancelling END,
          finished_at = CASE WHEN j.status = ANY(:waiting) THEN now() END,
          cancel_requested = true
        FROM picked WHERE j.id = picked.id
        RETURNING j.id, j.status, j.base_model_id
        """,
        now_message="Job cancelled",
        asked_message="Cancellation requested",
        asked_data={"status": JobStatus.CANCELLING.value},
    ),
    "pause": _Move(
        eligible="(status = :queued OR status = :running AND NOT cancel_requested "
        "AND NOT pause_requested)",
        moved="""
        UPDATE jobs j SET
          status = CASE WHEN j.status = :queued THEN :paused ELSE j.status END,
          pause_requested = (j.status = :running)
        FROM picked WHERE j.id = picked.id
        RETURNING j.id, j.status, j.base_model_id
        """,
        now_message="Job paused; resume it to go on from its newest checkpoint",
        asked_message="Pause requested: the job stops at its next step, with a checkpoint",
        asked_data={"pause_requested": True},
    ),
    "resume": _Move(
        eligible="(status = :paused OR status = :running AND pause_requested)",
        moved="""
        UPDATE jobs j SET
          status = CASE WHEN j.status = :paused THEN :queued ELSE j.status END,
          run_after = CASE WHEN j.status = :paused THEN now() ELSE j.run_after END,
          pause_requested = false
        FROM picked WHERE j.id = picked.id
        RETURNING j.id, j.status, j.base_model_id
        """,
        now_message="Job resumed",
        asked_message="Pause withdrawn",
        asked_data={"pause_requested": False},
    ),
}
# The new priority `:priority`, with `JobQueue.set_priority`'s event.
_PRIORITY = _Move(
    eligible="status = ANY(:prioritizable) AND priority <> :priority",
    moved="""
    UPDATE jobs j SET priority = :priority
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.status, j.base_model_id, picked.previous_priority
    """,
    event=(
        "'Priority changed from ' || previous_priority || ' to ' || CAST(:priority AS int)",
        "jsonb_build_object('priority', CAST(:priority AS int), "
        "'previous_priority', previous_priority)",
    ),
)

_ALL_MOVES: dict[str, _Move] = {**_MOVES, "priority": _PRIORITY}
_STATEMENTS: dict[str, TextClause] = {
    action: text(
        _BATCH.format(
            eligible=move.eligible, moved=move.moved, message=move.event[0], data=move.event[1]
        )
    )
    for action, move in _ALL_MOVES.items()
}
_COUNTS = text(
    "SELECT "
    + ", ".join(f"count(*) FILTER (WHERE {move.eligible}) AS {a}" for a, move in _MOVES.items())
    + " FROM jobs WHERE tenant_id = :tenant AND user_metadata @> CAST(:metadata AS jsonb)"
)
_TELL_TRAINERS = text("SELECT pg_notify(:channel, id) FROM unnest(CAST(:ids AS text[])) AS id")
# A job queued wakes one idle trainer (revision 0017), as `JobQueue.resume` wakes one per job.
_WAKE_TRAINERS = text("SELECT queue_wake(base) FROM unnest(CAST(:bases AS text[])) AS base")
_START = ("-infinity", "")


@dataclass(frozen=True)
class SweepMoved:
    """What a sweep's move changed: jobs moved at once (cancelled, paused, queued again), and
    running jobs asked (to stop, to pause, no more to pause)."""

    now: int
    asked: int

    @property
    def total(self) -> int:
        return self.now + self.asked


def cancel_matching(
    engine: Engine, tenant_id: str, metadata: dict[str, str], *, batch: int = DEFAULT_BATCH
) -> SweepMoved:
    """Cancel every unfinished job of `tenant_id` whose metadata holds every pair of
    `metadata`: `now` cancelled, `asked` running jobs now `cancelling`."""
    return move_matching("cancel", engine, tenant_id, metadata, batch=batch)


def pause_matching(
    engine: Engine, tenant_id: str, metadata: dict[str, str], *, batch: int = DEFAULT_BATCH
) -> SweepMoved:
    """Pause every queued or running job of `tenant_id` whose metadata holds every pair:
    `now` paused, `asked` running jobs asked to pause."""
    return move_matching("pause", engine, tenant_id, metadata, batch=batch)


def resume_matching(
    engine: Engine, tenant_id: str, metadata: dict[str, str], *, batch: int = DEFAULT_BATCH
) -> SweepMoved:
    """Resume every paused job of `tenant_id` whose metadata holds every pair (`now`, queued
    again), and withdraw the pause of every running one asked to pause (`asked`)."""
    return move_matching("resume", engine, tenant_id, metadata, batch=batch)


def prioritize_matching(
    engine: Engine,
    tenant_id: str,
    metadata: dict[str, str],
    priority: int,
    *,
    batch: int = DEFAULT_BATCH,
) -> int:
    """Give `priority` to every job of `tenant_id` whose metadata holds every pair and that can
    take one (not cancelling, not over) with another priority; how many changed."""
    return _sweep("priority", engine, tenant_id, metadata, batch, {"priority": priority}).total


def move_matching(
    action: Action,
    engine: Engine,
    tenant_id: str,
    metadata: dict[str, str],
    *,
    batch: int = DEFAULT_BATCH,
) -> SweepMoved:
    """`cancel_matching`, `pause_matching` or `resume_matching`, by the action's name."""
    return _sweep(action, engine, tenant_id, metadata, batch, {})


def _sweep(
    action: Action | Literal["priority"],
    engine: Engine,
    tenant_id: str,
    metadata: dict[str, str],
    batch: int,
    bound: dict[str, Any],
) -> SweepMoved:
    if not metadata:
        raise ValueError(f"name at least one metadata pair to select the jobs to {action}")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    now = asked = 0
    # Two passes at most: through the index, then once more from the start for what a batch
    # passed over (a job it waited for and then found changed) and still qualifies.
    for _ in range(2):
        after: tuple[datetime | str, str] = _START
        while True:
            with engine.begin() as conn:
                row = _one_batch(conn, action, tenant_id, metadata, batch, after, bound)
            now += row.now
            asked += len(row.asked)
            if row.last_created is None:
                break
            after = (row.last_created, row.last_id)
    return SweepMoved(now, asked)


def counts_matching(conn: Connection, tenant_id: str, metadata: dict[str, str]) -> dict[str, int]:
    """How many of the tenant's jobs whose metadata holds every pair each move would take now
    (by the action's name), counted with the moves' own conditions."""
    return dict(
        conn.execute(
            _COUNTS,
            {"tenant": tenant_id, "metadata": json.dumps(metadata), **sql_params()},
        )
        .one()
        ._mapping
    )


def _one_batch(
    conn: Connection,
    action: Action | Literal["priority"],
    tenant_id: str,
    metadata: dict[str, str],
    batch: int,
    after: tuple[datetime | str, str],
    bound: dict[str, Any],
) -> Any:
    move = _ALL_MOVES[action]
    row = conn.execute(
        _STATEMENTS[action],
        {
            "tenant": tenant_id,
            "metadata": json.dumps(metadata),
            "after_created": after[0],
            "after_id": after[1],
            "batch": batch,
            "now_message": move.now_message,
            "asked_message": move.asked_message,
            "asked_data": json.dumps(move.asked_data),
            **sql_params(),
            **bound,
        },
    ).one()
    # Sent when the batch commits: the trainers of the running jobs asked to stop, and idle
    # trainers for the jobs queued again.
    if action == "cancel" and row.asked:
        conn.execute(_TELL_TRAINERS, {"channel": CANCEL_CHANNEL, "ids": row.asked})
    if action == "resume" and row.queued_bases:
        conn.execute(_WAKE_TRAINERS, {"bases": row.queued_bases})
    return row
