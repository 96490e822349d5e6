"""/api/v1/audit: a tenant's audit log a UTC day at a time, as the Tinker SDK's
`AdminClient.get_audit_log(event_type, day)` reads it (`control_plane.audit`): what was done to
the tenant's checkpoints, keys and limits, and who read its checkpoints, oldest first, each with
who did it. A tenant admin's to read (Tinker asks for its admin role); loraforge has no projects
and no teams, so those kinds are empty. A day not written YYYY-MM-DD, or one to come, is a 400
that says so.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from control_plane import audit
from control_plane.api.deps import Admin, ConnDep
from control_plane.api.errors import ApiError

router = APIRouter(prefix="/api/v1", tags=["tinker"], include_in_schema=False)


class AuditLogEntry(BaseModel):
    timestamp: datetime
    event: str
    event_details: dict[str, Any]
    # Tinker's deprecated copies of a checkpoint event's details.
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


class AuditLog(BaseModel):
    entries: list[AuditLogEntry]


@router.get("/audit")
def audit_log(
    conn: ConnDep,
    caller: Admin,
    event_type: audit.EventType = "all",
    day: str | None = None,
) -> AuditLog:
    today = datetime.now(UTC).date()
    try:
        asked = today if day is None else date.fromisoformat(day)
    except ValueError:
        raise ApiError(
            400, "invalid_request", f"day {day!r} is not a date: write it YYYY-MM-DD", "day"
        ) from None
    if asked > today:
        raise ApiError(
            400, "invalid_request", f"{asked} has not begun (today is {today}, UTC)", "day"
        )
    entries = audit.day_entries(conn, caller.tenant_id, asked, event_type)
    return AuditLog(
        entries=[
            AuditLogEntry(
                timestamp=e.timestamp,
                event=e.event,
                event_details=e.details,
                model_id=e.details.get("model_id"),
                tinker_path=e.details.get("tinker_path"),
                purpose=e.details.get("purpose"),
            )
            for e in entries
        ]
    )
