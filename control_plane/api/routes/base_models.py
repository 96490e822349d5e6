"""/v1/base_models: register (platform operators) and list the frozen bases adapters are
trained on.

A base is shared by every tenant and registering one reads a path or bucket on the server, so
only platform operators (admins of the tenants `platform_operator_tenants` names) register bases,
and only those tenants' keys see a base's server-side source and import errors; every tenant
lists the bases and trains on them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Response
from sqlalchemy import Connection, func

from control_plane import base_catalog, tenants
from control_plane.api.deps import Admin, Caller, ConnDep, ServicesDep, refuse_unless_operator
from control_plane.api.errors import ApiError, not_found
from control_plane.api.openapi import refusals
from control_plane.api.schemas import BaseModelCreate, BaseModelPublic, Page, page_of
from control_plane.base_status import BaseStatus
from control_plane.records import BaseModelRecord
from control_plane.services import Services
from control_plane.tenants import Principal

router = APIRouter(prefix="/v1/base_models", tags=["base-models"])


log = logging.getLogger(__name__)


@router.post(
    "",
    response_model=BaseModelPublic,
    responses={
        202: {"model": BaseModelPublic, "description": "The import started (`registering`)."},
        **refusals(409),
    },
)
def register_base_model(
    body: BaseModelCreate,
    conn: ConnDep,
    caller: Admin,
    services: ServicesDep,
    response: Response,
) -> BaseModelPublic:
    """Import a base (202, `registering`; a task fetches and checks it), or record a stored
    checkpoint given its sha256 (200, `ready`). A failed import, or one registering for longer
    than `base_import_timeout_seconds`, is started anew by registering the same name again."""
    refuse_unless_operator(
        conn,
        caller,
        services,
        "Registering a base model (it reads a path or bucket on the server, and the base serves "
        "every tenant)",
    )
    if body.sha256 is not None:
        record = _insert(
            conn,
            base_catalog.NewBaseModel(
                **body.model_dump(exclude={"has_chat_template", "source_kind"}),
                source_kind=str(body.source_kind),
                has_chat_template=bool(body.has_chat_template),
            ),
        )
        conn.commit()
        return BaseModelPublic.of(record, platform_operator=True)

    kind = body.source_kind or base_catalog.source_kind_of(body.source)
    existing = base_catalog.get_base_model(conn, body.name)
    timeout = timedelta(seconds=services.settings.base_import_timeout_seconds)
    if existing is not None and existing.name == body.name and _retryable(existing, timeout):
        record = base_catalog.update_base_model(
            conn,
            existing.id,
            **base_catalog.cleared_facts(),
            source=body.source,
            source_kind=kind,
            revision=body.revision,
            status=BaseStatus.REGISTERING,
            import_requested_at=func.now(),
        )
    else:
        record = _insert(
            conn,
            base_catalog.NewBaseModel(
                name=body.name,
                source=body.source,
                source_kind=kind,
                revision=body.revision,
                status=BaseStatus.REGISTERING,
            ),
        )
    conn.commit()
    try:
        services.dispatch_base_import(record.id)
    except Exception:
        log.exception("could not dispatch the import of base %s", record.id)
        reason = "the import could not be started (the task broker did not answer); register again"
        base_catalog.update_base_model(
            conn, record.id, status=BaseStatus.FAILED, error_message=reason
        )
        conn.commit()
        raise ApiError(503, "import_not_started", reason) from None
    response.status_code = 202
    return BaseModelPublic.of(record, platform_operator=True)


def _operator_tenant(conn: Connection, caller: Principal, services: Services) -> bool:
    operators = services.settings.platform_operator_tenants
    return tenants.is_operator_tenant(conn, caller.tenant_id, operators)


def _insert(conn: Connection, new: base_catalog.NewBaseModel) -> BaseModelRecord:
    try:
        return base_catalog.register_base_model(conn, new)
    except base_catalog.BaseModelExistsError as exc:
        raise ApiError(409, "base_model_exists", str(exc), "name") from None


def _retryable(base: BaseModelRecord, timeout: timedelta) -> bool:
    """A failed import, or one `registering` for longer than `timeout` (its worker died)."""
    if base.status == BaseStatus.FAILED:
        return True
    started = base.import_requested_at
    return (
        base.status == BaseStatus.REGISTERING
        and started is not None
        and datetime.now(UTC) - started > timeout
    )


@router.get("", response_model=Page[BaseModelPublic])
def list_base_models(conn: ConnDep, caller: Caller, services: ServicesDep) -> Page[BaseModelPublic]:
    operator = _operator_tenant(conn, caller, services)
    return page_of(
        [
            BaseModelPublic.of(b, platform_operator=operator)
            for b in base_catalog.list_base_models(conn)
        ]
    )


@router.get("/{name:path}", response_model=BaseModelPublic)
def retrieve_base_model(
    name: str, conn: ConnDep, caller: Caller, services: ServicesDep
) -> BaseModelPublic:
    record = base_catalog.get_base_model(conn, name)
    if record is None:
        raise not_found("base_model", name)
    return BaseModelPublic.of(record, platform_operator=_operator_tenant(conn, caller, services))
