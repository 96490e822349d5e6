"""Sign in with an API key, sign out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from control_plane import tenants
from control_plane.api.deps import ServicesDep
from control_plane.dashboard.render import page
from control_plane.dashboard.sessions import (
    CheckedSession,
    end_session,
    optional_session,
    set_signin_cookie,
    signin_token,
    signin_token_matches,
    start_session,
)

router = APIRouter()


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never `//elsewhere` or `https://elsewhere`."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/jobs"


def _sign_in_page(
    request: Request, next_url: str, *, error: str | None = None, status_code: int = 200
) -> Response:
    token = signin_token(request)
    response = page(
        request,
        "sign_in.html",
        None,
        status_code=status_code,
        signin_token=token,
        next_url=next_url,
        error=error,
    )
    set_signin_cookie(response, request, token)
    return response


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/jobs", status_code=303)


@router.get("/sign-in")
def sign_in_form(request: Request, services: ServicesDep, next: str | None = None) -> Response:
    if optional_session(request, services) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _sign_in_page(request, _safe_next(next))


@router.post("/sign-in")
def sign_in(
    request: Request,
    services: ServicesDep,
    api_key: Annotated[str, Form(max_length=512)] = "",
    signin: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/jobs",
) -> Response:
    target = _safe_next(next)
    if not signin_token_matches(request, signin):
        return _sign_in_page(
            request,
            target,
            error="The sign-in form expired or was sent from another site; sign in again.",
            status_code=403,
        )
    key = api_key.strip()
    if not key:
        return _sign_in_page(request, target, error="Paste an API key.", status_code=400)
    with services.auth_engine.connect() as conn:
        principal = tenants.authenticate(conn, services.settings.secret_key, key)
    if principal is None:
        return _sign_in_page(
            request,
            target,
            error="That API key is unknown or revoked. An admin creates keys with "
            "'loraforge admin create-key'; 'loraforge up' prints the first one.",
            status_code=401,
        )
    response = RedirectResponse(target, status_code=303)
    start_session(response, request, services, principal.key_id)
    return response


@router.post("/sign-out")
def sign_out(_: CheckedSession) -> Response:
    response = RedirectResponse("/sign-in", status_code=303)
    end_session(response)
    return response
