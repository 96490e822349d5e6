"""Where a queued job stands: what it waits for, and how many go before it.

A platform's queue holds thousands of tenants' jobs, ranked by priority, fair share and the
tenant served least recently (`control_plane.queue`); a person whose job sits `queued` wants to
know why, as Slurm's `squeue` gives a pending job's reason and Kueue's visibility API its
position. `standing` answers it for one job, exactly as the claim ranks at that moment, in the
order a trainer claims without a resident base (a resident base only breaks ties on priority,
share and served time), and at a cost that does not grow with the backlog's other tenants:

- `retry_backoff`: a retry waiting out its backoff; no claim takes it before `run_after`;
- `tenant_limit`: its tenant runs as many jobs as its limit allows; it starts when one ends;
- `own_jobs`: jobs of its own tenant go first (a higher priority, or older): the claim takes a
  tenant's jobs in that order, and this job's share is `running + own_jobs_ahead + 1`;
- `other_tenants`: it is its tenant's next job, and `tenants_ahead` other tenants' next jobs
  rank before it (a higher priority, fewer jobs running, or served longer ago);
- `trainer`: nothing ranks before it: the next claim takes it, an idle trainer's at once, else
  the first busy one's to finish (`trainers_alive`, `trainers_idle`: heard from within a lease,
  and of those holding no job; none alive, the message says that nothing will take it until
  one runs).

Its tenant's count of jobs ahead reads its own queued jobs (the partial index on them, in the
claim's order). The tenants ahead are read off the queue's lines (`queue_heads`, revision
0006): a line's stored head is its best queued job, so a line whose stored head ranks after
the job cannot have a claimable job ranking before it, and only the lines before it in the
front's order are read, each line's first claimable job probed (a stored head may back off).
The lines leave out tenants at their limit by the default the claimers last flagged them
against (revision 0013); a claimer configured with another default flags them again at its
next claim, and until then a standing may count by the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Connection, text

from control_plane.job_status import JobStatus
from control_plane.queue import JobQueue

WaitingFor = Literal["retry_backoff", "tenant_limit", "own_jobs", "other_tenants", "trainer"]

_QUEUED = f"'{JobStatus.QUEUED}'"

# The job, its tenant's running count and limit (the tenant's own, else the platform's default,
# as the claim checks it), and its tenant's claimable jobs the claim takes first.
_STANDING = text(
    f"""
    SELECT j.run_after > now() AS backing_off, j.run_after,
           (SELECT count(*) FROM trainers
             WHERE last_heartbeat_at > now() - make_interval(secs => :lease)
               AND kind = 'trainer') AS alive,
           (SELECT count(*) FROM trainers
             WHERE last_heartbeat_at > now() - make_interval(secs => :lease)
               AND kind = 'trainer' AND current_job_id IS NULL) AS idle,
           coalesce(s.running, 0) AS running,
           coalesce(t.max_running_jobs, :default_limit) AS max_running,
           (SELECT count(*) FROM jobs o
             WHERE o.tenant_id = j.tenant_id AND o.status = {_QUEUED} AND o.run_after <= now()
               AND (o.priority > j.priority
                    OR (o.priority = j.priority AND (o.created_at, o.id) < (j.created_at, j.id)))
           ) AS own_ahead
    FROM jobs j
    JOIN tenants t ON t.id = j.tenant_id
    LEFT JOIN tenant_queue_stats s ON s.tenant_id = j.tenant_id
    WHERE j.id = :id AND j.status = {_QUEUED}
    """
)

# Other tenants whose next claimable job ranks before the job, itself its tenant's next: the
# lines before it in the front's order (under their tenant's limit), each line's first claimable
# job compared on the claim's key (priority, share = running + 1, served, age, id).
_TENANTS_AHEAD = text(
    f"""
    WITH me AS (
        SELECT j.tenant_id, j.priority, j.created_at, j.id, coalesce(s.running, 0) AS running,
               coalesce(s.last_served_at, '-infinity') AS served
        FROM jobs j LEFT JOIN tenant_queue_stats s ON s.tenant_id = j.tenant_id
        WHERE j.id = :id
    )
    SELECT count(DISTINCT h.tenant_id)
    FROM me
    JOIN queue_heads h
      ON h.queued > 0 AND NOT h.saturated AND h.tenant_id <> me.tenant_id
     AND h.top_priority >= me.priority
     AND ROW(-h.top_priority, h.running, coalesce(h.last_served_at, '-infinity'),
             h.head_created_at, h.head_id)
       < ROW(-me.priority, me.running, me.served, me.created_at, me.id)
    CROSS JOIN LATERAL (
        SELECT o.priority, o.created_at, o.id FROM jobs o
        WHERE o.tenant_id = h.tenant_id AND o.base_model_id = h.base_model_id
          AND o.status = {_QUEUED} AND o.run_after <= now()
        ORDER BY o.priority DESC, o.created_at, o.id
        LIMIT 1
    ) f
    WHERE ROW(-f.priority, h.running, coalesce(h.last_served_at, '-infinity'), f.created_at, f.id)
        < ROW(-me.priority, me.running, me.served, me.created_at, me.id)
    """
)


@dataclass(frozen=True)
class Standing:
    """A queued job's place in the queue (see the module's docstring)."""

    job_id: str
    waiting_for: WaitingFor
    own_jobs_ahead: int
    tenants_ahead: int | None
    share: int
    tenant_running: int
    tenant_limit: int
    run_after: datetime | None
    trainers_alive: int
    trainers_idle: int

    @property
    def message(self) -> str:
        """What it waits for, in a sentence for the job's owner."""
        if self.waiting_for == "retry_backoff":
            assert self.run_after is not None
            return (
                "A retry waiting out its backoff: no trainer takes it before "
                f"{self.run_after.isoformat(timespec='seconds')}."
            )
        if self.waiting_for == "tenant_limit":
            return (
                f"Your organization runs {_jobs(self.tenant_running)} and may run "
                f"{self.tenant_limit} at a time: this one starts when one of them ends."
            )
        if self.waiting_for == "own_jobs":
            verb = "goes" if self.own_jobs_ahead == 1 else "go"
            return (
                f"{_jobs(self.own_jobs_ahead)} of your own {verb} first (a higher priority, or "
                "submitted earlier)."
            )
        if self.waiting_for == "other_tenants":
            others = (
                "1 other organization's next job goes first"
                if self.tenants_ahead == 1
                else f"{self.tenants_ahead:,} other organizations' next jobs go first"
            )
            return (
                f"It is your next job; {others} (a higher priority, fewer jobs running, or "
                "served longer ago)."
            )
        if not self.trainers_alive:
            return (
                "It is next, but no trainer is running: nothing takes it until one starts "
                "(ask the platform's operators)."
            )
        if self.trainers_idle:
            return "It is next: an idle trainer takes it now."
        if self.trainers_alive == 1:
            return "It is next: the one trainer takes it when it finishes its job."
        return (
            f"It is next: the first of {self.trainers_alive:,} busy trainers to finish its job "
            "takes it."
        )


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count:,} jobs"


def standing(conn: Connection, job_id: str, queue: JobQueue) -> Standing | None:
    """The queued job's standing, or None when it is not queued (or not there), by `queue`'s
    settings as its claim uses them: its default running limit, and its lease (a trainer heard
    from within one is alive)."""
    row = conn.execute(
        _STANDING,
        {
            "id": job_id,
            "default_limit": queue.max_running_per_tenant,
            "lease": queue.lease_seconds,
        },
    ).one_or_none()
    if row is None:
        return None
    running, limit, own_ahead = int(row.running), int(row.max_running), int(row.own_ahead)
    tenants_ahead: int | None = None
    waiting_for: WaitingFor
    if row.backing_off:
        waiting_for = "retry_backoff"
    elif running >= limit:
        waiting_for = "tenant_limit"
    elif own_ahead:
        waiting_for = "own_jobs"
    else:
        tenants_ahead = int(conn.execute(_TENANTS_AHEAD, {"id": job_id}).scalar_one())
        waiting_for = "other_tenants" if tenants_ahead else "trainer"
    return Standing(
        job_id=job_id,
        waiting_for=waiting_for,
        own_jobs_ahead=own_ahead,
        tenants_ahead=tenants_ahead,
        share=running + own_ahead + 1,
        tenant_running=running,
        tenant_limit=limit,
        run_after=row.run_after if row.backing_off else None,
        trainers_alive=int(row.alive),
        trainers_idle=int(row.idle),
    )
