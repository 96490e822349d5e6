"""/v1/tenants: the platform's operators onboard tenants, set their limits and hold their keys.

Only a platform operator (an admin of a tenant that `platform_operator_tenants` names) may call
these: a tenant's own admins manage its keys through /v1/api_keys and see nothing of other
tenants. On a cluster (`helm install`) this is how a platform is administered without a shell
in the API's pod (`loraforge admin` does the same on the database directly):

- `POST /v1/tenants` creates a tenant with its limits and its first admin key, in one
  transaction (a name taken is 409, and nothing is written);
- `GET /v1/tenants` pages through every tenant by name with its limits, the limits that apply
  (its own, else the platform's defaults) and its jobs by status, read off the queue's
  bookkeeping (no job is counted), so a page costs the same beside any backlog;
- `PATCH /v1/tenants/{name}` changes its limits (a merge patch; null: the platform's default).
  A running limit takes effect at the next claim (the lines re-flagged in the same statement);
  a limit raised wakes idle trainers for the jobs it now lets run; 0 holds its queue, the jobs
  running going on. A cap on loaded interactive training models holds the tenant's next
  creation (or resume) of one, a cap on its checkpoints' bytes its next saves;
- `/v1/tenants/{name}/api_keys`: its keys listed, a key created for it (a tenant whose admins
  lost theirs), a key revoked (a leaked one, a tenant leaving).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import Connection

from control_plane import audit, tenants
from control_plane.api.deps import ConnDep, PlatformOperator, PrincipalsDep, ServicesDep
from control_plane.api.errors import ApiError
from control_plane.api.openapi import refusals
from control_plane.api.routes.api_keys import revoke
from control_plane.api.schemas import ApiKeyCreate, ApiKeyPublic, Page, page_of
from control_plane.api.tenant_schemas import (
    TenantCreate,
    TenantCreatedPublic,
    TenantLimits,
    TenantPublic,
)
from control_plane.records import TenantRecord
from control_plane.services import Services

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


def _public(overview: tenants.TenantOverview, services: Services) -> TenantPublic:
    settings = services.settings
    return TenantPublic.of(
        overview,
        settings.max_running_jobs_per_tenant,
        settings.max_priority_per_tenant,
        settings.max_interactive_models_per_tenant,
        settings.max_checkpoint_bytes_per_tenant,
    )


def _no_tenant(name: str) -> ApiError:
    return ApiError(404, "tenant_not_found", f"No tenant named {name!r}", "name")


def _tenant(conn: Connection, name: str) -> TenantRecord:
    tenant = tenants.get_tenant_by_name(conn, name)
    if tenant is None:
        raise _no_tenant(name)
    return tenant


def _overview(conn: Connection, name: str, services: Services) -> TenantPublic:
    overview = tenants.tenant_overview(conn, name)
    if overview is None:
        raise _no_tenant(name)
    return _public(overview, services)


@router.post("", response_model=TenantCreatedPublic, responses=refusals(409))
def create_tenant(
    body: TenantCreate, conn: ConnDep, operator: PlatformOperator, services: ServicesDep
) -> TenantCreatedPublic:
    """A new tenant with its limits and its first admin key (the plaintext, shown only here)."""
    try:
        tenant = tenants.create_tenant(
            conn,
            body.name,
            max_running_jobs=body.max_running_jobs,
            max_priority=body.max_priority,
            max_interactive_models=body.max_interactive_models,
            max_checkpoint_bytes=body.max_checkpoint_bytes,
        )
    except tenants.TenantExistsError as exc:
        raise ApiError(409, "tenant_exists", f"{exc}; pick another name", "name") from None
    key, plaintext = tenants.create_api_key(
        conn, services.settings.secret_key, tenant.id, role="admin", name=body.admin_key_name
    )
    limits = body.model_dump(include=set(tenants.LIMITS))
    audit.record(conn, tenant.id, "tenant_created", operator, name=tenant.name, limits=limits)
    audit.record(conn, tenant.id, "api_key_created", operator, **audit.key_details(key))
    conn.commit()
    created = _overview(conn, tenant.name, services)
    return TenantCreatedPublic(**created.model_dump(), admin_key=ApiKeyPublic.of(key, plaintext))


@router.get("", response_model=Page[TenantPublic])
def list_tenants(
    conn: ConnDep,
    _: PlatformOperator,
    services: ServicesDep,
    after: Annotated[str | None, Query(description="the last name of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[TenantPublic]:
    """Every tenant by name, a page at a time (`last_id` is the name `after` takes)."""
    page, more = tenants.list_tenants(conn, after=after, limit=limit)
    return page_of([_public(o, services) for o in page], has_more=more, cursor=lambda t: t.name)


@router.get("/{name}", response_model=TenantPublic)
def get_tenant(
    name: str, conn: ConnDep, _: PlatformOperator, services: ServicesDep
) -> TenantPublic:
    return _overview(conn, name, services)


@router.patch("/{name}", response_model=TenantPublic)
def set_limits(
    name: str,
    body: TenantLimits,
    conn: ConnDep,
    operator: PlatformOperator,
    services: ServicesDep,
) -> TenantPublic:
    """Change the tenant's limits: a field left out stays, null returns it to the platform's
    default. A job above a lowered cap keeps its priority; a lowered running limit stops no
    running job, it holds the next claims; a lowered interactive models cap unloads no model, it
    refuses the next ones past it; a lowered checkpoint bytes cap deletes no checkpoint, it
    refuses the next saves while they fill it."""
    limits = body.model_dump(include=body.model_fields_set)
    changed = tenants.set_limits(
        conn, name, services.settings.max_running_jobs_per_tenant, **limits
    )
    if changed is None:
        raise _no_tenant(name)
    if limits:
        audit.record(conn, changed.id, "tenant_limits_changed", operator, limits=limits)
    conn.commit()
    return _overview(conn, name, services)


@router.get("/{name}/api_keys", response_model=Page[ApiKeyPublic])
def list_keys(name: str, conn: ConnDep, _: PlatformOperator) -> Page[ApiKeyPublic]:
    tenant = _tenant(conn, name)
    return page_of([ApiKeyPublic.of(k) for k in tenants.list_api_keys(conn, tenant.id)])


@router.post("/{name}/api_keys", response_model=ApiKeyPublic)
def create_key(
    name: str,
    body: ApiKeyCreate,
    conn: ConnDep,
    operator: PlatformOperator,
    services: ServicesDep,
) -> ApiKeyPublic:
    """A key for the tenant (the plaintext, shown only here): `role` admin for a tenant whose
    admins lost theirs."""
    tenant = _tenant(conn, name)
    record, plaintext = tenants.create_api_key(
        conn, services.settings.secret_key, tenant.id, role=body.role, name=body.name
    )
    audit.record(conn, tenant.id, "api_key_created", operator, **audit.key_details(record))
    conn.commit()
    return ApiKeyPublic.of(record, plaintext)


@router.delete("/{name}/api_keys/{key_id}", response_model=ApiKeyPublic)
def revoke_key(
    name: str, key_id: str, conn: ConnDep, operator: PlatformOperator, principals: PrincipalsDep
) -> ApiKeyPublic:
    return revoke(conn, _tenant(conn, name).id, key_id, principals, operator)
