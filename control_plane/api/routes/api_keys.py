"""/v1/api_keys: a tenant's admins create, list and revoke its keys."""

from __future__ import annotations

from fastapi import APIRouter

from control_plane import audit, tenants
from control_plane.api.deps import Admin, ConnDep, PrincipalsDep, ServicesDep
from control_plane.api.errors import not_found
from control_plane.api.schemas import ApiKeyCreate, ApiKeyPublic, Page, page_of

router = APIRouter(prefix="/v1/api_keys", tags=["api-keys"])


@router.post("", response_model=ApiKeyPublic)
def create_key(
    body: ApiKeyCreate, conn: ConnDep, caller: Admin, services: ServicesDep
) -> ApiKeyPublic:
    record, plaintext = tenants.create_api_key(
        conn, services.settings.secret_key, caller.tenant_id, role=body.role, name=body.name
    )
    audit.record(conn, caller.tenant_id, "api_key_created", caller, **audit.key_details(record))
    conn.commit()
    return ApiKeyPublic.of(record, plaintext)


@router.get("", response_model=Page[ApiKeyPublic])
def list_keys(conn: ConnDep, caller: Admin) -> Page[ApiKeyPublic]:
    return page_of([ApiKeyPublic.of(k) for k in tenants.list_api_keys(conn, caller.tenant_id)])


@router.delete("/{key_id}", response_model=ApiKeyPublic)
def revoke_key(
    key_id: str, conn: ConnDep, caller: Admin, principals: PrincipalsDep
) -> ApiKeyPublic:
    return revoke(conn, caller.tenant_id, key_id, principals, caller)


def revoke(
    conn: ConnDep,
    tenant_id: str,
    key_id: str,
    principals: PrincipalsDep,
    actor: tenants.Principal,
) -> ApiKeyPublic:
    """Revoke one of the tenant's live keys (404 for another tenant's, an unknown one or one
    already revoked): refused from this process's next request on, by other API replicas within
    their cache's TTL; `actor`'s doing, in the tenant's audit log."""
    if not tenants.revoke_api_key(conn, tenant_id, key_id):
        raise not_found("api_key", key_id)
    record = next(k for k in tenants.list_api_keys(conn, tenant_id) if k.id == key_id)
    audit.record(conn, tenant_id, "api_key_revoked", actor, **audit.key_details(record))
    conn.commit()
    principals.clear()
    return ApiKeyPublic.of(record)
