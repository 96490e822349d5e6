"""/api/v1/auth: the key a request presents (`apikey/me`), for the `tinker` CLI's `tinker auth
login` (which checks the key a person pastes, then stores it as the SDK's default credential
in `~/.tinker/credentials.json`) and for revoking that key itself (`DELETE`, what `tinker auth
logout` sends for a key it minted; a person's script may send it too); and the SDK's JWT
exchange (`token`, `control_plane.api.tinker_jwt`), which `whoami` reads its answer from.

Tinker's keys are numbered; loraforge's are named `key-<24 hex digits>`, so `key_id` is that hex
number as an integer, one to one with the key's id. The organization is the key's tenant. A
loraforge key belongs to a tenant, not a person, so the user's email is empty. Any live key may
read and revoke itself, a reader's included; it can touch no other key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from control_plane import tenants
from control_plane.api import tinker_jwt
from control_plane.api.deps import Caller, ConnDep, PrincipalsDep, ServicesDep
from control_plane.api.errors import ApiError
from control_plane.api.routes.api_keys import revoke

router = APIRouter(prefix="/api/v1/auth", tags=["tinker"], include_in_schema=False)


def key_number(key_id: str) -> int:
    """The integer Tinker's clients take as a key's id: the hex digits of loraforge's."""
    return int(key_id.partition("-")[2], 16)


@router.get("/apikey/me")
def presented_key(caller: Caller, conn: ConnDep) -> dict[str, Any]:
    key = next(k for k in tenants.list_api_keys(conn, caller.tenant_id) if k.id == caller.key_id)
    tenant = tenants.get_tenant(conn, caller.tenant_id)
    assert tenant is not None, "a key's tenant outlives it (cascade)"
    return {
        "key_id": key_number(key.id),
        "name": key.name,
        "note": f"loraforge key {key.id} ({key.role}) of tenant {tenant.name}",
        "details": {"org_details": {"name": tenant.name}, "user_details": {"email": ""}},
    }


@router.delete("/apikey/me")
def revoke_presented_key(
    caller: Caller, conn: ConnDep, principals: PrincipalsDep
) -> dict[str, str]:
    revoke(conn, caller.tenant_id, caller.key_id, principals, caller)
    return {"key_id": caller.key_id, "status": "revoked"}


@router.post("/token")
def exchange_for_token(
    request: Request, caller: Caller, conn: ConnDep, services: ServicesDep
) -> dict[str, str]:
    """A JWT standing for the caller's key, what the SDK sends instead of the key while the
    client config says `pjwt_auth_enabled`. Presented a JWT (the SDK exchanges whatever it was
    given), it answers one that ends no later: a token never outlives the one it came from."""
    settings = services.settings
    if not settings.tinker_jwt_auth:
        raise ApiError(404, "jwt_auth_disabled", tinker_jwt.TURNED_OFF)
    tenant = tenants.get_tenant(conn, caller.tenant_id)
    assert tenant is not None, "a key's tenant outlives it (cascade)"
    token = tinker_jwt.mint(
        settings.secret_key,
        caller,
        tenant.name,
        settings.tinker_jwt_lifetime_seconds,
        not_after=tinker_jwt.presented_token_end(request),
    )
    return {"jwt": token}
