"""The webhooks page, a tenant's admins' own: the tenant's live endpoints, a form that registers
one, and each endpoint's delivery log with a failed delivery sent again from its row.

Every form and every read calls `/v1/webhooks`' own route functions (the same URL checks, the
same refusals, the same 404 for another tenant's endpoint), so the page and the REST API cannot
drift. Only an admin of the signed-in tenant sees the pages or may post to them; anyone else
gets the 403 page with the reason. A new endpoint's signing secret is shown on the page that
answers the post, never in a redirect: a secret in an address would stay in the browser's
history and in access logs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import Connection

from control_plane.api.deps import ServicesDep, require_admin
from control_plane.api.errors import ApiError, describe_validation_errors
from control_plane.api.routes import webhooks as webhooks_api
from control_plane.api.webhook_schemas import WebhookCreate, WebhookPublic
from control_plane.dashboard.render import PageForbidden, PageNotFound, page
from control_plane.dashboard.sessions import CheckedSession, CurrentSession, PageConn, Session
from control_plane.tenants import Principal
from control_plane.webhooks import EVENT_TYPES

router = APIRouter()

DELIVERIES_PAGE = 20
ID_MAX = 64  # longer than any endpoint or delivery id

LIST_NOTICES = {
    "deleted": "The endpoint was deleted: no new event goes to it and what was pending is marked "
    "failed. Its delivery log stays readable at its address.",
}
LOG_NOTICES = {
    "test-sent": "A webhook.test event is due now: it is posted within a few seconds; reload "
    "to see how the endpoint answered.",
    "retried": "The delivery is due again now: it is posted within a few seconds, its attempts "
    "counted on.",
    "not-failed": "Nothing was sent again: only a failed delivery can be retried, and that one "
    "is pending or already delivered.",
    "already-deleted": "Nothing changed: this endpoint was deleted already; a deleted endpoint "
    "takes no event and sends nothing again.",
}


def _admin(session: Session) -> Principal:
    """The session's principal, if it may manage the tenant's webhooks: else the 403 page."""
    try:
        return require_admin(session.principal)
    except ApiError as exc:
        raise PageForbidden(f"Webhooks are managed by the tenant's admins. {exc.message}") from None


def _endpoint(conn: Connection, caller: Principal, webhook_id: str) -> WebhookPublic:
    """One of the tenant's endpoints, deleted ones included; another tenant's is the 404 page."""
    try:
        return webhooks_api.get_webhook(webhook_id, conn, caller)
    except ApiError:
        raise PageNotFound() from None


def _at(timestamp: int | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp, UTC) if timestamp is not None else None


def _webhooks_page(
    request: Request,
    session: Session,
    conn: Connection,
    caller: Principal,
    *,
    status_code: int = 200,
    notice: str | None = None,
    refused: bool = False,
    new: dict[str, Any] | None = None,
) -> Response:
    listed = webhooks_api.list_webhooks(conn, caller)
    return page(
        request,
        "webhooks.html",
        session,
        status_code=status_code,
        rows=[(w, _at(w.created_at)) for w in listed.data],
        event_types=EVENT_TYPES,
        notice=notice,
        refused=refused,
        new=new or {"url": "", "description": "", "event_types": []},
    )


@router.get("/webhooks")
def webhooks_page(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    notice: str | None = None,
) -> Response:
    caller = _admin(session)
    return _webhooks_page(request, session, conn, caller, notice=LIST_NOTICES.get(notice or ""))


@router.post("/webhooks")
def create_webhook(
    request: Request,
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    url: Annotated[str, Form()] = "",
    description: Annotated[str, Form()] = "",
    event_types: Annotated[list[str] | None, Form()] = None,
) -> Response:
    """Register an endpoint through `POST /v1/webhooks`' function: the answer is a page showing
    its signing secret, once. A URL the platform will not post to, or a field the REST body
    refuses, is the webhooks page again with the REST API's message and the form as it was
    sent; nothing is created. No box ticked is every event, as the REST body's null is."""
    caller = _admin(session)
    new = {"url": url, "description": description, "event_types": event_types or []}
    try:
        body = WebhookCreate.model_validate(
            {"url": url.strip(), "description": description.strip(), "event_types": event_types}
        )
        created = webhooks_api.create_webhook(body, conn, caller, services)
    except ValidationError as exc:
        message, _ = describe_validation_errors(list(exc.errors()))
        return _refused(request, session, conn, caller, message, new, 400)
    except ApiError as exc:  # a URL the platform will not post to, or one endpoint too many
        return _refused(request, session, conn, caller, exc.message, new, exc.status)
    return page(request, "webhook_created.html", session, webhook=created)


def _refused(
    request: Request,
    session: Session,
    conn: Connection,
    caller: Principal,
    message: str,
    new: dict[str, Any],
    status_code: int,
) -> Response:
    return _webhooks_page(
        request,
        session,
        conn,
        caller,
        status_code=status_code,
        notice=f"No endpoint was registered: {message}",
        refused=True,
        new=new,
    )


@router.get("/webhooks/{webhook_id}")
def webhook_page(
    webhook_id: str,
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    after: Annotated[str | None, Query(max_length=ID_MAX)] = None,
    notice: str | None = None,
) -> Response:
    """The endpoint's delivery log, newest first, `DELIVERIES_PAGE` a page (`after`: the last
    delivery of the page before); a deleted endpoint's log is read-only."""
    caller = _admin(session)
    endpoint = _endpoint(conn, caller, webhook_id)
    try:
        log = webhooks_api.list_deliveries(
            endpoint.id, conn, caller, after or None, DELIVERIES_PAGE
        )
    except ApiError:  # `after` is no delivery of this endpoint's
        raise PageNotFound() from None
    return page(
        request,
        "webhook.html",
        session,
        webhook=endpoint,
        created=_at(endpoint.created_at),
        rows=[(d, _at(d.created_at), _at(d.next_attempt_at)) for d in log.data],
        more=log.has_more,
        after=after or None,
        next_after=log.last_id,
        notice=LOG_NOTICES.get(notice or ""),
        refused=notice in ("not-failed", "already-deleted"),
    )


@router.post("/webhooks/{webhook_id}/test")
def test_webhook(webhook_id: str, session: CheckedSession, conn: PageConn) -> Response:
    """A `webhook.test` event for the endpoint through `POST /v1/webhooks/{id}/test`'s
    function; to its log, where the new delivery shows pending until it is posted."""
    caller = _admin(session)
    endpoint = _endpoint(conn, caller, webhook_id)
    try:
        webhooks_api.test_webhook(endpoint.id, conn, caller)
    except ApiError:  # deleted since the page was drawn
        return _back_to_log(endpoint.id, "already-deleted")
    return _back_to_log(endpoint.id, "test-sent")


@router.post("/webhooks/{webhook_id}/delete")
def delete_webhook(webhook_id: str, session: CheckedSession, conn: PageConn) -> Response:
    """Delete the endpoint through `DELETE /v1/webhooks/{id}`'s function; back to the list,
    where it is gone."""
    caller = _admin(session)
    endpoint = _endpoint(conn, caller, webhook_id)
    try:
        webhooks_api.delete_webhook(endpoint.id, conn, caller)
    except ApiError:  # deleted already (another tab, the REST API)
        return _back_to_log(endpoint.id, "already-deleted")
    return RedirectResponse("/webhooks?notice=deleted", status_code=303)


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/retry")
def retry_delivery(
    webhook_id: str,
    delivery_id: str,
    session: CheckedSession,
    conn: PageConn,
    after: Annotated[str, Form(max_length=ID_MAX)] = "",
) -> Response:
    """Send a failed delivery again through `POST .../deliveries/{id}/retry`'s function; back
    to the log page the row was on, saying what it did."""
    caller = _admin(session)
    endpoint = _endpoint(conn, caller, webhook_id)
    try:
        webhooks_api.retry_delivery(endpoint.id, delivery_id, conn, caller)
    except ApiError as exc:
        if exc.status == 404:  # no delivery of this endpoint's
            raise PageNotFound() from None
        refusal = "already-deleted" if exc.code == "webhook_deleted" else "not-failed"
        return _back_to_log(endpoint.id, refusal, after)
    return _back_to_log(endpoint.id, "retried", after)


def _back_to_log(webhook_id: str, notice: str, after: str = "") -> Response:
    query = {"notice": notice} | ({"after": after} if after else {})
    return RedirectResponse(f"/webhooks/{webhook_id}?{urlencode(query)}", status_code=303)
