"""The Postgres job queue: every state transition of a job, and nothing else.

Jobs are the queue. A claim is one statement (`FOR UPDATE SKIP LOCKED` + `UPDATE ... RETURNING`)
ordered by priority, then fair share between tenants (running + queued rank, then the tenant
served least recently), then base affinity, then age. A claimed
job holds a lease that its worker renews by heartbeat; an expired lease (its trainer lost) puts
the job back without using an attempt, up to `max_interruptions`. Idle workers wait on
`LISTEN/NOTIFY` rather than polling.

Longer than the house's ~450 lines on purpose: each transition's statement stands beside the
one method that runs it, with its guard and its event; splitting them apart would separate a
statement from the promise it keeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, text

from control_plane.db import libpq_url
from control_plane.events import add_event
from control_plane.job_status import ACTIVE, UNFINISHED, WAITING, JobStatus, as_values
from control_plane.records import JobRecord

log = logging.getLogger(__name__)

JOBS_CHANNEL = "loraforge_jobs"
CANCEL_CHANNEL = "loraforge_cancel"
# A claim ranks every claimable job but locks among the best few only; more claimers than this
# claiming at the same instant could find all of them locked and see an empty queue for a moment.
CLAIM_CANDIDATES = 64


# Every statement here binds the statuses it names (`:queued`, `:running`, ...) and the sets
# (`status = ANY(:active)`), so the vocabulary lives in `control_plane.job_status` alone.
_STATUSES: dict[str, Any] = {
    **{status.name.lower(): status.value for status in JobStatus},
    "active": as_values(ACTIVE),
    "unfinished": as_values(UNFINISHED),
    "waiting": as_values(WAITING),
}

# When a retried job may run again: `retry_backoff_seconds` doubled per attempt used.
_BACKOFF_RUN_AFTER = "now() + make_interval(secs => :backoff * power(2, greatest(attempt - 1, 0)))"


def _params(**values: Any) -> dict[str, Any]:
    """A statement's parameters plus the statuses and status sets that every statement binds."""
    return {**_STATUSES, **values}


def _notify_queued(conn: Connection, base_model_id: str) -> None:
    """Wake idle workers (LISTEN on JOBS_CHANNEL): a job for this base became claimable."""
    conn.execute(
        text("SELECT pg_notify(:ch, :payload)"), {"ch": JOBS_CHANNEL, "payload": base_model_id}
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


_CLAIM = text(
    """
    WITH running AS (
        SELECT tenant_id, count(*) AS n FROM jobs
        WHERE status = ANY(:active) GROUP BY tenant_id
    ),
    eligible AS (
        SELECT j.id, j.priority, j.base_model_id, j.created_at, t.last_claimed_at,
               coalesce(r.n, 0) + row_number() OVER (
                   PARTITION BY j.tenant_id
                   ORDER BY j.priority DESC,
                            (j.base_model_id IS NOT DISTINCT FROM :prefer) DESC,
                            j.created_at, j.id
               ) AS share
        FROM jobs j
        JOIN tenants t ON t.id = j.tenant_id
        LEFT JOIN running r ON r.tenant_id = j.tenant_id
        WHERE j.status = :queued AND j.run_after <= now()
          AND coalesce(r.n, 0) < coalesce(t.max_running_jobs, :default_limit)
          AND j.tenant_id <> ALL(CAST(:excluded AS text[]))
    ),
    candidates AS MATERIALIZED (
        SELECT id, row_number() OVER (
                   ORDER BY priority DESC, share, last_claimed_at ASC NULLS FIRST,
                            (base_model_id IS NOT DISTINCT FROM :prefer) DESC, created_at, id
               ) AS position
        FROM eligible
        ORDER BY position
        LIMIT :candidates
    ),
    picked AS (
        SELECT j.id FROM candidates c JOIN jobs j ON j.id = c.id
        WHERE j.status = :queued
        ORDER BY c.position
        LIMIT 1
        FOR UPDATE OF j SKIP LOCKED
    ),
    claimed AS (
        UPDATE jobs SET status = :running,
                        attempt = jobs.attempt + 1,
                        lease_owner = :worker,
                        lease_expires_at = now() + make_interval(secs => :lease),
                        started_at = coalesce(jobs.started_at, now()),
                        error_code = NULL, error_message = NULL, error_param = NULL
        FROM picked WHERE jobs.id = picked.id
        RETURNING jobs.*
    ),
    -- The tenant row's lock serialises concurrent claims for one tenant (see claim()).
    stamped AS (
        UPDATE tenants SET last_claimed_at = clock_timestamp()
        FROM claimed WHERE tenants.id = claimed.tenant_id
        RETURNING tenants.id
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
    SELECT claimed.* FROM claimed
    WHERE EXISTS (SELECT 1 FROM stamped) AND EXISTS (SELECT 1 FROM logged)
    """
)

_FAIL = text(
    f"""
    UPDATE jobs SET
      status = CASE
        WHEN cancel_requested THEN :cancelled
        WHEN :retryable AND attempt < max_attempts THEN :queued
        ELSE :failed END,
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
    """
    UPDATE jobs SET
      status = CASE
        WHEN cancel_requested THEN :cancelled
        WHEN interruptions + 1 >= :max_interruptions THEN :failed
        ELSE :queued END,
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

_TENANT_RUNNING = text(
    """
    SELECT (SELECT count(*) FROM jobs j
            WHERE j.tenant_id = t.id AND j.status = ANY(:active)) AS running,
           coalesce(t.max_running_jobs, :default_limit) AS max_running
    FROM tenants t WHERE t.id = :tenant
    """
)


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
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.retry_backoff_seconds = retry_backoff_seconds
        self.max_running_per_tenant = max_running_per_tenant
        self.max_interruptions = max_interruptions

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
        while True:
            with self.engine.begin() as conn:
                row = conn.execute(
                    _CLAIM,
                    _params(
                        worker=worker_id,
                        lease=self.lease_seconds,
                        prefer=prefer_base_model_id,
                        default_limit=self.max_running_per_tenant,
                        excluded=excluded,
                        candidates=CLAIM_CANDIDATES,
                    ),
                ).one_or_none()
                if row is None:
                    return None
                if self._within_tenant_limit(conn, row.tenant_id):
                    return JobRecord.from_row(row)
                conn.rollback()
            excluded.append(row.tenant_id)

    def _within_tenant_limit(self, conn: Connection, tenant_id: str) -> bool:
        """Re-check the tenant's running count after the claim statement.

        The claim locked the tenant's row (stamping `last_claimed_at`), so this statement, with a
        snapshot taken after that lock, sees every claim for the tenant committed before it.
        """
        counts = conn.execute(
            _TENANT_RUNNING,
            _params(tenant=tenant_id, default_limit=self.max_running_per_tenant),
        ).one()
        return int(counts.running) <= int(counts.max_running)

    def heartbeat(
        self,
        job_id: str,
        worker_id: str,
        *,
        progress: float | None = None,
        eta_seconds: float | None = None,
    ) -> Heartbeat:
        """Renew the lease. `held=False` means the lease was lost: stop work on this job."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease), "
                    "progress = coalesce(:progress, progress), eta_seconds = coalesce(:eta, eta_seconds) "
                    "WHERE id = :id AND lease_owner = :worker AND status = ANY(:active) "
                    "RETURNING cancel_requested"
                ),
                _params(
                    id=job_id,
                    worker=worker_id,
                    lease=self.lease_seconds,
                    progress=progress,
                    eta=eta_seconds,
                ),
            ).one_or_none()
        if row is None:
            return Heartbeat(held=False, cancel_requested=False)
        return Heartbeat(held=True, cancel_requested=bool(row.cancel_requested))

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
                    "lease_expires_at = NULL, "
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
        """The worker is shutting down: the job is queued again at once, without using up an
        attempt (it resumes from its newest checkpoint). A job whose cancellation was requested
        ends `cancelled`. Returns None when the worker no longer holds the lease."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    """
                    UPDATE jobs SET
                      status = CASE WHEN cancel_requested THEN :cancelled ELSE :queued END,
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
            row = conn.execute(
                text(
                    """
                    UPDATE jobs SET
                      status = CASE WHEN status = ANY(:waiting) THEN :cancelled ELSE :cancelling END,
                      finished_at = CASE WHEN status = ANY(:waiting) THEN now() END,
                      cancel_requested = true
                    WHERE id = :id AND status = ANY(:unfinished)
                    RETURNING *, (SELECT status FROM jobs WHERE id = :id) AS previous_status
                    """
                ),
                _params(id=job_id),
            ).one_or_none()
            if row is None:
                raise JobStateError(job_id, self._status(conn, job_id), JobStatus.CANCELLED)
            if row.previous_status != row.status:
                cancelled = row.status == JobStatus.CANCELLED
                message = "Job cancelled" if cancelled else "Cancellation requested"
                add_event(conn, job_id, message, data={"status": row.status})
            if row.status == JobStatus.CANCELLING:
                conn.execute(
                    text("SELECT pg_notify(:ch, :id)"), {"ch": CANCEL_CHANNEL, "id": job_id}
                )
        return JobRecord.from_row(row)

    def reap_expired_leases(self) -> list[JobRecord]:
        """Return jobs whose lease expired to the queue (attempts left) or fail/cancel them."""
        with self.engine.begin() as conn:
            rows = conn.execute(_REAP, _params(max_interruptions=self.max_interruptions)).all()
            for row in rows:
                self._record_release(
                    conn, row, reason=row.error_message or "lease expired", attempt_used=False
                )
        return [JobRecord.from_row(row) for row in rows]

    def _record_release(
        self, conn: Connection, row: Any, *, reason: str, attempt_used: bool = True
    ) -> None:
        if row.status == JobStatus.QUEUED and not attempt_used:
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
            _notify_queued(conn, row.base_model_id)
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

    @staticmethod
    def _status(conn: Connection, job_id: str) -> str:
        status = conn.execute(
            text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}
        ).scalar()
        return str(status) if status is not None else "missing"


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
            time.sleep(max(deadline - time.monotonic(), 0))
        return received

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> QueueListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
