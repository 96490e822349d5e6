"""/v1/api_keys: a tenant's admins create, list and revoke its keys."""

from __future__ import annotations

from fastapi import APIRouter

from control_plane import tenants
from control_plane.api.deps import Admin, ConnDep, PrincipalsDep, ServicesDep
from control_plane.api.errors import not_found
from control_plane.api.schemas import ApiKeyCreate, ApiKeyPublic, Page, page_of
from control_plane.records import ApiKeyRecord

router = APIRouter(prefix="/v1/api_keys", tags=["api-keys"])


def _public(record: ApiKeyRecord, plaintext: str | None = None) -> ApiKeyPublic:
    return ApiKeyPublic(
        id=record.id,
        name=record.name,
        prefix=record.prefix,
        role=record.role,
        created_at=int(record.created_at.timestamp()),
        revoked=record.revoked_at is not None,
        key=plaintext,
    )


@router.post("", response_model=ApiKeyPublic)
def create_key(
    body: ApiKeyCreate, conn: ConnDep, caller: Admin, services: ServicesDep
) -> ApiKeyPublic:
    record, plaintext = tenants.create_api_key(
        conn, services.settings.secret_key, caller.tenant_id, role=body.role, name=body.name
    )
    conn.commit()
    return _public(record, plaintext)


@router.get("", response_model=Page[ApiKeyPublic])
def list_keys(conn: ConnDep, caller: Admin) -> Page[ApiKeyPublic]:
    return page_of([_public(k) for k in tenants.list_api_keys(conn, caller.tenant_id)])


@router.delete("/{key_id}", response_model=ApiKeyPublic)
def revoke_key(
    key_id: str, conn: ConnDep, caller: Admin, principals: PrincipalsDep
) -> ApiKeyPublic:
    if not tenants.revoke_api_key(conn, caller.tenant_id, key_id):
        raise not_found("api_key", key_id)
    conn.commit()
    principals.clear()  # this process forgets it now; other API replicas within their TTL
    record = next(k for k in tenants.list_api_keys(conn, caller.tenant_id) if k.id == key_id)
    return _public(record)
