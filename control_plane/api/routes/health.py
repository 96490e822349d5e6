"""/healthz (the process lives) and /readyz (its dependencies answer): unauthenticated, cheap.

Kubernetes restarts a pod whose liveness fails and stops sending traffic to one whose readiness
fails; a database outage is therefore a readiness failure (503, naming what is down), never a
liveness one: restarting the API would not bring PostgreSQL back.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from control_plane import trainers
from control_plane.api.call_wakeups import CallWakeups
from control_plane.api.deps import ServicesDep
from control_plane.messages import first_line
from control_plane.storage import ObjectStoreError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency does not answer"}})
def readyz(request: Request, services: ServicesDep) -> JSONResponse:
    """`ready` when the database and the object store answer; otherwise 503 and, for each
    dependency, `ok` or why not. `trainers` says how many trainers were heard from within a
    lease: information, not a condition (with none, the API still takes jobs into the queue,
    and taking the API out of its Service would not bring a trainer back). `wakeups` says
    whether this process listens for finished Tinker calls (`listening`; `off` by setting;
    `not_listening` while its connection is away: polls are answered at their looks), also
    information only."""
    database, alive = _database(services)
    checks = {"database": database, "object_store": _object_store(services)}
    ready = all(result == "ok" for result in checks.values())
    wakeups: CallWakeups | None = request.app.state.call_wakeups
    listening = "off" if wakeups is None else "listening" if wakeups.listening else "not_listening"
    return JSONResponse(
        {
            "status": "ready" if ready else "not_ready",
            "checks": checks,
            "trainers": alive,
            "wakeups": listening,
        },
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


def _database(services: ServicesDep) -> tuple[str, dict[str, Any] | None]:
    """The database's answer and, on the same connection, the trainers heard from within a
    lease (None when the database does not answer)."""
    try:
        with services.auth_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                alive = trainers.count_alive(conn, services.settings.lease_seconds)
            except Exception as exc:
                return "ok", {"alive": None, "note": f"unknown: {first_line(exc)}"}
    except Exception as exc:
        return f"unavailable: {first_line(exc)}", None
    note = "" if alive else "no trainer alive: jobs wait in the queue until one starts"
    return "ok", {"alive": alive, "note": note}


def _object_store(services: ServicesDep) -> str:
    try:
        services.store.check()
    except (ObjectStoreError, OSError) as exc:
        return f"unavailable: {first_line(exc)}"
    return "ok"
