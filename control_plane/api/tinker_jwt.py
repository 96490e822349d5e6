"""Tinker's JWT auth exchange: short-lived tokens the `tinker` SDK trades its API key for
(`POST /api/v1/auth/token`, `routes/tinker_auth.py`) and then sends instead of the key, as its
`X-API-Key` (`deps.get_principal` takes them on the Tinker API, `/api/v1`, and nowhere else:
on the REST API a short-lived token could create a lasting key or hold a stream open).

Why the SDK needs them: `RestClient.whoami()` (and `tinker auth whoami`) reads who the caller is
from a JWT's claims, and a client whose only credential is `TINKER_CREDENTIAL_CMD` can reach a
server only through the exchange. The setting `tinker_jwt_auth` turns it on (the client config's
`pjwt_auth_enabled` says so to the SDK); its lifetime is `tinker_jwt_lifetime_seconds`, and the
SDK exchanges again at half of it.

A token names the key it was exchanged for, and that key is checked on every request exactly as
the key itself is (the same `PrincipalCache`, emptied by a revocation in this process and
bounded by `auth_cache_seconds` in another): a revoked key's tokens stop when the key does, not at
their `exp`, and a token's principal is the key's (tenant, key id, role), so everything
downstream (roles, the audit log) sees the key. A token presented to the exchange gets one that
expires no later than itself: the SDK exchanges whatever credential it was given, a JWT too, and
a token never extends access past its own end.

Tokens are HS256, signed with a key derived from the platform's secret and a fixed label (never
the secret itself, which peppers the keys' hashes). Claims: `iss`, `aud`, `sub` (the key as a
URN: the SDK's `whoami` user), `org_id` (the tenant's name: its organization), `tenant_id`,
`key_id`, `role`, `email` (empty: a loraforge key belongs to a tenant, not a person), `iat`,
`exp`, `jti`. A token that is expired, badly signed, malformed or of a revoked key is refused
401 with `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750), on which the SDK exchanges
its key again and replays the request once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import jwt
from fastapi import Request
from sqlalchemy import Connection

from control_plane import tenants
from control_plane.api.errors import ApiError

ISSUER = "loraforge"
AUDIENCE = "loraforge-tinker"
ALGORITHM = "HS256"
# What the platform's secret is keyed with to sign tokens; a new label refuses every token out.
_SIGNING_LABEL = b"loraforge tinker jwt v1"
# A JWT's header is a JSON object, base64url: `{"` is `eyJ`. The SDK tells its JWTs from its
# keys (`tml-...`) the same way; a loraforge key starts with `lf-`.
JWT_PREFIX = "eyJ"
_REQUIRED = ["iss", "aud", "sub", "org_id", "tenant_id", "key_id", "iat", "exp", "jti"]
# What the REST API (outside /api/v1) answers a JWT.
TINKER_ONLY = (
    "A JWT of Tinker's auth exchange is taken by the Tinker API (/api/v1) only: send the API key "
    "itself here."
)
# What a server with the exchange off answers a JWT and the exchange itself.
TURNED_OFF = (
    "This server takes API keys, not JWTs (LORAFORGE_TINKER_JWT_AUTH is off): send the API key "
    "itself on every request."
)


class InvalidToken(Exception):
    """A token this platform did not sign, or no longer takes: what is wrong, for its holder."""


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says: the key it stands for and when it ends (Unix seconds)."""

    tenant_id: str
    key_id: str
    expires_at: int


def signing_key(secret_key: str) -> bytes:
    """The tokens' HMAC key: the platform's secret keyed with a fixed label."""
    return hmac.new(secret_key.encode(), _SIGNING_LABEL, hashlib.sha256).digest()


def is_token(credential: str) -> bool:
    return credential.startswith(JWT_PREFIX)


def mint(
    secret_key: str,
    principal: tenants.Principal,
    tenant_name: str,
    lifetime_seconds: int,
    *,
    not_after: int | None = None,
    now: int | None = None,
) -> str:
    """A token for `principal`'s key, living `lifetime_seconds` from `now` (the clock's) but
    never past `not_after` (the end of the token it was exchanged for, if it was)."""
    issued = int(time.time()) if now is None else now
    expires = issued + lifetime_seconds
    if not_after is not None:
        expires = min(expires, not_after)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"loraforge:key:{principal.key_id}",
        "org_id": tenant_name,
        "tenant_id": principal.tenant_id,
        "key_id": principal.key_id,
        "role": principal.role,
        "email": "",
        "iat": issued,
        "exp": expires,
        "jti": secrets.token_hex(16),
    }
    return jwt.encode(claims, signing_key(secret_key), algorithm=ALGORITHM)


def verify(secret_key: str, token: str) -> TokenClaims:
    """The claims of a token this platform signed, for this audience, not expired; else
    InvalidToken saying why. Whether its key still lives is `key_principal`'s to say."""
    try:
        claims = jwt.decode(
            token,
            signing_key(secret_key),
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": _REQUIRED},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("The token has expired: exchange the API key for a new one.") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"The token is invalid ({exc}): exchange the API key again.") from None
    tenant_id, key_id, expires = claims["tenant_id"], claims["key_id"], claims["exp"]
    if not (isinstance(tenant_id, str) and isinstance(key_id, str) and isinstance(expires, int)):
        raise InvalidToken("The token's claims are malformed.")
    return TokenClaims(tenant_id=tenant_id, key_id=key_id, expires_at=expires)


def key_principal(conn: Connection, claims: TokenClaims) -> tenants.Principal | None:
    """Who a verified token acts as: its key's principal while the key is live, else None."""
    return tenants.live_key_principal(conn, claims.tenant_id, claims.key_id)


def keep_on_request(request: Request, claims: TokenClaims) -> None:
    """Note on the request that it came with this token: an exchange ends no later."""
    request.state.token_expires_at = claims.expires_at


def presented_token_end(request: Request) -> int | None:
    """When the token a request came with ends, or None when it came with an API key."""
    end: int | None = getattr(request.state, "token_expires_at", None)
    return end


def refusal(message: str) -> ApiError:
    """A 401 `invalid_token` whose challenge tells the SDK to exchange again."""
    return ApiError(
        401,
        "invalid_token",
        message,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )
