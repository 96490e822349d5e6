"""/v1/models: the base models and the tenant's finished adapters, OpenAI-shaped."""

from __future__ import annotations

from fastapi import APIRouter

from control_plane import base_catalog, jobs
from control_plane.api.deps import Caller, ConnDep
from control_plane.api.errors import not_found
from control_plane.api.schemas import ModelPublic, Page, page_of
from control_plane.base_status import BaseStatus

router = APIRouter(prefix="/v1/models", tags=["models"])


def _all_models(conn: ConnDep, caller: Caller) -> list[ModelPublic]:
    bases = base_catalog.list_base_models(conn)
    names = {b.id: b.name for b in bases}
    found = [
        ModelPublic(
            id=b.name, created=int(b.created_at.timestamp()), owned_by="loraforge", kind="base"
        )
        for b in bases
        if b.status == BaseStatus.READY
    ]
    for job in jobs.list_succeeded_models(conn, caller.tenant_id):
        found.append(
            ModelPublic(
                id=job.fine_tuned_model or job.id,
                created=int((job.finished_at or job.created_at).timestamp()),
                owned_by=caller.tenant_id,
                kind="adapter",
                base_model=names.get(job.base_model_id),
            )
        )
    return found


@router.get("", response_model=Page[ModelPublic])
def list_models(conn: ConnDep, caller: Caller) -> Page[ModelPublic]:
    return page_of(_all_models(conn, caller))


@router.get("/{model_id:path}", response_model=ModelPublic)
def retrieve_model(model_id: str, conn: ConnDep, caller: Caller) -> ModelPublic:
    for model in _all_models(conn, caller):
        if model.id == model_id:
            return model
    raise not_found("model", model_id)
