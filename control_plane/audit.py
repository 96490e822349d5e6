"""A tenant's audit log: who did what to its checkpoints and its keys and limits, and who read
its checkpoints (its own keys, or another tenant's once it published them). The Tinker SDK's
`AdminClient.get_audit_log(event_type, day)` reads it a UTC day at a time
(`GET /api/v1/audit`, a tenant admin's).

Each entry is written in the transaction of what it records, so an action that rolls back leaves
none and one that commits always has one. `event` is `<resource>_<action>`, as Tinker names
them: `checkpoint_read` (with its `purpose`: `sample`, `load`, `weights_info`, `chat`,
`completion` or `download`), `checkpoint_published`, `checkpoint_unpublished`,
`checkpoint_ttl_set`, `checkpoint_deleted`, `checkpoint_expired`; `api_key_created`,
`api_key_revoked`, `tenant_created`, `tenant_limits_changed` (the organization's events).
`details` says who did it (`actor`: its tenant's id and name, and the key and its role where the
key is the tenant's own; absent for the platform's own passes and its command line) and what it
was about. A read is recorded from the checkpoint the access check found (never looked up again
by path), once an hour for each key, checkpoint and purpose: a retried request, or another
tenant reading a published checkpoint in a loop, cannot flood the owner's log. A day's read
answers at most `MAX_DAY_ENTRIES`. Entries older than the platform's retention
(`LORAFORGE_AUDIT_RETENTION_DAYS`, a year by default) are deleted by a periodic task.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

if TYPE_CHECKING:
    from control_plane.records import ApiKeyRecord
    from control_plane.tenants import Principal

EventType = Literal["all", "checkpoints", "projects", "teams", "organizations"]
# The events of each kind the SDK asks for, by their names' prefixes; loraforge has no projects
# and no teams, so those kinds hold nothing.
KINDS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoint_",),
    "organizations": ("api_key_", "tenant_"),
    "projects": (),
    "teams": (),
}
# What the retention pass deletes per transaction.
EXPIRE_BATCH = 5000
# The most entries a day's read answers (oldest first): a log read by people, not a data dump.
MAX_DAY_ENTRIES = 10_000

# An entry with a `once` key is written once: the second is nothing (the key's partial unique
# index), so a key reading one checkpoint for one purpose leaves one entry an hour however often
# it reads (a retried request, or another tenant reading a published checkpoint in a loop).
# The actor is named by its tenant; by its key and role too only where the key is the log's own
# tenant's (another tenant reading a published checkpoint, or an operator changing a tenant's
# limits, is named by its tenant alone: its keys are none of the log's business).
_RECORD = text(
    "INSERT INTO audit_events (tenant_id, event, details, once) "
    "SELECT CAST(:tenant AS text), :event, :details || CASE WHEN CAST(:actor_tenant AS text) IS NULL "
    "THEN '{}'::jsonb ELSE jsonb_build_object('actor', jsonb_strip_nulls(jsonb_build_object("
    "'tenant_id', CAST(:actor_tenant AS text), 'tenant_name', "
    "(SELECT name FROM tenants WHERE id = CAST(:actor_tenant AS text)), "
    "'key_id', CASE WHEN CAST(:actor_tenant AS text) = CAST(:tenant AS text) "
    "THEN CAST(:actor_key AS text) END, "
    "'role', CASE WHEN CAST(:actor_tenant AS text) = CAST(:tenant AS text) "
    "THEN CAST(:actor_role AS text) END))) END, :once "
    "ON CONFLICT (tenant_id, once) WHERE once IS NOT NULL DO NOTHING"
).bindparams(bindparam("details", type_=JSONB))


def record(
    conn: Connection,
    tenant_id: str,
    event: str,
    actor: Principal | None,
    *,
    once: str | None = None,
    **details: Any,
) -> None:
    """One entry in `tenant_id`'s log, in the caller's transaction (not committed); none when
    an entry with the same `once` key is there already."""
    conn.execute(
        _RECORD,
        {
            "tenant": tenant_id,
            "event": event,
            "details": details,
            "once": once,
            "actor_tenant": actor.tenant_id if actor else None,
            "actor_key": actor.key_id if actor else None,
            "actor_role": actor.role if actor else None,
        },
    )


class Readable(Protocol):
    """A checkpoint as the access check that let it be read found it."""

    @property
    def tenant_id(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def path(self) -> str: ...


def checkpoint_read(conn: Connection, actor: Principal, saved: Readable, purpose: str) -> None:
    """`actor` read `saved` (for `purpose`), which the caller's access check found: an entry in
    its owner's log, the first this hour for this key, checkpoint and purpose."""
    hour = datetime.now(UTC).strftime("%Y-%m-%dT%H")
    record(
        conn,
        saved.tenant_id,
        "checkpoint_read",
        actor,
        once=f"read|{actor.key_id}|{saved.path}|{purpose}|{hour}",
        tinker_path=saved.path,
        model_id=saved.model_id,
        purpose=purpose,
    )


def key_details(record: ApiKeyRecord) -> dict[str, str]:
    """What the log says of a key: never its secret, nor its prefix."""
    return {"key_id": record.id, "name": record.name, "role": record.role}


@dataclass(frozen=True)
class Entry:
    timestamp: datetime
    event: str
    details: dict[str, Any]


def day_entries(conn: Connection, tenant_id: str, day: date, kind: EventType) -> list[Entry]:
    """The tenant's entries of `kind` in the UTC day `day`, oldest first."""
    start = datetime.combine(day, time(), UTC)
    prefixes = [p for name, ps in KINDS.items() if kind in ("all", name) for p in ps]
    if not prefixes:
        return []
    rows = conn.execute(
        text(
            "SELECT created_at, event, details FROM audit_events "
            "WHERE tenant_id = :tenant AND created_at >= :start AND created_at < :end "
            "AND event LIKE ANY(:patterns) ORDER BY created_at, id LIMIT :most"
        ),
        {
            "tenant": tenant_id,
            "start": start,
            "end": start + timedelta(days=1),
            "patterns": [p.replace("_", "\\_") + "%" for p in prefixes],
            "most": MAX_DAY_ENTRIES,
        },
    )
    return [Entry(r.created_at, r.event, dict(r.details)) for r in rows]


def forget_older_than(engine: Engine, days: float) -> int:
    """Delete the entries older than `days`, a batch a transaction; how many were deleted."""
    deleted = 0
    while True:
        with engine.begin() as conn:
            gone = conn.execute(
                text(
                    "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events "
                    "WHERE created_at < now() - :age LIMIT :batch)"
                ),
                {"age": timedelta(days=days), "batch": EXPIRE_BATCH},
            ).rowcount
        deleted += gone
        if gone < EXPIRE_BATCH:
            return deleted
