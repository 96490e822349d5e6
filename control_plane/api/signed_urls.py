"""Tokens the API signs into a URL so that a client without a key fetches one thing for an hour
(an exported checkpoint's file, a session's trace): the token names what it lets be fetched and
whose it is, signed with the platform's secret under a salt of its own kind, so that a token of
one kind is not one of another. A token expired, forged or of another kind is a 403 saying to
ask for the URL again.
"""

from __future__ import annotations

from fastapi import Request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from control_plane.api.errors import ApiError
from control_plane.services import Services

URL_SECONDS = 3600


def api_base(request: Request, services: Services) -> str:
    """Where clients reach this API: the configured public URL, else the request's own."""
    return (services.settings.public_url or str(request.base_url)).rstrip("/")


def sign(services: Services, salt: str, *parts: str) -> str:
    return URLSafeTimedSerializer(services.settings.secret_key, salt=salt).dumps(list(parts))


def read(
    services: Services, salt: str, token: str, *, count: int, what: str, again: str
) -> list[str]:
    """The `count` parts `sign` put in `token`; a 403 naming `what` it is not, and how to get
    another (`again`)."""
    signer = URLSafeTimedSerializer(services.settings.secret_key, salt=salt)
    try:
        parts = signer.loads(token, max_age=URL_SECONDS)
    except SignatureExpired:
        raise ApiError(403, "url_expired", f"this {what} expired: {again}") from None
    except BadSignature:
        parts = None
    if not isinstance(parts, list) or len(parts) != count:
        raise ApiError(
            403, "invalid_signature", f"this is not a {what} the platform signed: {again}"
        )
    return [str(part) for part in parts]
