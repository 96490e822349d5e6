"""Rendering pages: one Jinja2 environment with autoescape on for every template (whatever
users named their files, adapters or jobs is text on a page, never markup), the filters the
templates share, and the not-found and sign-in redirects."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from control_plane.dashboard.sessions import CsrfRefused, Session, SignInRequired
from control_plane.sizes import exact_size, human_size

TEMPLATES = Path(__file__).parent / "templates"


class PageNotFound(Exception):
    """Missing, or another tenant's: the same page either way."""


class PageForbidden(Exception):
    """The session's role may not do this (a reader cancelling a job): 403 with the reason."""


class PageRefused(Exception):
    """A request no page can take as sent (a NUL character in it): 400 with the reason."""


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _short(value: datetime | None) -> str:
    """For tables: the month, day and time (the full date is the cell's title)."""
    return value.astimezone(UTC).strftime("%b %d %H:%M:%S") if value else "—"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _elapsed(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "—"
    return _duration(((end or datetime.now(UTC)) - start).total_seconds())


def _count(value: int | float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}"


def _hours(seconds: float) -> str:
    """Seconds as hours to two decimals, thousands separated (trainer time, on the usage page)."""
    return f"{seconds / 3600:,.2f}"


def _size(value: int | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _chance(logprob: float) -> str:
    """A token's logprob as the chance the model gave it, in percent (`83.1%`, `<0.1%`)."""
    tenths = math.floor(1000 * math.exp(logprob) + 1e-6)  # down: 89.99 % reads 89.9 %
    return "<0.1%" if tenths < 1 else f"{tenths / 10:.1f}%"


def _likeliness(logprob: float) -> str:
    """A token's band of likeliness, which its shade shows: `likely` (at least 90 %),
    `plausible` (50 %), `doubtful` (20 %), `unlikely` (less)."""
    chance = math.exp(logprob)
    for floor, band in ((0.9, "likely"), (0.5, "plausible"), (0.2, "doubtful")):
        if chance >= floor:
            return band
    return "unlikely"


def _visible(token: str) -> str:
    """A token's text with its whitespace shown (a space as ·, a line break as ↵, a tab as →,
    and ◌ for a token that adds no text: part of a character the next tokens finish)."""
    if not token:
        return "\u25cc"
    shown = token.replace(" ", "\u00b7").replace("\u00a0", "\u00b7")
    return shown.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u2192")


@cache
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=_when,
        short=_short,
        duration=_duration,
        count=_count,
        hours=_hours,
        size=_size,
        # Decimal units, as a checkpoint cap is set and counted: `storage` to read (`20 GB`),
        # `size_field` for a form's value (`20G`, read back exactly).
        storage=human_size,
        size_field=exact_size,
        urlpart=lambda s: quote(s, ""),
        chance=_chance,
        likeliness=_likeliness,
        visible=_visible,
    )
    env.globals.update(elapsed=_elapsed)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def page(
    request: Request,
    template: str,
    session: Session | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A whole page: the layout with the signed-in tenant, its role, and its CSRF token."""
    html = render(template, request=request, session=session, nav=request.url.path, **context)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


def fragment(template: str, **context: Any) -> HTMLResponse:
    """Part of a page, for htmx to swap in."""
    return HTMLResponse(render(template, **context), headers={"Cache-Control": "no-store"})


def _sign_in_redirect(request: Request) -> Response:
    accept = request.headers.get("accept", "")
    if request.headers.get("hx-request") or any(
        streamed in accept for streamed in ("text/event-stream", "application/x-ndjson")
    ):
        # htmx follows HX-Redirect, as the "Try it" box's script does; an EventSource stops.
        return Response(status_code=401, headers={"HX-Redirect": "/sign-in"})
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/sign-in?next={quote(target, '')}", status_code=303)


def install_page_errors(app: FastAPI) -> None:
    async def on_sign_in(request: Request, _: Exception) -> Response:
        return _sign_in_redirect(request)

    async def on_not_found(request: Request, _: Exception) -> Response:
        return page(request, "not_found.html", None, status_code=404)

    async def on_csrf(request: Request, _: Exception) -> Response:
        reason = (
            "This request did not carry the page's security token (CSRF). Reload the page "
            "and try again."
        )
        return page(request, "forbidden.html", None, status_code=403, reason=reason)

    async def on_forbidden(request: Request, exc: Exception) -> Response:
        return page(request, "forbidden.html", None, status_code=403, reason=str(exc))

    async def on_refused(request: Request, exc: Exception) -> Response:
        return page(request, "forbidden.html", None, status_code=400, reason=str(exc))

    app.add_exception_handler(SignInRequired, on_sign_in)
    app.add_exception_handler(PageNotFound, on_not_found)
    app.add_exception_handler(CsrfRefused, on_csrf)
    app.add_exception_handler(PageForbidden, on_forbidden)
    app.add_exception_handler(PageRefused, on_refused)
