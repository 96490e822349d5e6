"""The Postgres job queue: every state transition of a job, and nothing else.

Jobs are the queue. A claim is one statement (`FOR UPDATE SKIP LOCKED` + `UPDATE ... RETURNING`)
ordered by priority, then fair share between tenants (running + queued rank, then the tenant
served least recently), then base affinity, then age. Its cost does not grow with the backlog:
it ranks only the front of each (tenant, base) line, found through the bookkeeping that
revision 0006's triggers keep exact (`queue_stats`), and proves its choice is the backlog's
first or falls back to ranking everything (docs/architecture.md, "The claim at scale"). A
claimed job holds a lease that its worker renews by heartbeat; an expired lease (its trainer
lost) puts the job back without using an attempt, up to `max_interruptions`. Idle trainers
sleep on `LISTEN/NOTIFY` rather than polling, each on its own channel, and a queued job wakes
one of them (`WakeUps`).

Longer than the house's ~450 lines on purpose: each transition's statement stands beside the
one method that runs it, with its guard and its event; splitting them apart would separate a
statement from the promise it keeps.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy.exc
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Dialect, Engine, TextClause, text

from control_plane.db import libpq_url
from control_plane.events import add_event
from control_plane.job_status import JobStatus, sql_params
from control_plane.records import JobRecord

log = logging.getLogger(__name__)

JOBS_CHANNEL = "loraforge_jobs"
CANCEL_CHANNEL = "loraforge_cancel"
# A claim ranks the front of the queue: the first CLAIM_FRONT_LINES lines (one per tenant and
# base) in the claim's order, and about CLAIM_FRONT_JOBS jobs spread over them (all from one
# line when only one has jobs). It locks among the best of those, so more claimers than that
# claiming at the same instant could find all of them locked and see an empty queue for a
# moment. When no walk of the front can prove its first is the backlog's first, the claim ranks
# every claimable job and locks among the best CLAIM_CANDIDATES.
CLAIM_FRONT_LINES = 8
CLAIM_FRONT_JOBS = 32
CLAIM_CANDIDATES = 64
# When the walk of the front cannot prove its answer (the heads of every line it walked are
# backing off), it walks again this many times wider (8, then 64, then 512 lines) before the
# claim ranks the whole backlog: a retry storm that backs off hundreds of lines costs a claim a
# few hundred index probes, not a sort of every queued job.
CLAIM_FRONT_WIDENING = (1, 8, 64)


# Every statement here binds the statuses it names (`:queued`, `:running`, ...) and the sets
# (`status = ANY(:active)`), so the vocabulary lives in `control_plane.job_status` alone.
_STATUSES: dict[str, Any] = sql_params()

# Where a job that goes back to the queue goes: `paused` instead when a pause was asked for
# while it ran (its trainer lost, failed for another try, or shut down before it could pause).
_REQUEUED = "CASE WHEN pause_requested THEN :paused ELSE :queued END"

# When a retried job may run again: `retry_backoff_seconds` doubled per attempt used.
_BACKOFF_RUN_AFTER = "now() + make_interval(secs => :backoff * power(2, greatest(attempt - 1, 0)))"


def _params(**values: Any) -> dict[str, Any]:
    """A statement's parameters plus the statuses and status sets that every statement binds."""
    return {**_STATUSES, **values}


def _notify_queued(conn: Connection, base_model_id: str, run_after: datetime | None = None) -> None:
    """A job for this base became claimable: wake one idle trainer (revision 0017's
    `queue_wake`: one holding the base resident first), or notify JOBS_CHANNEL when none
    sleeps. The notification goes out when the caller's transaction commits. A job backing off
    (`run_after` later than now) wakes no one: a trainer woken now would find nothing, and one
    finds it at its next poll once it is due."""
    conn.execute(
        text(
            "SELECT queue_wake(:base) "
            "WHERE CAST(:run_after AS timestamptz) IS NULL OR :run_after <= now()"
        ),
        {"base": base_model_id, "run_after": run_after},
    )


def _paused_event(conn: Connection, job_id: str, message: str) -> None:
    add_event(
        conn,
        job_id,
        f"{message}; resume it to go on from its newest checkpoint",
        data={"status": JobStatus.PAUSED},
    )


class JobStateError(Exception):
    """A transition that the job's current state does not allow."""

    def __init__(self, job_id: str, status: str, action: str) -> None:
        super().__init__(f"job {job_id} is {status}: it cannot be {action}")
        self.job_id = job_id
        self.status = status
        self.action = action


@dataclass(frozen=True)
class Heartbeat:
    """What a worker learns when it renews its lease."""

    held: bool
    cancel_requested: bool
    pause_requested: bool = False


# Literal, not bound: a partial index on the queued jobs serves a statement only when its planner
# can see the status, which a generic (prepared) plan over a bound parameter cannot.
_QUEUED = f"'{JobStatus.QUEUED}'"

# What both claim statements do with the job they picked: lock its tenant's bookkeeping row and
# start the job under a lease only while the tenant is under its limit, then log it. The row
# lock serialises one tenant's claims, and re-reads the row's newest version (a concurrent claim
# that committed meanwhile counts), so the limit holds exactly under concurrent claimers; the
# triggers of revision 0006 then count the job running and stamp the tenant served.
_START_PICKED = """
    allowed AS (
        SELECT s.tenant_id FROM tenant_queue_stats s
        JOIN picked ON picked.tenant_id = s.tenant_id
        JOIN tenants t ON t.id = s.tenant_id
        WHERE s.running < coalesce(t.max_running_jobs, :default_limit)
        FOR UPDATE OF s
    ),
    claimed AS (
        UPDATE jobs SET status = :running,
                        attempt = jobs.attempt + 1,
                        lease_owner = :worker,
                        lease_expires_at = now() + make_interval(secs => :lease),
                        started_at = coalesce(jobs.started_at, now()),
                        error_code = NULL, error_message = NULL, error_param = NULL
        FROM picked JOIN allowed ON allowed.tenant_id = picked.tenant_id
        WHERE jobs.id = picked.id
        RETURNING jobs.*
    ),
    logged AS (
        INSERT INTO job_events (job_id, message, data)
        SELECT id,
               'Job started by ' || :worker || ' (attempt ' || attempt || ' of '
                   || max_attempts || ')',
               jsonb_build_object('status', CAST(:running AS text), 'attempt', attempt, 'worker', :worker)
        FROM claimed
        RETURNING job_id
    )
"""

# Every claim statement commits without waiting for its WAL to reach the disk (`synchronous_commit
# = off` for its own transaction: `set_config(..., true)` holds for the statement's transaction,
# autocommit or not, and the commit reads it). A claim is the one write the lease already makes
# safe to lose: a crash that loses it leaves the job queued and its tenant's bookkeeping as before
# (one transaction, gone whole), the trainer's next heartbeat finds no lease and it stops, and
# the job is claimed again. Any later synchronous commit (the trainer's heartbeat, its finish,
# anyone's) flushes the claim with it, and the WAL writer does within wal_writer_delay. So a
# claim is visible at once and durable soon after, and no claim waits on the disk; the finishes
# and everything else still wait. tests/integration/test_claim_crash.py loses one to a crash.
_LEASED_COMMIT = "set_config('synchronous_commit', 'off', true) IS NOT NULL AS leased_commit"

# The claim is planned once per connection, not once per claim: planning its statement costs
# more than running it, and PostgreSQL's plan cache, comparing estimates, kept re-planning it
# (no generic plan in 595 claims on one connection). The generic plan walks the same indexes:
# every status and limit the claim depends on is a literal.
_GENERIC_PLAN = text("SET LOCAL plan_cache_mode = force_generic_plan")

# The first candidate (by `position`) that is still claimable and not being claimed right now.
# The candidates' ids go in as one array, so the jobs are found through their primary key
# whatever the planner thinks a CTE holds (joined, it may hash the whole table instead).
_PICK = f"""
    pick_order AS (SELECT array_agg(id ORDER BY position) AS ids FROM candidates),
    picked AS (
        SELECT j.id, j.tenant_id FROM pick_order o JOIN jobs j ON j.id = ANY(o.ids)
        WHERE {{gate}} j.status = {_QUEUED} AND j.run_after <= now()
        ORDER BY array_position(o.ids, j.id)
        LIMIT 1
        FOR UPDATE OF j SKIP LOCKED
    ),"""

# Whether the lines are flagged against this claim's default running limit (revision 0013):
# `queue_heads.saturated` says a tenant is at its limit, the tenant's own or this default.
_SYNCED = "(SELECT default_max_running FROM queue_settings) = :default_limit"

# The lines of the queue, one per (tenant, base), best head first: `queue_heads` in the order of
# its partial index, which holds no line whose tenant is at its running limit (a walk never
# reads one to skip it), past tenants excluded by an earlier try. No line at all when the lines
# are flagged against another default than this claim's (the claim sets its own first).
_LINE_ORDER = (
    "h.top_priority DESC, h.running, h.last_served_at NULLS FIRST, h.head_created_at, h.head_id"
)
_WALK = f"""
    SELECT h.tenant_id, h.base_model_id, h.top_priority, h.running, h.last_served_at,
           h.head_created_at, h.head_id
    FROM queue_heads h
    WHERE h.queued > 0 AND NOT h.saturated AND {_SYNCED}
      AND h.tenant_id <> ALL(CAST(:excluded AS text[])) {{only}}
    ORDER BY {{first}}{_LINE_ORDER}
    LIMIT {{lines}}
"""

# The last line a walk reached, when the walk was cut off at `lines`: every line it did not
# reach ranks at or after this bound (`affinity` -1 in the walk of the preferred base's lines).
_LAST_LINE = """
    SELECT -top_priority AS priority, running, coalesce(last_served_at, '-infinity') AS served,
           {affinity} AS affinity, head_created_at AS created_at, head_id AS id
    FROM {walk}
    WHERE (SELECT count(*) FROM {walk}) = {lines}
    ORDER BY top_priority, running DESC, last_served_at DESC NULLS LAST,
             head_created_at DESC, head_id DESC
    LIMIT 1
"""


# The claim at a cost that does not grow with the backlog. It ranks the front of the queue
# only: the first `lines` lines in the claim's order, and the first `lines` lines of the
# preferred base, the first claimable jobs of each (an index probe per line), ranked
# exactly as `_CLAIM_RANKED` ranks the whole backlog. A line's stored head may be backing off,
# so a walk's order is optimistic; the first of the front is still the first of the backlog when
# it ranks at or before the last line each cut-off walk reached (`certain`). When that cannot be
# shown (lines whose heads all back off fill a walk), nothing is claimed here and claim() walks
# wider (CLAIM_FRONT_WIDENING), and only then runs `_CLAIM_RANKED`, which is exact in every case.
@functools.cache
def _claim_front(lines: int) -> TextClause:
    """The front claim walking `lines` lines (literal, as are the other limits: a prepared
    statement's generic plan cannot see a bound LIMIT, and the claim must never be planned
    for a walk of unknown length)."""
    any_walk = _WALK.format(only="", first="", lines=lines)
    # No preferred base, no walk: a one-time filter, so a generic plan does not scan for it.
    base_walk = _WALK.format(
        only="AND h.base_model_id = :prefer AND CAST(:prefer AS text) IS NOT NULL",
        first="h.base_model_id, ",
        lines=lines,
    )
    return text(
        f"""
    WITH any_line AS MATERIALIZED ({any_walk}),
    base_line AS MATERIALIZED ({base_walk}),
    lines AS MATERIALIZED (
        SELECT tenant_id, base_model_id, running, last_served_at FROM any_line
        UNION
        SELECT tenant_id, base_model_id, running, last_served_at FROM base_line
    ),
    front AS MATERIALIZED (
        SELECT j.id, l.tenant_id, j.priority, j.created_at, l.running, l.last_served_at,
               (j.base_model_id IS NOT DISTINCT FROM :prefer) AS preferred
        FROM lines l
        CROSS JOIN LATERAL (
            SELECT id, base_model_id, priority, created_at FROM jobs
            WHERE tenant_id = l.tenant_id AND base_model_id = l.base_model_id
              AND status = {_QUEUED} AND run_after <= now()
            ORDER BY priority DESC, created_at, id
            LIMIT (SELECT ({CLAIM_FRONT_JOBS} - 1) / greatest(count(*), 1) + 1 FROM lines)
        ) j
    ),
    candidates AS MATERIALIZED (
        SELECT *, row_number() OVER (
                   ORDER BY priority DESC, share, last_served_at ASC NULLS FIRST,
                            preferred DESC, created_at, id
               ) AS position
        FROM (
            SELECT *, running + row_number() OVER (
                       PARTITION BY tenant_id
                       ORDER BY priority DESC, preferred DESC, created_at, id
                   ) AS share
            FROM front
        ) ranked
    ),
    unreached AS (
        ({_LAST_LINE.format(affinity=0, walk="any_line", lines=lines)})
        UNION ALL
        ({_LAST_LINE.format(affinity=-1, walk="base_line", lines=lines)})
    ),
    certain AS (
        SELECT NOT EXISTS (
            SELECT 1 FROM unreached u LEFT JOIN candidates b ON b.position = 1
            WHERE b.id IS NULL
               OR ROW(-b.priority, b.running, coalesce(b.last_served_at, '-infinity'),
                      -b.preferred::int, b.created_at, b.id)
                > ROW(u.priority, u.running, u.served, u.affinity, u.created_at, u.id)
        ) AS proven
    ),
    {_PICK.format(gate="(SELECT proven FROM certain) AND")}
    {_START_PICKED}
    SELECT (SELECT proven FROM certain) AS proven, (SELECT tenant_id FROM picked) AS picked_tenant,
           {_SYNCED} AS synced, {_LEASED_COMMIT}, claimed.*
    FROM (SELECT 1) AS one LEFT JOIN claimed ON true
    """
    )


# The common claim, a few index rows: the first line of the queue whose stored head is claimable.
# The lines' index holds each line's head in the claim's order (priority, running, the tenant
# served least recently, age, id), and a tenant's first job can only be the head of its first
# line, so that head is the backlog's first job when
# - it is claimable: a head backing off hides the line's next job, which may rank anywhere
#   (then the walk of `_claim_front` decides);
# - no preferred base could reorder a tie (`settled`): the line is on the preferred base, or the
#   next line ranks strictly after it on (priority, running, served), where affinity breaks ties;
# - every line before it would have been taken by these rules but is locked by a claim in
#   flight (or was claimed since the statement began), is another tenant's, and has the same
#   priority and running count as it: once that claim commits, its tenant's next job ranks on
#   one more running job, after this head.
# What the lines alone decide (`eligible`) is read off the walk; the heads' jobs are then read in
# line order and the first one that no claim holds is locked (SKIP LOCKED), so a claim beside
# no other reads one job. Only then are the heads' own conditions checked: it is claimable, and
# every line passed before it (held by claims in flight) had a claimable head. Otherwise (or
# when every eligible head is held) nothing is claimed here and claim() walks the front; an
# empty walk shows that nothing is claimable, so an idle trainer's claim is one statement too.
_SETTLED = """(CAST(:prefer AS text) IS NULL OR {w}.base_model_id = :prefer
        OR {w}.next_priority IS NULL
        OR ROW({w}.next_priority, {w}.next_running, {w}.next_served)
           > ROW({w}.priority, {w}.running, {w}.served))"""


@functools.cache
def _claim_head(lines: int) -> TextClause:
    return text(
        f"""
    WITH walk AS MATERIALIZED (
        SELECT *, settled AND (position = 1 OR (
                   first_of_tenant AND (priority, running) = (top_priority, top_running)
                   AND bool_and(settled) OVER passed)) AS eligible
        FROM (
            SELECT *, {_SETTLED.format(w="lines")} AS settled,
                   row_number() OVER (PARTITION BY tenant_id ORDER BY position) = 1
                       AS first_of_tenant,
                   first_value(priority) OVER (ORDER BY position) AS top_priority,
                   first_value(running) OVER (ORDER BY position) AS top_running
            FROM (
                -- One line more than the walk, so that the last line walked sees the next one.
                SELECT h.tenant_id, h.base_model_id, h.head_id, -h.top_priority AS priority,
                       h.running, coalesce(h.last_served_at, '-infinity') AS served,
                       row_number() OVER front AS position,
                       lead(-h.top_priority) OVER front AS next_priority,
                       lead(h.running) OVER front AS next_running,
                       lead(coalesce(h.last_served_at, '-infinity')) OVER front AS next_served
                FROM ({_WALK.format(only="", first="", lines=lines + 1)}) h
                WINDOW front AS (ORDER BY {_LINE_ORDER})
            ) lines
            WHERE position <= {lines}
        ) ranked
        WINDOW passed AS (ORDER BY position ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
    ),
    held AS (
        -- The first eligible head, in line order, that no claim in flight holds.
        SELECT w.tenant_id, w.head_id, w.position, j.run_after <= now() AS ready
        FROM (SELECT * FROM walk WHERE eligible ORDER BY position) w
        JOIN jobs j ON j.id = w.head_id
        WHERE j.status = {_QUEUED}
        ORDER BY w.position
        LIMIT 1
        FOR UPDATE OF j SKIP LOCKED
    ),
    picked AS (
        SELECT head_id AS id, tenant_id FROM held
        WHERE ready AND (position = 1 OR NOT EXISTS (
            SELECT 1 FROM walk passed
            LEFT JOIN jobs j
              ON j.id = passed.head_id AND j.status = {_QUEUED} AND j.run_after <= now()
            WHERE passed.position < held.position AND j.id IS NULL))
    ),
    {_START_PICKED}
    -- No line at all (nothing queued under its tenant's limit): nothing is claimable, shown.
    SELECT (SELECT id FROM picked) IS NOT NULL OR NOT EXISTS (SELECT 1 FROM walk) AS proven,
           (SELECT tenant_id FROM picked) AS picked_tenant, {_SYNCED} AS synced,
           {_LEASED_COMMIT}, claimed.*
    FROM (SELECT 1) AS one LEFT JOIN claimed ON true
    """
    )


@functools.cache
def _driver_sql(statement: TextClause, dialect: Dialect) -> str:
    """A statement as psycopg takes it (`%(name)s` placeholders), compiled once, without its
    comment lines and indentation: psycopg keeps the parsed form of a query of at most 4,096
    characters (its MAX_CACHED_STATEMENT_LENGTH) and parses a longer one again at every
    execution; the common claim's text stays within it (tests/unit/test_claim_sql.py)."""
    lines = (line.strip() for line in str(statement.compile(dialect=dialect)).splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--"))


# The claim's order written over the whole backlog: every claimable job ranked, two window sorts
# over all of them. Exact whatever the heads say; its cost grows with the backlog, so it runs
# only when `_claim_front` cannot prove its answer.
_CLAIM_RANKED = text(
    f"""
    WITH eligible AS (
        SELECT j.id, j.priority, j.base_model_id, j.created_at, s.last_served_at,
               s.running + row_number() OVER (
                   PARTITION BY j.tenant_id
                   ORDER BY j.priority DESC,
                            (j.base_model_id IS NOT DISTINCT FROM :prefer) DESC,
                            j.created_at, j.id
               ) AS share
        FROM jobs j
        JOIN tenants t ON t.id = j.tenant_id
        JOIN tenant_queue_stats s ON s.tenant_id = j.tenant_id
        WHERE j.status = {_QUEUED} AND j.run_after <= now()
          AND s.running < coalesce(t.max_running_jobs, :default_limit)
          AND j.tenant_id <> ALL(CAST(:excluded AS text[]))
    ),
    candidates AS MATERIALIZED (
        SELECT id, row_number() OVER (
                   ORDER BY priority DESC, share, last_served_at ASC NULLS FIRST,
                            (base_model_id IS NOT DISTINCT FROM :prefer) DESC, created_at, id
               ) AS position
        FROM eligible
        ORDER BY position
        LIMIT {CLAIM_CANDIDATES}
    ),
    {_PICK.format(gate="")}
    {_START_PICKED}
    SELECT true AS proven, (SELECT tenant_id FROM picked) AS picked_tenant, {_LEASED_COMMIT},
           claimed.*
    FROM (SELECT 1) AS one LEFT JOIN claimed ON true
    """
)

_FAIL = text(
    f"""
    UPDATE jobs SET
      status = CASE
        WHEN cancel_requested THEN :cancelled
        WHEN :retryable AND attempt < max_attempts THEN {_REQUEUED}
        ELSE :failed END,
      pause_requested = false,
      run_after = {_BACKOFF_RUN_AFTER},
      finished_at = CASE WHEN cancel_requested OR NOT (:retryable AND attempt < max_attempts)
                         THEN now() END,
      lease_owner = NULL, lease_expires_at = NULL,
      error_code = :code, error_message = :message
    WHERE id = :id AND lease_owner = :worker AND status = ANY(:active)
    RETURNING *
    """
)

# A lease that expired means its trainer was lost (killed, out of memory, node gone): the
# platform's fault, not the job's. The job goes back at once with its attempt given back
# (`attempt - 1`: the next claim runs the same attempt again) and one more interruption; only
# after `max_interruptions` of them does it fail.
_REAP = text(
    f"""
    UPDATE jobs SET
      status = CASE
        WHEN cancel_requested THEN :cancelled
        WHEN interruptions + 1 >= :max_interruptions THEN :failed
        ELSE {_REQUEUED} END,
      pause_requested = false,
      attempt = CASE WHEN cancel_requested OR interruptions + 1 >= :max_interruptions
                     THEN attempt ELSE greatest(attempt - 1, 0) END,
      interruptions = interruptions + 1,
      run_after = now(),
      finished_at = CASE WHEN cancel_requested OR interruptions + 1 >= :max_interruptions
                         THEN now() END,
      error_code = CASE WHEN cancel_requested THEN error_code ELSE 'lease_expired' END,
      error_message = CASE WHEN cancel_requested THEN error_message ELSE
        'the worker ' || coalesce(lease_owner, '?') || ' stopped renewing its lease'
        || CASE WHEN interruptions + 1 >= :max_interruptions
                THEN ' (' || (interruptions + 1) || ' trainers lost in all)' ELSE '' END
      END,
      lease_owner = NULL, lease_expires_at = NULL
    WHERE id IN (
      SELECT id FROM jobs WHERE status = ANY(:active)
        AND lease_expires_at < now() FOR UPDATE SKIP LOCKED
    )
    RETURNING *
    """
)

# Whether a trainer's claim should reap first: the platform's last reap (`queue_reaps`, revision
# 0016) is at least `:interval` seconds ago, or unknown. The statement that finds it due stamps
# it, so of trainers polling at once one reaps (the others wait on the row only while that
# statement commits, then find it stamped) and the rest read one row, not every running job's
# lease. Without the row (a database restored without it), every claim reaps, as before.
_REAP_DUE = text(
    """
    WITH due AS (
        UPDATE queue_reaps SET reaped_at = now()
        WHERE reaped_at IS NULL OR reaped_at <= now() - make_interval(secs => :interval)
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM due) OR NOT EXISTS (SELECT 1 FROM queue_reaps)
    """
)

# Before a reap, the bookkeeping rows of the tenants it will touch, locked in one order: two
# reapers (a trainer's claim and celery's beat, or trainers on a database without
# `queue_reaps`) then never hold one tenant each and wait on the other's.
_LOCK_REAPED_TENANTS = text(
    """
    SELECT tenant_id FROM tenant_queue_stats
    WHERE tenant_id IN (
        SELECT tenant_id FROM jobs WHERE status = ANY(:active) AND lease_expires_at < now()
    )
    ORDER BY tenant_id
    FOR UPDATE
    """
)


# Setting the default running limit the lines are flagged against (`_adopt_default_limit`):
# how long it waits for the lines, and how soon one queue sets its default again after it did
# (claimers that disagree, as during a rollout of a new setting, would otherwise take turns
# re-flagging every line at each claim; meanwhile the one whose default is not set ranks the
# backlog, exact whatever the flags).
ADOPT_LOCK_TIMEOUT_MS = 5000
ADOPT_INTERVAL_SECONDS = 60.0
_LOCK_NOT_AVAILABLE = "55P03"
_ADOPT_SETTINGS = text(
    """
    INSERT INTO queue_settings (id, default_max_running) VALUES (1, :limit)
    ON CONFLICT (id) DO UPDATE SET default_max_running = EXCLUDED.default_max_running
     WHERE queue_settings.default_max_running <> EXCLUDED.default_max_running
    """
)
_ADOPT_LINES = text(
    """
    UPDATE queue_heads h SET max_running = :limit
    FROM tenants t
    WHERE t.id = h.tenant_id AND t.max_running_jobs IS NULL AND h.max_running <> :limit
    """
)


def quarter_of_a_lease(lease_seconds: float) -> float:
    """A quarter of a lease, between 0.5 and 15 s: how often a trainer tells the registry it is
    there, and how long trainers leave between reaps (`JobQueue.reap_if_due`)."""
    return min(max(lease_seconds / 4, 0.5), 15.0)


class JobQueue:
    """State transitions of jobs. Every method runs its own short transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float = 60.0,
        retry_backoff_seconds: float = 10.0,
        max_running_per_tenant: int = 4,
        max_interruptions: int = 5,
        front_lines: int = CLAIM_FRONT_LINES,
        reap_interval_seconds: float | None = None,
    ) -> None:
        self.engine = engine
        self.front_lines = front_lines
        self.lease_seconds = lease_seconds
        # How long `reap_if_due` leaves between the platform's reaps: a quarter of a lease (what
        # an expired lease may wait past the next claim), between 0.5 and 15 s.
        self.reap_interval_seconds = (
            quarter_of_a_lease(lease_seconds)
            if reap_interval_seconds is None
            else reap_interval_seconds
        )
        self.retry_backoff_seconds = retry_backoff_seconds
        self.max_running_per_tenant = max_running_per_tenant
        self.max_interruptions = max_interruptions
        # When this queue may next set its default limit on the lines, and next warn that
        # claimers disagree on it (`_adopt_default_limit`).
        self._next_adoption = float("-inf")
        self._next_disagreement_warning = float("-inf")

    # -- entering the queue -------------------------------------------------------------

    def mark_queued(self, job_id: str) -> JobRecord:
        """`validating_files → queued` once the dataset passed validation; wakes idle workers."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    "UPDATE jobs SET status = :queued, run_after = now() "
                    "WHERE id = :id AND status = :validating_files RETURNING *"
                ),
                _params(id=job_id),
            ).one_or_none()
            if row is None:
                raise JobStateError(job_id, self._status(conn, job_id), JobStatus.QUEUED)
            add_event(
                conn, job_id, "Files validated; job queued", data={"status": JobStatus.QUEUED}
            )
            _notify_queued(conn, row.base_model_id)
        return JobRecord.from_row(row)

    def mark_validation_failed(
        self, job_id: str, *, code: str, message: str, param: str | None = None
    ) -> JobRecord:
        """`validating_files → failed` with the reason (a line number where there is one)."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    "UPDATE jobs SET status = :failed, finished_at = now(), error_code = :code, "
                    "error_message = :message, error_param = :param "
                    "WHERE id = :id AND status = :validating_files RETURNING *"
                ),
                _params(id=job_id, code=code, message=message, param=param),
            ).one_or_none()
            if row is None:
                raise JobStateError(job_id, self._status(conn, job_id), "failed by validation")
            add_event(
                conn,
                job_id,
                f"Validation failed: {message}",
                level="error",
                data={"status": JobStatus.FAILED, "code": code},
            )
        return JobRecord.from_row(row)

    # -- claiming and holding -------------------------------------------------------------

    def claim(self, worker_id: str, *, prefer_base_model_id: str | None = None) -> JobRecord | None:
        """Claim the next job for `worker_id`, or None when nothing is claimable now."""
        excluded: list[str] = []
        adopted = False
        while True:
            params = self._claim_params(worker_id, prefer_base_model_id, excluded)
            row = self._claim_on_driver(_claim_head(self.front_lines), params)
            if not row.synced and not adopted:
                # The lines are flagged against another default limit: set this claim's, once.
                adopted = True
                if self._adopt_default_limit():
                    continue
            if not (row.proven and row.synced):
                with self.engine.begin() as conn:
                    conn.execute(_GENERIC_PLAN)
                    # A walk shows nothing where the lines are flagged against another default
                    # (another claimer's, set meanwhile): then the whole backlog is ranked.
                    for widening in CLAIM_FRONT_WIDENING if row.synced else ():
                        front = _claim_front(self.front_lines * widening)
                        row = conn.execute(front, params).one()
                        if row.proven and row.synced:
                            break
                    else:
                        row = conn.execute(_CLAIM_RANKED, params).one()
            if row.id is not None:
                return JobRecord.from_row(row)
            if row.picked_tenant is None:
                return None
            # The job's tenant reached its limit (a concurrent claim committed meanwhile).
            excluded.append(row.picked_tenant)

    def _adopt_default_limit(self) -> bool:
        """Flag the lines against this queue's default running limit (`queue_settings`): every
        line of a tenant without a limit of its own takes it. Claimers configured alike do
        this once, when the setting changed. False (nothing set; this claim ranks the whole
        backlog instead) when the lines could not be locked within ADOPT_LOCK_TIMEOUT_MS, or
        when this queue set its default less than ADOPT_INTERVAL_SECONDS ago (another claimer
        with another default set its own since).

        `queue_heads` is locked against writes meanwhile (claims and finishes wait, reads do
        not), so no line is created or moved against the old default after it is read."""
        limit = self.max_running_per_tenant
        now = time.monotonic()
        if now < self._next_adoption:
            if now >= self._next_disagreement_warning:
                self._next_disagreement_warning = now + ADOPT_INTERVAL_SECONDS
                log.warning(
                    "claimers disagree on the default running limit (this one: %d): the queue "
                    "lines were flagged against another since this queue set its own, so its "
                    "claims rank the whole backlog for now; give every claimer one "
                    "max_running_jobs_per_tenant",
                    limit,
                )
            return False
        self._next_adoption = now + ADOPT_INTERVAL_SECONDS
        try:
            with self.engine.begin() as conn:
                conn.execute(text(f"SET LOCAL lock_timeout = '{ADOPT_LOCK_TIMEOUT_MS}ms'"))
                conn.execute(text("LOCK TABLE queue_heads IN SHARE ROW EXCLUSIVE MODE"))
                conn.execute(_ADOPT_SETTINGS, {"limit": limit})
                conn.execute(_ADOPT_LINES, {"limit": limit})
        except sqlalchemy.exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            log.warning("queue lines busy: default running limit %d not set", limit)
            self._next_adoption = time.monotonic()  # the next claim tries again
            return False
        log.info("queue lines flagged against the default running limit %d", limit)
        return True

    def _claim_on_driver(self, statement: TextClause, params: dict[str, Any]) -> Any:
        """Run the common claim on the pooled connection's driver, in autocommit.

        One statement is its own transaction: no BEGIN and COMMIT round trips around it. It
        goes to psycopg directly, prepared once per connection, its row a named tuple:
        SQLAlchemy's result layer (a row's metadata built again per execution, 36 columns)
        cost more client CPU than the claim's own work on the server (benchmarks/queue.py
        `--scale`, docs/architecture.md). Driver errors leave as SQLAlchemy's, as every other
        statement's do, and a lost connection is dropped from the pool.
        """
        return self._run_on_driver(_driver_sql(statement, self.engine.dialect), params)

    def _run_on_driver(self, sql: str, params: dict[str, Any]) -> Any:
        """One statement's text (psycopg's placeholders) run as `_claim_on_driver` runs it."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            try:
                with driver.cursor(row_factory=namedtuple_row) as cursor:
                    cursor.execute(sql, params, prepare=True)
                    return cursor.fetchone()
            except psycopg.Error as exc:
                lost = driver.broken
                if lost:
                    conn.invalidate(exc)
                raise sqlalchemy.exc.DBAPIError.instance(
                    sql, params, exc, psycopg.Error, connection_invalidated=lost
                ) from exc

    def _claim_params(
        self, worker_id: str, prefer_base_model_id: str | None, excluded: list[str]
    ) -> dict[str, Any]:
        return _params(
            worker=worker_id,
            lease=self.lease_seconds,
            prefer=prefer_base_model_id,
            default_limit=self.max_running_per_tenant,
            excluded=excluded,
        )

    def explain_claim(
        self, *, prefer_base_model_id: str | None = None, walk: bool = False
    ) -> dict[str, Any]:
        """The plan of one claim, as `EXPLAIN (ANALYZE, BUFFERS)` measured it (JSON): the claim
        runs and is rolled back. The common claim (a line's head), or with `walk` the walk of
        the front that runs when the head cannot be shown first. What to read when a claim is
        slow."""
        statement = _claim_front(self.front_lines) if walk else _claim_head(self.front_lines)
        return self._explain(statement, self._claim_params("explain", prefer_base_model_id, []))

    def explain_reap(self) -> dict[str, Any]:
        """The plan of one reap of expired leases, measured and rolled back (see explain_claim)."""
        return self._explain(_REAP, _params(max_interruptions=self.max_interruptions))

    def _explain(self, statement: TextClause, params: dict[str, Any]) -> dict[str, Any]:
        with self.engine.connect() as conn, conn.begin() as transaction:
            plan = conn.execute(
                text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement.text), params
            ).scalar_one()
            transaction.rollback()
        return dict(plan[0])

    def heartbeat(
        self,
        job_id: str,
        worker_id: str,
        *,
        progress: float | None = None,
        eta_seconds: float | None = None,
        trained_tokens: int | None = None,
    ) -> Heartbeat:
        """Renew the lease (and report progress, ETA and tokens trained so far). `held=False`
        means the lease was lost: stop work on this job."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease), "
                    "progress = coalesce(:progress, progress), eta_seconds = coalesce(:eta, eta_seconds), "
                    "trained_tokens = coalesce(:tokens, trained_tokens) "
                    "WHERE id = :id AND lease_owner = :worker AND status = ANY(:active) "
                    "RETURNING cancel_requested, pause_requested"
                ),
                _params(
                    id=job_id,
                    worker=worker_id,
                    lease=self.lease_seconds,
                    progress=progress,
                    eta=eta_seconds,
                    tokens=trained_tokens,
                ),
            ).one_or_none()
        if row is None:
            return Heartbeat(held=False, cancel_requested=False)
        return Heartbeat(
            held=True,
            cancel_requested=bool(row.cancel_requested),
            pause_requested=bool(row.pause_requested),
        )

    # -- leaving the queue ----------------------------------------------------------------

    def complete(
        self,
        job_id: str,
        worker_id: str,
        *,
        fine_tuned_model: str | None = None,
        trained_tokens: int | None = None,
        in_transaction: Callable[[Connection], Any] | None = None,
    ) -> JobRecord | None:
        """`running → succeeded`; `in_transaction` commits with it (e.g. the adapter version).

        A job whose cancellation was requested, even while it was being published, ends
        `cancelled` instead (`cancelling → cancelled`), without `in_transaction`: a cancel
        answered `cancelling` never ends in a success. The row lock orders this against
        `request_cancel`: a cancel after this commit finds the job finished (409).

        Returns None, and commits nothing, when the worker no longer holds the lease.
        """
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    "UPDATE jobs SET finished_at = now(), lease_owner = NULL, "
                    "lease_expires_at = NULL, pause_requested = false, "
                    "status = CASE WHEN cancel_requested THEN :cancelled ELSE :succeeded END, "
                    "progress = CASE WHEN cancel_requested THEN progress ELSE 1.0 END, "
                    "eta_seconds = CASE WHEN cancel_requested THEN eta_seconds ELSE 0 END, "
                    "fine_tuned_model = CASE WHEN cancel_requested THEN fine_tuned_model "
                    "ELSE coalesce(:model, fine_tuned_model) END, "
                    "trained_tokens = coalesce(:tokens, trained_tokens) "
                    "WHERE id = :id AND lease_owner = :worker AND status = ANY(:active) "
                    "RETURNING *"
                ),
                _params(id=job_id, worker=worker_id, model=fine_tuned_model, tokens=trained_tokens),
            ).one_or_none()
            if row is None:
                return None
            if row.status == JobStatus.CANCELLED:
                add_event(conn, job_id, "Job cancelled", data={"status": JobStatus.CANCELLED})
                return JobRecord.from_row(row)
            if in_transaction is not None:
                in_transaction(conn)
            add_event(
                conn,
                job_id,
                "The job has successfully completed",
                data={"status": JobStatus.SUCCEEDED},
            )
        return JobRecord.from_row(row)

    def fail(
        self,
        job_id: str,
        worker_id: str,
        *,
        code: str,
        message: str,
        retryable: bool = True,
    ) -> JobRecord | None:
        """Give the job back: requeued with backoff while attempts remain, else `failed`.

        A job whose cancellation was requested ends `cancelled` instead. Returns None when the
        worker no longer holds the lease.
        """
        with self.engine.begin() as conn:
            row = conn.execute(
                _FAIL,
                _params(
                    id=job_id,
                    worker=worker_id,
                    code=code,
                    message=message,
                    retryable=retryable,
                    backoff=self.retry_backoff_seconds,
                ),
            ).one_or_none()
            if row is None:
                return None
            self._record_release(conn, row, reason=message)
        return JobRecord.from_row(row)

    def hand_back(self, job_id: str, worker_id: str, *, reason: str) -> JobRecord | None:
        """The worker stopped the job at a checkpoint (it is shutting down, or the job was
        asked to pause): queued again at once, or `paused` when a pause was asked for, without
        using up an attempt (it resumes from its newest checkpoint). A job whose cancellation
        was requested ends `cancelled`. Returns None when the worker no longer holds the lease."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    f"""
                    UPDATE jobs SET
                      status = CASE WHEN cancel_requested THEN :cancelled
                                    ELSE {_REQUEUED} END,
                      pause_requested = false,
                      finished_at = CASE WHEN cancel_requested THEN now() END,
                      attempt = CASE WHEN cancel_requested THEN attempt
                                     ELSE greatest(attempt - 1, 0) END,
                      run_after = now(), lease_owner = NULL, lease_expires_at = NULL
                    WHERE id = :id AND lease_owner = :worker AND status = ANY(:active)
                    RETURNING *
                    """
                ),
                _params(id=job_id, worker=worker_id),
            ).one_or_none()
            if row is None:
                return None
            if row.status == JobStatus.QUEUED:
                add_event(
                    conn,
                    job_id,
                    f"Handed back to the queue ({reason}); it resumes from its newest checkpoint",
                    level="warn",
                    data={"status": JobStatus.QUEUED, "handed_back_by": worker_id},
                )
                _notify_queued(conn, row.base_model_id)
            elif row.status == JobStatus.PAUSED:
                _paused_event(conn, job_id, f"Job paused ({reason})")
            else:
                add_event(conn, job_id, "Job cancelled", data={"status": row.status})
        return JobRecord.from_row(row)

    def finish_cancelled(self, job_id: str, worker_id: str) -> JobRecord | None:
        """The worker stopped a job whose cancellation was requested."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    "UPDATE jobs SET status = :cancelled, finished_at = now(), lease_owner = NULL, "
                    "lease_expires_at = NULL WHERE id = :id AND lease_owner = :worker "
                    "AND status = ANY(:active) RETURNING *"
                ),
                _params(id=job_id, worker=worker_id),
            ).one_or_none()
            if row is None:
                return None
            add_event(conn, job_id, "Job cancelled", data={"status": JobStatus.CANCELLED})
        return JobRecord.from_row(row)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel at once when not started; ask the worker (NOTIFY + heartbeat) when running."""
        with self.engine.begin() as conn:
            row = self._move(
                conn,
                """
                UPDATE jobs SET
                  status = CASE WHEN status = ANY(:waiting) THEN :cancelled ELSE :cancelling END,
                  finished_at = CASE WHEN status = ANY(:waiting) THEN now() END,
                  cancel_requested = true
                WHERE id = :id AND status = ANY(:unfinished)
                """,
                job_id,
                JobStatus.CANCELLED,
            )
            if row.previous_status != row.status:
                cancelled = row.status == JobStatus.CANCELLED
                message = "Job cancelled" if cancelled else "Cancellation requested"
                add_event(conn, job_id, message, data={"status": row.status})
            if row.status == JobStatus.CANCELLING:
                conn.execute(
                    text("SELECT pg_notify(:ch, :id)"), {"ch": CANCEL_CHANNEL, "id": job_id}
                )
        return JobRecord.from_row(row)

    def request_pause(self, job_id: str) -> JobRecord:
        """Pause a queued job at once; ask a running one's worker to (its heartbeat learns it):
        it checkpoints the job and hands it back, which leaves it `paused` (`hand_back`). Pausing a paused job, or one
        already asked to, changes nothing. Anything else (validating, cancelling, over) raises
        JobStateError."""
        with self.engine.begin() as conn:
            row = self._move(
                conn,
                """
                UPDATE jobs SET
                  status = CASE WHEN status = :queued THEN :paused ELSE status END,
                  pause_requested = (status = :running)
                WHERE id = :id AND (status IN (:queued, :paused)
                                    OR status = :running AND NOT cancel_requested)
                """,
                job_id,
                JobStatus.PAUSED,
            )
            if (row.previous_status, row.previous_pause) != (row.status, row.pause_requested):
                if row.status == JobStatus.PAUSED:
                    _paused_event(conn, job_id, "Job paused")
                else:
                    add_event(
                        conn,
                        job_id,
                        "Pause requested: the job stops at its next step, with a checkpoint",
                        data={"pause_requested": True},
                    )
        return JobRecord.from_row(row)

    def resume(self, job_id: str) -> JobRecord:
        """Queue a paused job again (it goes on from its newest checkpoint, its attempt not
        used); a running job asked to pause is asked no more. A queued or running job is left
        as it is; anything else raises JobStateError."""
        with self.engine.begin() as conn:
            row = self._move(
                conn,
                """
                UPDATE jobs SET
                  status = CASE WHEN status = :paused THEN :queued ELSE status END,
                  run_after = CASE WHEN status = :paused THEN now() ELSE run_after END,
                  pause_requested = false
                WHERE id = :id AND status IN (:paused, :queued, :running)
                """,
                job_id,
                "resumed",
            )
            if row.previous_status == JobStatus.PAUSED:
                add_event(conn, job_id, "Job resumed", data={"status": JobStatus.QUEUED})
                _notify_queued(conn, row.base_model_id)
            elif row.previous_pause:
                add_event(conn, job_id, "Pause withdrawn", data={"pause_requested": False})
        return JobRecord.from_row(row)

    def set_priority(self, job_id: str, priority: int) -> JobRecord:
        """Give an unfinished job a new priority. A queued job takes its new place in the
        claim's order at once (the queue's triggers move its line's head in this statement); a
        validating, paused or running job keeps it for when it is queued (validated, resumed,
        retried, handed back). The event says what it was. The same priority changes nothing;
        a job cancelling or over raises JobStateError.

        The job's row is locked first and its line's row after it (by the trigger, at the
        statement's end), the order every move of a job takes, so this never deadlocks with a
        claim, a finish or a sweep."""
        with self.engine.begin() as conn:
            was = conn.execute(
                text("SELECT * FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id}
            ).one_or_none()
            if was is None or was.status not in _STATUSES["prioritizable"]:
                raise JobStateError(job_id, was.status if was else "missing", "reprioritized")
            if was.priority == priority:
                return JobRecord.from_row(was)
            row = conn.execute(
                text("UPDATE jobs SET priority = :priority WHERE id = :id RETURNING *"),
                {"id": job_id, "priority": priority},
            ).one()
            add_event(
                conn,
                job_id,
                f"Priority changed from {was.priority} to {priority}",
                data={"priority": priority, "previous_priority": was.priority},
            )
        return JobRecord.from_row(row)

    def reap_if_due(self) -> list[JobRecord]:
        """`reap_expired_leases` when no one has reaped for `reap_interval_seconds`, else
        nothing (an empty list): what a trainer runs before it claims.

        A reap reads every running job's lease; a trainer claims at each poll, each wake-up and
        each job's end. So trainers reap about once an interval between them, whoever comes
        first, and the others read one row (`queue_reaps`)."""
        with self.engine.connect() as conn:
            due = (
                conn.execution_options(isolation_level="AUTOCOMMIT")
                .execute(_REAP_DUE, {"interval": self.reap_interval_seconds})
                .scalar()
            )
        return self.reap_expired_leases() if due else []

    def reap_expired_leases(self) -> list[JobRecord]:
        """Return jobs whose lease expired to the queue (attempts left) or fail/cancel them."""
        with self.engine.begin() as conn:
            conn.execute(_LOCK_REAPED_TENANTS, _params())
            rows = conn.execute(_REAP, _params(max_interruptions=self.max_interruptions)).all()
            for row in rows:
                self._record_release(
                    conn, row, reason=row.error_message or "lease expired", attempt_used=False
                )
            # Sleepers of trainers gone without leaving (`control_plane.wakeups`): no longer
            # woken once stale, deleted here.
            conn.execute(text("DELETE FROM queue_sleepers WHERE stale_after < now()"))
        return [JobRecord.from_row(row) for row in rows]

    def _record_release(
        self, conn: Connection, row: Any, *, reason: str, attempt_used: bool = True
    ) -> None:
        if row.status == JobStatus.PAUSED:
            number, ended = (row.attempt, "ended") if attempt_used else (row.attempt + 1, "stopped")
            _paused_event(conn, row.id, f"Attempt {number} {ended} ({reason}); job paused")
        elif row.status == JobStatus.QUEUED and not attempt_used:
            add_event(
                conn,
                row.id,
                f"Attempt {row.attempt + 1} of {row.max_attempts} interrupted ({reason}); job "
                f"requeued, the attempt not counted (interruption {row.interruptions} of "
                f"{self.max_interruptions})",
                level="warn",
                data={"status": JobStatus.QUEUED, "attempt": row.attempt},
            )
            _notify_queued(conn, row.base_model_id)
        elif row.status == JobStatus.QUEUED:
            add_event(
                conn,
                row.id,
                f"Attempt {row.attempt} of {row.max_attempts} ended ({reason}); job requeued",
                level="warn",
                data={"status": JobStatus.QUEUED, "attempt": row.attempt},
            )
            _notify_queued(conn, row.base_model_id, row.run_after)
        elif row.status == JobStatus.FAILED:
            add_event(
                conn,
                row.id,
                f"Job failed: {reason}",
                level="error",
                data={"status": JobStatus.FAILED, "code": row.error_code},
            )
        else:
            add_event(conn, row.id, "Job cancelled", data={"status": row.status})

    def _move(self, conn: Connection, update: str, job_id: str, action: str) -> Any:
        """One job's row after `update` (an UPDATE of the job `:id`), with `previous_status`
        and `previous_pause` (its pause_requested) as they were; JobStateError when `update`
        matched nothing (the job's state does not allow `action`)."""
        row = conn.execute(
            text(
                update
                + """
                RETURNING *, (SELECT status FROM jobs WHERE id = :id) AS previous_status,
                          (SELECT pause_requested FROM jobs WHERE id = :id) AS previous_pause
                """
            ),
            _params(id=job_id),
        ).one_or_none()
        if row is None:
            raise JobStateError(job_id, self._status(conn, job_id), action)
        return row

    @staticmethod
    def _status(conn: Connection, job_id: str) -> str:
        status = conn.execute(
            text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}
        ).scalar()
        return str(status) if status is not None else "missing"


# How often a lost LISTEN connection is tried again while the database stays away.
REOPEN_EVERY_S = 5.0


class QueueListener:
    """A LISTEN connection on which idle workers sleep until a job is queued or cancelled.

    A lost connection (the database restarted) is reopened at the next `wait`; while the
    database stays away, `wait` sleeps its timeout and returns nothing, so the caller's next
    claim (which retries on its own) finds what was queued meanwhile.
    """

    def __init__(
        self, database_url: str, channels: tuple[str, ...] = (JOBS_CHANNEL, CANCEL_CHANNEL)
    ) -> None:
        self._url = libpq_url(database_url)
        self._channels = channels
        self._conn: psycopg.Connection[Any] | None = None
        # After a failed reopen, no other before this (`time.monotonic()`): a caller waiting in
        # short slices (a trainer watching for its stop) tries, and logs, no more often.
        self._reopen_after = 0.0
        self._connect()

    def _connect(self) -> None:
        self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
        for channel in self._channels:
            self._conn.execute(f"LISTEN {channel}")

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """Block until at least one notification arrives or `timeout` passes; drain what came."""
        received: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        try:
            if self._conn is None or self._conn.closed:
                if time.monotonic() < self._reopen_after:
                    time.sleep(max(deadline - time.monotonic(), 0))
                    return received
                self._connect()
            assert self._conn is not None
            for notify in self._conn.notifies(
                timeout=max(deadline - time.monotonic(), 0), stop_after=1
            ):
                received.append((notify.channel, notify.payload))
            # Drain whatever else already arrived without blocking.
            for notify in self._conn.notifies(timeout=0):
                received.append((notify.channel, notify.payload))
        except psycopg.OperationalError as exc:
            log.warning("LISTEN connection lost (%s); reopening it", str(exc).strip()[:200])
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            self._reopen_after = time.monotonic() + REOPEN_EVERY_S
            time.sleep(max(deadline - time.monotonic(), 0))
        return received

    def drain(self) -> list[tuple[str, str]]:
        """What already arrived, without waiting (nothing while the connection is lost)."""
        if self._conn is None or self._conn.closed:
            return []
        try:
            return [(n.channel, n.payload) for n in self._conn.notifies(timeout=0)]
        except psycopg.OperationalError:
            self._conn.close()
            self._conn = None
            return []

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> QueueListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
