"""Request dependencies as `Annotated` aliases: the services, a connection, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import Connection

from control_plane import tenants
from control_plane.api.errors import ApiError
from control_plane.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_connection(services: ServicesDep) -> Iterator[Connection]:
    """One connection per request. Routes that write call `conn.commit()` themselves, before they
    answer; anything uncommitted is rolled back when the connection closes."""
    with services.engine.connect() as conn:
        yield conn


ConnDep = Annotated[Connection, Depends(get_connection)]


def get_principal(
    services: ServicesDep, authorization: Annotated[str | None, Header()] = None
) -> tenants.Principal:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(
            401,
            "missing_api_key",
            "Send your API key as 'Authorization: Bearer <key>' "
            "(an admin creates keys with 'loraforge admin create-key').",
        )
    key = authorization[7:].strip()
    with services.engine.connect() as conn:
        principal = tenants.authenticate(conn, services.settings.secret_key, key)
    if principal is None:
        raise ApiError(401, "invalid_api_key", "The API key is unknown or revoked.")
    return principal


Caller = Annotated[tenants.Principal, Depends(get_principal)]


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
