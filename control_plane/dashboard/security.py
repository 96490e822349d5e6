"""Response headers that keep the dashboard's pages from being framed or made to run script
they did not ship: a strict Content-Security-Policy (no inline script, no inline style, nothing
from another origin), `X-Frame-Options` and `frame-ancestors`, no MIME sniffing, no referrer.

Pico's form controls draw their chevrons and ticks with `data:` SVG images, hence `img-src
data:`; uPlot sizes its canvas through the CSSOM, which a CSP does not govern.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)

HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]

# The REST API and FastAPI's interactive docs (which load their own script) keep their headers.
_NOT_PAGES = ("/v1/", "/docs", "/redoc", "/openapi.json")


class SecurityHeaders:
    """Pure ASGI (streams pass through unbuffered): adds `HEADERS` to every response of a
    dashboard path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope["path"]).startswith(_NOT_PAGES):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)
