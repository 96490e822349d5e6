"""A tenant's interactive sessions as the SDK makes, keeps and ends them, and finds them again.

`create_session` keeps what the SDK sends (tags, `user_metadata`, its version, the session's
`display_name`), `heartbeat` that its process lives, `finish_session` how its client closed it
(success, errored or interrupted; the first finish is kept) and unloads its models.

`search` is the SDK's `RestClient.search_sessions`: a tenant's sessions newest first, a page of
at most 200, matched by id, by words of the display name (each word a case-insensitive
substring; with an id, a session matching either matches), by `user_metadata` pairs (every one
must hold) and by status, and paged by a keyset cursor on (created_at, id) along
`ix_interactive_sessions_tenant_created`. A session's status: `client_finished` once its client
said so (with the reason); `active` while its SDK heartbeats within the platform's session
timeout; otherwise none (it went silent, and its models were let go). loraforge neither cancels
nor fails a session (a failed call fails alone), so those statuses match nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    tuple_,
    update,
)

from control_plane.ids import new_id
from control_plane.interactive import NotFound, _session, models, sessions, unload
from control_plane.interactive import checkpoints as saved
from control_plane.pagination import trim

FinishReason = Literal["success", "errored", "interrupted"]
FINISH_REASONS: tuple[FinishReason, ...] = ("success", "errored", "interrupted")
MAX_PAGE = 200


def create_session(
    conn: Connection,
    tenant_id: str,
    *,
    tags: list[str],
    user_metadata: dict[str, Any],
    sdk_version: str | None,
    display_name: str | None = None,
) -> str:
    """A new session of the tenant: its id."""
    session_id = new_id("interactive_session")
    values = {"tags": tags, "user_metadata": user_metadata, "sdk_version": sdk_version}
    values["display_name"] = display_name
    conn.execute(insert(sessions).values(id=session_id, tenant_id=tenant_id, **values))
    return session_id


def heartbeat(conn: Connection, tenant_id: str, session_id: str) -> None:
    """The SDK's session is alive: NotFound for a session not the tenant's."""
    beat = conn.execute(
        update(sessions)
        .where(sessions.c.id == session_id, sessions.c.tenant_id == tenant_id)
        .values(last_heartbeat_at=func.now())
    )
    if not beat.rowcount:
        raise NotFound("session", session_id)


def finish_session(
    conn: Connection,
    tenant_id: str,
    session_id: str,
    reason: FinishReason | None,
    detail: str | None,
) -> list[str]:
    """The SDK closed its session (`reason`; the first finish is kept): unload each of its
    models still loaded (their futures)."""
    _session(conn, tenant_id, session_id)
    conn.execute(
        update(sessions)
        .where(sessions.c.id == session_id, sessions.c.finished_at.is_(None))
        .values(finished_at=func.now(), finish_reason=reason, finish_detail=detail)
    )
    loaded = conn.execute(
        select(models.c.id).where(models.c.session_id == session_id, models.c.unloaded_at.is_(None))
    ).scalars()
    return [unload(conn, tenant_id, model_id) for model_id in list(loaded)]


@dataclass(frozen=True)
class StatusQuery:
    """One status a search matches: `active`, `client_finished` (of `reasons`, or any),
    `cancelled` or `failed`."""

    type: Literal["active", "client_finished", "cancelled", "failed"]
    reasons: tuple[FinishReason, ...] | None = None


@dataclass(frozen=True)
class SessionFound:
    id: str
    tenant_id: str
    created_at: datetime
    display_name: str | None
    user_metadata: dict[str, Any]
    finished_at: datetime | None
    finish_reason: str | None
    finish_detail: str | None
    active: bool
    checkpoints: int
    checkpoint_bytes: int


@dataclass(frozen=True)
class Page:
    sessions: list[SessionFound]
    # (created_at, id) of the page's last session when more follow; None on the last page.
    next_cursor: tuple[datetime, str] | None


def _like(word: str) -> str:
    """A LIKE pattern matching `word` anywhere, its own `%`, `_` and `\\` taken literally."""
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def search(
    conn: Connection,
    tenant_id: str,
    *,
    timeout_seconds: float,
    session_id: str | None = None,
    display_name: str | None = None,
    user_metadata: dict[str, str] | None = None,
    statuses: list[StatusQuery] | None = None,
    limit: int = 50,
    cursor: tuple[datetime, str] | None = None,
) -> Page:
    """A page of the tenant's sessions, newest first, matching every filter given."""
    s = sessions.c
    alive = and_(
        s.finished_at.is_(None),
        s.last_heartbeat_at >= func.now() - timedelta(seconds=timeout_seconds),
    )
    where: list[ColumnElement[bool]] = [s.tenant_id == tenant_id]
    named: list[ColumnElement[bool]] = []
    if session_id is not None:
        named.append(s.id == session_id)
    if display_name is not None and display_name.split():
        named.append(and_(*(s.display_name.ilike(_like(w)) for w in display_name.split())))
    if named:
        where.append(or_(*named))
    if user_metadata:
        where.append(s.user_metadata.contains(user_metadata))
    if statuses is not None:
        where.append(or_(*(_status(q, alive) for q in statuses)))
    if cursor is not None:
        # One row comparison, so the index seeks to the cursor (see `control_plane.pagination`).
        where.append(tuple_(s.created_at, s.id) < tuple_(literal(cursor[0]), literal(cursor[1])))
    counts = (
        select(
            func.count().label("checkpoints"),
            func.coalesce(func.sum(saved.c.size_bytes), 0).label("checkpoint_bytes"),
        )
        .select_from(saved.join(models, models.c.id == saved.c.model_id))
        .where(models.c.session_id == s.id)
        .lateral("counts")
    )
    page = (
        select(sessions, alive.label("active"), counts.c.checkpoints, counts.c.checkpoint_bytes)
        .select_from(sessions.join(counts, true()))
        .where(*where)
        .order_by(s.created_at.desc(), s.id.desc())
        .limit(limit + 1)
    )
    rows, more = trim(conn.execute(page).all(), limit)
    found = [
        SessionFound(
            id=r.id,
            tenant_id=r.tenant_id,
            created_at=r.created_at,
            display_name=r.display_name,
            user_metadata=dict(r.user_metadata or {}),
            finished_at=r.finished_at,
            finish_reason=r.finish_reason,
            finish_detail=r.finish_detail,
            active=bool(r.active),
            checkpoints=int(r.checkpoints),
            checkpoint_bytes=int(r.checkpoint_bytes),
        )
        for r in rows
    ]
    return Page(found, (found[-1].created_at, found[-1].id) if more else None)


def _status(query: StatusQuery, alive: ColumnElement[bool]) -> ColumnElement[bool]:
    s = sessions.c
    if query.type == "active":
        return alive
    if query.type == "client_finished":
        if query.reasons:
            return and_(s.finished_at.is_not(None), s.finish_reason.in_(query.reasons))
        return s.finished_at.is_not(None)
    return false()  # loraforge neither cancels nor fails a session
