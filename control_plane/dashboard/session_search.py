"""The Sessions list's search: what its form asks (words of a display name or a session id, a
status, `key=value` metadata pairs) read into `interactive_sessions.search`'s terms, the page it
finds drawn as the list's rows, and the cursor that pages it carried in the address.

The search is the SDK's own (`RestClient.search_sessions`' function), so the page and the SDK
find the same sessions; only its `active` is the dashboard's, heard from within
`ACTIVE_WITHIN`, so the sessions a search for active finds are those the rows mark active.
What the form sends that no search can take (a metadata word that is not a pair, an unknown
status, a cursor not written as this page writes it) is refused on a page saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from sqlalchemy import Connection

from control_plane import interactive_sessions
from control_plane.dashboard import interactive_queries as queries
from control_plane.dashboard.queries import metadata_selector
from control_plane.dashboard.render import PageRefused
from control_plane.interactive_sessions import StatusQuery

NAME_MAX = 200  # as the REST search takes a display name
METADATA_PAIRS_MAX = 16  # as the REST search takes `user_metadata`
CURSOR_ID_MAX = 64  # longer than any session id

STATUSES: dict[str, tuple[str, list[StatusQuery]]] = {
    "active": ("Active", [StatusQuery("active")]),
    "finished": ("Finished (any reason)", [StatusQuery("client_finished")]),
    "errored": ("Finished with errors", [StatusQuery("client_finished", ("errored",))]),
}
"""The status filter's choices: the value the form sends, its label, what it searches."""

Cursor = tuple[datetime, str]
"""(created_at, id) of the last session of the page before: the search's keyset."""


@dataclass(frozen=True)
class SessionFilter:
    """What the form asks, as typed (`q`, `status`, `meta`), and the metadata pairs read off
    `meta`; all empty is no filter: the list as it is without a search."""

    q: str = ""
    status: str = ""
    meta: str = ""
    metadata: dict[str, str] | None = None

    @property
    def given(self) -> bool:
        return bool(self.q or self.status or self.metadata)

    def address(self, cursor: Cursor | None = None) -> str:
        """The list's address with this filter (and `cursor`, for the page after it)."""
        params = {"q": self.q, "status": self.status, "meta": self.meta}
        if cursor is not None:
            params |= {"before_created": cursor[0].isoformat(), "before_id": cursor[1]}
        query = urlencode({k: v for k, v in params.items() if v})
        return f"/sessions?{query}" if query else "/sessions"


def read_filter(q: str, status: str, meta: str) -> SessionFilter:
    """The form's fields as a filter; PageRefused, saying why, for what no search takes."""
    q, meta = " ".join(q.split()), " ".join(meta.split())
    if len(q) > NAME_MAX:
        raise PageRefused(
            f"A search is at most {NAME_MAX} characters of a session's name or its id."
        )
    if status and status not in STATUSES:
        raise PageRefused(
            f"{status!r} is not a status to search: choose {', '.join(STATUSES)} (or any)."
        )
    metadata = metadata_selector(meta)
    if meta and metadata is None:
        raise PageRefused(
            f"{meta!r} is not metadata to search: write key=value pairs separated by spaces, "
            "such as run=lr-sweep team=nlp, each key before its '='."
        )
    if metadata is not None and len(metadata) > METADATA_PAIRS_MAX:
        raise PageRefused(f"A search holds at most {METADATA_PAIRS_MAX} key=value pairs.")
    return SessionFilter(q, status, meta, metadata)


def read_cursor(before_created: str, before_id: str) -> Cursor | None:
    """The page's cursor as its Older link wrote it (both parts, or neither); PageRefused,
    saying why, for anything else."""
    if not before_created and not before_id:
        return None
    try:
        created = datetime.fromisoformat(before_created)
    except ValueError:
        created = None
    if created is None or created.tzinfo is None or not 0 < len(before_id) <= CURSOR_ID_MAX:
        raise PageRefused(
            "This page's address does not continue a search: before_created must be a "
            "session's creation time with its UTC offset and before_id its id, as the "
            "Older link writes them. Start again from the Sessions page."
        )
    return created, before_id


def search_sessions(
    conn: Connection, tenant_id: str, wanted: SessionFilter, cursor: Cursor | None, *, limit: int
) -> tuple[list[queries.SessionLine], Cursor | None]:
    """A page of the tenant's sessions matching `wanted`, newest first, after `cursor`: the
    SDK's search (`q` as both a session id and words of a display name, so a session matching
    either matches), each found session drawn as the list draws it; and the cursor of the next
    page, None on the last."""
    found = interactive_sessions.search(
        conn,
        tenant_id,
        timeout_seconds=queries.ACTIVE_WITHIN.total_seconds(),
        session_id=wanted.q or None,
        display_name=wanted.q or None,
        user_metadata=wanted.metadata,
        statuses=STATUSES[wanted.status][1] if wanted.status else None,
        limit=limit,
        cursor=cursor,
    )
    lines = queries.session_lines(conn, tenant_id, [s.id for s in found.sessions])
    return lines, found.next_cursor
