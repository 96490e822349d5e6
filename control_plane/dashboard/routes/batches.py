"""The Batches page: the tenant's batches (OpenAI's Batch API, `/v1/batches`), newest first,
twenty a page, each with its status, its requests answered and failed of its total, and its
output and error files to download once it has them; a writer cancels one in progress from
its row. While a batch on the page still moves (`in_progress`, `cancelling`), its table is
polled (`/batches/table`) and redrawn in place, as the job page's standing line is.

Cancelling calls `POST /v1/batches/{id}/cancel`'s own function (the same rule, the same
"cancelling a cancelled batch changes nothing"), so the page and the REST API cannot drift; as
that function's `Writer` dependency does not run when it is called from here, the role is
checked here first. A file is sent as `GET /v1/files/{id}/content` sends it (never a complete
download whose bytes fail their sha256); another tenant's batch, or a file it does not have,
is the 404 page.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Connection

from control_plane import batches
from control_plane import files as file_repo
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.downloads import file_download
from control_plane.api.errors import ApiError
from control_plane.api.routes import batches as batches_api
from control_plane.batches import BatchRecord
from control_plane.dashboard.render import PageForbidden, PageNotFound, fragment, page
from control_plane.dashboard.sessions import CheckedSession, CurrentSession, PageConn, Session
from control_plane.storage import ObjectNotFoundError

router = APIRouter()

BATCHES_PAGE = 20
ID_MAX = 64  # longer than any batch id
FILES = {"output": "output_file_id", "errors": "error_file_id"}

NOTICES = {
    "cancelling": "The batch is cancelling: the requests no executor took are withdrawn, those "
    "running are awaited, and it ends cancelled with what was answered in its output file.",
    "already-cancelled": "Nothing changed: that batch was cancelling or cancelled already.",
    "not-cancellable": "Nothing was cancelled: that batch had ended already (completed or "
    "expired); its files hold every answer.",
}
REFUSED = ("not-cancellable",)


def _table(conn: Connection, session: Session, after: str | None) -> dict[str, Any]:
    """The page of batches after `after` (the last batch of the page before), and whether the
    table is to be polled: the same context for the page and for its polled fragment."""
    try:
        found, more = batches.list_batches(
            conn, session.principal.tenant_id, after=after, limit=BATCHES_PAGE
        )
    except LookupError:  # `after` is none of the tenant's batches
        raise PageNotFound() from None
    return {
        "rows": found,
        "after": after,
        "older": f"/batches?{urlencode({'after': found[-1].id})}" if more and found else None,
        "moving": any(b.status in batches.MOVING for b in found),
        "may_cancel": session.principal.can_write(),
    }


@router.get("/batches")
def batches_page(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    after: Annotated[str | None, Query(max_length=ID_MAX)] = None,
    notice: str | None = None,
) -> Response:
    return page(
        request,
        "batches.html",
        session,
        notice=NOTICES.get(notice or ""),
        refused=notice in REFUSED,
        **_table(conn, session, after or None),
    )


@router.get("/batches/table")
def batches_table(
    session: CurrentSession,
    conn: PageConn,
    after: Annotated[str | None, Query(max_length=ID_MAX)] = None,
) -> Response:
    """The table alone, which htmx polls while a batch on it moves."""
    return fragment("_batches_table.html", session=session, **_table(conn, session, after or None))


def _batch(conn: Connection, session: Session, batch_id: str) -> BatchRecord:
    """One of the tenant's batches; another tenant's, or none, is the 404 page."""
    found = batches.get(conn, session.principal.tenant_id, batch_id)
    if found is None:
        raise PageNotFound()
    return found


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str,
    session: CheckedSession,
    conn: PageConn,
    after: Annotated[str, Form(max_length=ID_MAX)] = "",
) -> Response:
    """Cancel through `POST /v1/batches/{id}/cancel`'s function; back to the page the row was
    on, saying what it did (a batch over already is a notice, nothing changed)."""
    found = _batch(conn, session, batch_id)
    try:
        require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(f"Cancelling a batch needs a writer. {exc.message}") from None
    try:
        batches_api.cancel_batch(found.id, conn, session.principal)
    except ApiError as exc:
        if exc.status == 404:
            raise PageNotFound() from None
        notice = "not-cancellable"
    else:
        notice = "cancelling" if found.status == "in_progress" else "already-cancelled"
    query = {"notice": notice} | ({"after": after} if after else {})
    return RedirectResponse(f"/batches?{urlencode(query)}", status_code=303)


@router.get("/batches/{batch_id}/{which}")
def batch_file(
    batch_id: str, which: str, session: CurrentSession, conn: PageConn, services: ServicesDep
) -> Response:
    """The batch's output (`output`) or error (`errors`) file, saved as the JSONL file it is;
    the 404 page for another tenant's batch, or a file the batch does not have (yet)."""
    field = FILES.get(which)
    if field is None:
        raise PageNotFound()
    file_id = getattr(_batch(conn, session, batch_id), field)
    record = file_repo.get_file(conn, session.principal.tenant_id, file_id) if file_id else None
    if record is None:
        raise PageNotFound()
    try:
        attachment = {"Content-Disposition": f'attachment; filename="{record.filename}"'}
        return file_download(services.store, record, attachment)
    except ObjectNotFoundError:  # its bytes are gone from the object store
        raise PageNotFound() from None
