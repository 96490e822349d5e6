"""Request dependencies as `Annotated` aliases: the services, a connection, the caller."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import sqlalchemy.exc
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection

from control_plane import tenants
from control_plane.api import tinker_jwt
from control_plane.api.errors import ApiError
from control_plane.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


class PrincipalCache:
    """Keys checked in the last `ttl` seconds, by their hash: an authenticated client's next
    requests need no database round trip (a revoked key stops working within `ttl`). Tokens of
    Tinker's JWT exchange too, whose keys are checked alike: a revocation empties this process's
    cache (`routes/api_keys.revoke`), so a key's tokens stop with it."""

    def __init__(self, secret_key: str, ttl: float, max_entries: int = 10_000) -> None:
        self.secret_key = secret_key
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, tenants.Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> tenants.Principal | None:
        digest = tenants.hash_key(self.secret_key, key)
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None or hit[0] < time.monotonic():
                self._entries.pop(digest, None)
                return None
            return hit[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def put(self, key: str, principal: tenants.Principal) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            digest = tenants.hash_key(self.secret_key, key)
            self._entries[digest] = (time.monotonic() + self.ttl, principal)


def get_principals(request: Request) -> PrincipalCache:
    cache: PrincipalCache = request.app.state.principals
    return cache


PrincipalsDep = Annotated[PrincipalCache, Depends(get_principals)]


# The OpenAPI's security scheme: every operation that takes a key says so, and clients generated
# from the schema (and the /docs page's Authorize button) send it. It refuses nothing itself
# (`auto_error=False`): a request without a bearer key gets this API's own 401.
bearer_key = HTTPBearer(
    scheme_name="apiKey",
    description="An API key of the caller's tenant, sent as `Authorization: Bearer <key>`; an "
    "admin creates keys with `loraforge admin create-key` or `POST /v1/api_keys`.",
    auto_error=False,
)


# The Tinker SDK sends its key as `X-API-Key` and refuses one that does not start with `tml-`:
# a loraforge key given to it as `tml-lf-...` is read here as the `lf-...` it wraps. With JWT auth
# on, it sends there the token it exchanged its key for (`eyJ...`, `tinker_jwt`), unprefixed.
TINKER_KEY_HEADER = "x-api-key"
TINKER_KEY_PREFIX = "tml-"
TINKER_API_PREFIX = "/api/v1/"  # the Tinker-compatible API, where its JWTs are taken


def _sent_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is not None:
        return credentials.credentials.strip()
    tinker_key = request.headers.get(TINKER_KEY_HEADER, "").strip()
    return tinker_key.removeprefix(TINKER_KEY_PREFIX) or None


def get_principal(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_key)],
) -> tenants.Principal:
    key = _sent_key(request, credentials)
    if key is None:
        raise ApiError(
            401,
            "missing_api_key",
            "Send your API key as 'Authorization: Bearer <key>' (the Tinker SDK: api_key="
            "'tml-' + <key>) (an admin creates keys with 'loraforge admin create-key').",
        )
    if tinker_jwt.is_token(key):
        if not request.url.path.startswith(TINKER_API_PREFIX):
            # A token stands in for its key where the SDK sends it, and nowhere else: on the
            # REST API a 15-minute token could make a permanent key, or hold a stream open.
            raise ApiError(401, "invalid_api_key", tinker_jwt.TINKER_ONLY)
        return _token_principal(request, services, key)
    cache = get_principals(request)
    principal = cache.get(key)
    if principal is None:
        # The auth pool, not the request's: a flood of bad keys waits here, not in front of the
        # connections that authenticated requests use.
        with services.auth_engine.connect() as conn:
            principal = tenants.authenticate(conn, services.settings.secret_key, key)
        if principal is not None:
            cache.put(key, principal)
    if principal is None:
        raise ApiError(401, "invalid_api_key", "The API key is unknown or revoked.")
    return principal


def _token_principal(request: Request, services: Services, token: str) -> tenants.Principal:
    """The principal of a token from Tinker's JWT exchange (`tinker_jwt`): its key's, checked
    as the key itself is (the same cache, so a revocation stops it as it stops the key). A
    token this server no longer takes is a 401 that tells the SDK to exchange again. The
    token's end is kept on the request: a token exchanged for another ends no later."""
    settings = services.settings
    if not settings.tinker_jwt_auth:
        raise ApiError(401, "invalid_api_key", tinker_jwt.TURNED_OFF)
    try:
        claims = tinker_jwt.verify(settings.secret_key, token)
    except tinker_jwt.InvalidToken as exc:
        raise tinker_jwt.refusal(str(exc)) from None
    cache = get_principals(request)
    # Verified first, on every request, so the entry is the key's, not the token's: a caller
    # minting tokens in a loop adds no entry (and never floods the cache out).
    cached_as = f"jwt-key:{claims.tenant_id}:{claims.key_id}"
    principal = cache.get(cached_as)
    if principal is None:
        with services.auth_engine.connect() as conn:
            principal = tinker_jwt.key_principal(conn, claims)
        if principal is None:
            raise tinker_jwt.refusal(
                "The API key this token was exchanged for is revoked; so is the token."
            )
        cache.put(cached_as, principal)
    tinker_jwt.keep_on_request(request, claims)
    return principal


Caller = Annotated[tenants.Principal, Depends(get_principal)]


async def db_slot(request: Request, services: ServicesDep) -> AsyncIterator[None]:
    """A place among the requests that hold a connection of the main pool, awaited in the event
    loop before the request's connection is checked out in a worker thread.

    A connection is checked out in one worker thread and given back in another, after the
    route. With more requests than connections, the threads waiting for a connection could
    take every worker thread, and the routes done with theirs found none to give them back in:
    a burst of 256 list requests against 20 connections was answered 200 times 503
    (`tests/faults/test_api_faults.py`). Waiting here holds no thread, so the connections go
    round at the pool's own pace (the same burst: 256 answered 200); a request still waiting
    after `db_pool_timeout_seconds` is answered 503 `server_busy`, as a pool timeout is."""
    slots: asyncio.Semaphore = request.app.state.db_slots
    timeout = services.settings.db_pool_timeout_seconds
    try:
        await asyncio.wait_for(slots.acquire(), timeout)
    except TimeoutError:
        raise sqlalchemy.exc.TimeoutError(
            f"no connection of the main pool came free within {timeout} s"
        ) from None
    try:
        yield
    finally:
        slots.release()


DbSlot = Annotated[None, Depends(db_slot)]


def get_connection(services: ServicesDep, _: Caller, __: DbSlot) -> Iterator[Connection]:
    """One connection per request, checked out only once the caller is authenticated (a flood of
    bad keys waits on the small auth pool and never holds a connection that authenticated
    requests need) and has a place among the pool's holders (`db_slot`). Routes that write
    call `conn.commit()` themselves, before they answer; anything uncommitted is rolled back
    when the connection closes."""
    with services.engine.connect() as conn:
        yield conn


ConnDep = Annotated[Connection, Depends(get_connection)]


def require_writer(principal: Caller) -> tenants.Principal:
    if not principal.can_write():
        raise ApiError(
            403, "read_only_key", "This API key has the reader role; it cannot change anything."
        )
    return principal


def require_admin(principal: Caller) -> tenants.Principal:
    if not principal.is_admin():
        raise ApiError(403, "admin_required", "This action needs an API key with the admin role.")
    return principal


Writer = Annotated[tenants.Principal, Depends(require_writer)]
Admin = Annotated[tenants.Principal, Depends(require_admin)]


def refuse_unless_operator(
    conn: Connection, principal: tenants.Principal, services: Services, action: str
) -> None:
    """403 unless the caller is a platform operator: an admin of a tenant that the setting
    `platform_operator_tenants` names. `action` says what was refused, and why it is theirs."""
    operators = services.settings.platform_operator_tenants
    if not (
        principal.is_admin() and tenants.is_operator_tenant(conn, principal.tenant_id, operators)
    ):
        raise ApiError(
            403,
            "platform_operator_required",
            f"{action} is a platform operator's action: use an admin key of a tenant named in "
            "LORAFORGE_PLATFORM_OPERATOR_TENANTS.",
        )


def require_platform_operator(
    principal: Admin, conn: ConnDep, services: ServicesDep
) -> tenants.Principal:
    refuse_unless_operator(
        conn, principal, services, "Administering tenants (their limits and keys)"
    )
    return principal


PlatformOperator = Annotated[tenants.Principal, Depends(require_platform_operator)]


def allow_priority(
    conn: Connection, principal: tenants.Principal, priority: int, services: Services
) -> None:
    """403 when `priority` is above the highest the caller's tenant may ask for (its
    `max_priority`, else the platform's `max_priority_per_tenant`, both set by the platform's
    operator); a lower one is always allowed."""
    default = services.settings.max_priority_per_tenant
    why = tenants.priority_refusal(conn, principal.tenant_id, priority, default)
    if why is not None:
        raise ApiError(403, "priority_above_tenant_cap", why, "priority")
