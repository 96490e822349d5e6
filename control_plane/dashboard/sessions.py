"""Dashboard sessions: a signed cookie that names an API key by its id, and CSRF tokens.

Signing in checks an API key once; the cookie then carries `{"k": key id, "n": nonce}` signed
with the platform's secret (itsdangerous, timestamped), HttpOnly and SameSite=Strict, so
neither script nor another site can read or send it, and the key itself is never stored in the
browser. Every request looks the key up again on the small auth pool: a revoked or deleted key
ends its session at the next request, and a role change applies at once. A page's connection
from the main pool is checked out only after that, as with the REST API's `ConnDep`.

Each state-changing request carries a CSRF token (a form field or the `X-CSRF-Token` header
that htmx sends), derived from the session's nonce with the secret; the sign-in form, which
has no session yet, uses a double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from control_plane.api.deps import DbSlot, ServicesDep
from control_plane.dashboard import queries
from control_plane.services import Services
from control_plane.tenants import Principal

SESSION_COOKIE = "lf_session"
SIGNIN_COOKIE = "lf_signin"
SESSION_SECONDS = 12 * 3600
STREAM_RECHECK_SECONDS = 15.0
"""A stream (one long request) looks its session's key up again this often."""
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class SignInRequired(Exception):
    """No valid session: pages redirect to the sign-in page, streams and fragments get 401."""


class CsrfRefused(Exception):
    """A state-changing request without the session's CSRF token: 403."""


@dataclass(frozen=True)
class Session:
    principal: Principal
    nonce: str
    csrf_token: str
    tenant_name: str


def _serializer(services: Services) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(services.settings.secret_key, salt="loraforge.dashboard.session")


def csrf_token_for(secret_key: str, nonce: str) -> str:
    return hmac.new(secret_key.encode(), f"csrf:{nonce}".encode(), hashlib.sha256).hexdigest()


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def start_session(response: Response, request: Request, services: Services, key_id: str) -> None:
    """Set the session cookie for a key that has just been checked."""
    value = _serializer(services).dumps({"k": key_id, "n": secrets.token_urlsafe(16)})
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/",
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/")


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def _payload(request: Request, services: Services) -> dict[str, Any] | None:
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        return None
    try:
        payload = _serializer(services).loads(raw, max_age=SESSION_SECONDS)
    except BadSignature:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("k"), str):
        return None
    return payload


def optional_session(request: Request, services: ServicesDep) -> Session | None:
    """The signed-in session, or None (no cookie, a forged or expired one, a revoked key)."""
    payload = _payload(request, services)
    if payload is None:
        return None
    with services.auth_engine.connect() as conn:
        found = queries.principal_by_key_id(conn, payload["k"])
    if found is None:
        return None
    principal, tenant_name = found
    nonce = str(payload.get("n", ""))
    return Session(
        principal=principal,
        nonce=nonce,
        csrf_token=csrf_token_for(services.settings.secret_key, nonce),
        tenant_name=tenant_name,
    )


def current_session(session: Annotated[Session | None, Depends(optional_session)]) -> Session:
    if session is None:
        raise SignInRequired()
    return session


CurrentSession = Annotated[Session, Depends(current_session)]


async def checked_session(request: Request, session: CurrentSession) -> Session:
    """The session of a state-changing request that carries its CSRF token."""
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        form = await request.form()
        field = form.get(CSRF_FIELD)
        sent = field if isinstance(field, str) else None
    if not sent or not hmac.compare_digest(sent, session.csrf_token):
        raise CsrfRefused()
    return session


CheckedSession = Annotated[Session, Depends(checked_session)]


def stream_gone(
    services: Services, session: Session, request: Request
) -> Callable[[], Awaitable[bool]]:
    """For a stream, which outlives the request that checked its session: whether its client
    went away, or its key was revoked since (looked up at most every `STREAM_RECHECK_SECONDS`
    on the auth pool)."""
    checked = time.monotonic()

    def lookup() -> bool:
        with services.auth_engine.connect() as conn:
            return queries.principal_by_key_id(conn, session.principal.key_id) is None

    async def gone() -> bool:
        nonlocal checked
        if await request.is_disconnected():
            return True
        if time.monotonic() - checked < STREAM_RECHECK_SECONDS:
            return False
        checked = time.monotonic()
        return await run_in_threadpool(lookup)

    return gone


def page_connection(services: ServicesDep, _: CurrentSession, __: DbSlot) -> Iterator[Connection]:
    """A main-pool connection for one page, checked out once the session is authenticated and
    has a place among the pool's holders (`api.deps.db_slot`)."""
    with services.engine.connect() as conn:
        yield conn


PageConn = Annotated[Connection, Depends(page_connection)]


def signin_token(request: Request) -> str:
    """The sign-in form's double-submit token: the cookie's value, or a new one."""
    return request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(24)


def set_signin_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/",
    )


def signin_token_matches(request: Request, sent: str) -> bool:
    cookie = request.cookies.get(SIGNIN_COOKIE)
    return bool(cookie and sent and hmac.compare_digest(cookie, sent))
