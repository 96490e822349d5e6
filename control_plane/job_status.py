"""The one vocabulary for a job's state, and the sets the queue and the API reason with.

A job moves `validating_files → queued → running → succeeded | failed | cancelled`
(`cancelling` sits between `running` and `cancelled` while the worker winds down). A queued or
running job can be `paused` (a running one once its worker has checkpointed it), and resumed
into `queued`. Code
compares with these members, never with bare strings; SQL binds the sets as parameters
(`status = ANY(:active)` or SQLAlchemy's `in_()`) so no status list is written twice.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job stands. A `StrEnum`, so a member is its own database and JSON value."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})
"""A worker holds the job's lease: it counts against the tenant's running limit."""

TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)
"""The job is over: nothing moves it again."""

UNFINISHED: frozenset[JobStatus] = frozenset(JobStatus) - TERMINAL
"""Not over yet: waiting for validation, queued, or held by a worker."""

PAUSABLE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
"""What a pause applies to: a queued job pauses at once, a running one at its next step."""

WAITING: frozenset[JobStatus] = UNFINISHED - ACTIVE
"""Not held by a worker (not claimed yet, or paused): cancelling one of these ends it at once."""

PRIORITIZABLE: frozenset[JobStatus] = UNFINISHED - {JobStatus.CANCELLING}
"""What takes a new priority: a queued job at once (its place in the claim's order), a
validating, paused or running one for when it is queued (validated, resumed, retried, handed
back). A job winding down to `cancelled` is never queued again."""


def as_values(statuses: frozenset[JobStatus]) -> list[str]:
    """A set as a sorted list of plain strings, ready to bind as `= ANY(:param)` in SQL."""
    return sorted(str(status) for status in statuses)


def sql_params() -> dict[str, object]:
    """What every queue statement binds: each status by its name (`:queued`, `:running`, ...)
    and the sets (`status = ANY(:active)`, `:unfinished`, `:waiting`, `:prioritizable`), so SQL
    written anywhere names the vocabulary, never a string of its own."""
    return {
        **{status.name.lower(): status.value for status in JobStatus},
        "active": as_values(ACTIVE),
        "unfinished": as_values(UNFINISHED),
        "waiting": as_values(WAITING),
        "prioritizable": as_values(PRIORITIZABLE),
    }
